#!/usr/bin/env bash
# CPU benchmarks of docs/benchmarks.md, written to docs/bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/run python -m bench.memory_cost --repeats 3 > docs/bench-results/memory_cost_cpu.json
scripts/run python -m bench.step_time --config tiny --repeats 30 > docs/bench-results/step_time_tiny_cpu.json
scripts/run python -m bench.step_time --config tiny --precision > docs/bench-results/precision_tiny_cpu.json
scripts/run python -m bench.embedder --json docs/bench-results/embedder_cpu.json
scripts/run python -m bench.fleet_import --clips 64 --repeats 5 --json docs/bench-results/fleet_import_cpu.json
scripts/run python -m bench.preview_cost --runs 20 --json docs/bench-results/preview_cost_toy_cpu.json
scripts/run python -m bench.cache_tradeoff --samples 512 --thresholds 0.1 0.2 0.3 --json docs/bench-results/cache_tradeoff_toy_512.json --png docs/images/cache-tradeoff-512.png
scripts/run python -m bench.cache_tradeoff --samples 128 --json docs/bench-results/cache_tradeoff_toy_128.json
scripts/run python -m bench.batch_throughput --repeats 3 --json docs/bench-results/batch_throughput_cpu.json
# The longest (about 35 minutes, ~20 GB of scratch space): banks of 100K and 1M clips.
scripts/run python -m bench.bank_scale --json docs/bench-results/bank_scale_cpu.json
