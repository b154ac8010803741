#!/usr/bin/env bash
# Creates (once) and prints the path of the project virtualenv.
# The venv lives outside the clone at ~/.cache/ditmem/venv-<hash>, keyed by the dependency lists
# of pyproject.toml, so every clone with the same dependencies shares one multi-GB install and
# editing unrelated pyproject sections (tool config) does not trigger a reinstall.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$(python3 - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
PY
)"
torch_pin="torch==2.14.1 torchvision==0.29.1"
hash="$(printf '%s\n%s\n' "$torch_pin" "$deps" | sha256sum | cut -c1-12)"
venv="${DITMEM_VENV:-$HOME/.cache/ditmem/venv-$hash}"
mkdir -p "$(dirname "$venv")"
# One creator at a time: a second caller waits here, then finds the venv complete.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
    echo "ditmem: creating virtualenv $venv (the first run installs several GB)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    # torch first, pinned to the build the project is tested with.
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet $torch_pin >&2
    # Dependencies only: scripts/run puts the clone itself on sys.path, so the shared venv
    # never points at one particular checkout.
    printf '%s\n' "$deps" | "$venv/bin/pip" install --quiet -r /dev/stdin >&2
    touch "$venv/.complete"
fi
echo "$venv"
