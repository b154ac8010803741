"""Loading memory encoder checkpoints (``model.loading``) in every layout the project accepts.

1. The released layout (parameters only, ``pipe.dit_mem.``/``dit_mem.`` prefix, bf16).
2. A full reference ``state_dict`` with the ``cnn.0``/``cnn.1`` alias keys.
3. The project's own folder format, and bare files written by safetensors or ``torch.save``.

The official-size key list (``dit_mem_official_keys.json``) pins the module and parameter
names to the official checkpoint.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from model.encoder import MemoryEncoder
from model.errors import CheckpointError, WeightsNotFound
from model.loading import (
    load_encoder_state,
    load_memory_encoder,
    official_state_dict,
    save_memory_encoder,
)

ATOL = RTOL = 1e-4
ALIASES = {"conv_block1.": "cnn.0.", "conv_block2.": "cnn.1."}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def new_encoder(golden_encoder_config):
    """A freshly constructed (not loaded) encoder with the main fixture's configuration."""

    def make(**overrides) -> MemoryEncoder:
        return MemoryEncoder(**{**golden_encoder_config("main"), **overrides}).eval()

    return make


def parameter_names(encoder: MemoryEncoder) -> list[str]:
    return [name for name, _ in encoder.named_parameters()]


def buffer_names(encoder: MemoryEncoder) -> list[str]:
    return sorted(set(encoder.state_dict()) - set(parameter_names(encoder)))


def with_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``<branch>.cnn.{0,1}.*`` copies that the reference's ``state_dict`` carries."""
    full = dict(state)
    for key, value in state.items():
        for block, alias in ALIASES.items():
            if f"_module.{block}" in key:
                full[key.replace(f"_module.{block}", f"_module.{alias}")] = value.clone()
    return full


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": value for key, value in state.items()}


def public_config(encoder: MemoryEncoder) -> dict:
    """The encoder's config as JSON values, without diffusers' private bookkeeping keys."""
    return {
        k: v for k, v in json.loads(json.dumps(encoder.config)).items() if not k.startswith("_")
    }


def assert_same_state(a: MemoryEncoder, b: MemoryEncoder) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, value in state_a.items():
        assert value.dtype == state_b[name].dtype, name
        assert torch.equal(value, state_b[name]), name
    for (name, buffer), (_, other) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(buffer, other), name


# -- (a) released layout: parameters only ---------------------------------------------------------


@pytest.mark.parametrize("prefix", ["pipe.dit_mem.", "dit_mem."])
def test_released_layout_loads_parameters_and_keeps_default_buffers(
    new_encoder, golden_encoder_state, caplog, prefix
):
    weights = golden_encoder_state("main")
    encoder = new_encoder()
    released = {
        f"{prefix}{name}": weights[name].to(torch.bfloat16) for name in parameter_names(encoder)
    }

    with caplog.at_level(logging.WARNING, logger="model.loading"):
        missing = load_encoder_state(encoder, released)

    assert missing == buffer_names(encoder)
    assert any(
        r.levelno == logging.WARNING and "no buffers" in r.getMessage() for r in caplog.records
    )
    for name, param in encoder.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(param, weights[name].to(torch.bfloat16).float()), name
    batch_norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(batch_norms) == 8  # fft_filter.norm and the unused .bn, 2 blocks x 2 bands
    for norm in batch_norms:
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
        assert int(norm.num_batches_tracked) == 0
    # Filters come from the seeded initialisation: a second construction gives the same ones.
    fresh = new_encoder(filter_seed=encoder.config.filter_seed)
    filters = [n for n in buffer_names(encoder) if n.endswith("complex_weight")]
    assert len(filters) == 4
    for name in filters:
        assert torch.equal(encoder.get_buffer(name), fresh.get_buffer(name)), name


def test_released_layout_resets_buffers_of_a_previously_loaded_encoder(
    new_encoder, make_golden_encoder
):
    encoder = make_golden_encoder("main")  # carries the fixture's non-default statistics
    load_encoder_state(encoder, official_state_dict(encoder))
    fresh = new_encoder(filter_seed=encoder.config.filter_seed)
    for name in buffer_names(encoder):
        assert torch.equal(encoder.get_buffer(name), fresh.get_buffer(name)), name


def test_filter_initialisation_is_seeded(new_encoder):
    a, b, other = new_encoder(filter_seed=0), new_encoder(filter_seed=0), new_encoder(filter_seed=1)
    name = "high_pass_module.conv_block1.fft_filter.complex_weight"
    assert torch.equal(a.get_buffer(name), b.get_buffer(name))
    assert not torch.equal(a.get_buffer(name), other.get_buffer(name))
    low = name.replace("high_pass", "low_pass")
    assert not torch.equal(a.get_buffer(name), a.get_buffer(low))


def test_released_layout_of_a_full_checkpoint_round_trips(new_encoder, make_golden_encoder):
    source = make_golden_encoder("main")
    released = official_state_dict(source)
    assert all(key.startswith("pipe.dit_mem.") for key in released)
    target = new_encoder()
    load_encoder_state(target, released)
    for name, param in source.named_parameters():
        assert torch.equal(target.get_parameter(name), param), name


# -- (b) full reference layout with aliases -------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "pipe.dit_mem."])
def test_full_reference_layout_reproduces_golden_output(
    new_encoder, golden_encoder_state, encoder_golden, official_keys, prefix
):
    state = with_aliases(golden_encoder_state("main"))
    # The same alias keys as the reference's state_dict (same module tree at any width).
    assert {k for k in state if ".cnn." in k} == set(official_keys["alias_keys_cnn_dot"])
    state = prefixed(state, prefix)
    encoder = new_encoder()
    assert load_encoder_state(encoder, state) == []
    out = encoder(encoder_golden["input.n3"])
    torch.testing.assert_close(out, encoder_golden["output.n3"], atol=ATOL, rtol=RTOL)


def test_alias_that_differs_from_its_canonical_tensor_is_rejected(
    new_encoder, golden_encoder_state
):
    state = with_aliases(golden_encoder_state("main"))
    alias = "low_pass_module.cnn.1.conv.bias"
    state[alias] = state[alias] + 1.0
    with pytest.raises(CheckpointError, match=alias.replace(".", r"\.")):
        load_encoder_state(new_encoder(), state)


def test_alias_only_checkpoint_loads(new_encoder, golden_encoder_state, make_golden_encoder):
    state = with_aliases(golden_encoder_state("main"))
    state = {k: v for k, v in state.items() if "conv_block" not in k}
    encoder = new_encoder()
    assert load_encoder_state(encoder, state) == []
    assert_same_state(encoder, make_golden_encoder("main"))


# -- (c) errors name the offending keys; nothing is loaded ----------------------------------------


def _extra_key(state):
    state["pipe.dit_mem.foo.weight"] = torch.zeros(3)
    return "foo.weight"


def _missing_parameter(state):
    name = "pipe.dit_mem.high_pass_module.feature_proj.bias"
    del state[name]
    return "high_pass_module.feature_proj.bias"


def _partial_buffers(state):
    name = "pipe.dit_mem.low_pass_module.conv_block2.fft_filter.norm.running_var"
    del state[name]
    return "low_pass_module.conv_block2.fft_filter.norm.running_var"


def _wrong_shape(state):
    name = "pipe.dit_mem.self_attention.q.weight"
    state[name] = state[name][:, :-1].clone()
    return "self_attention.q.weight"


@pytest.mark.parametrize(
    "corrupt", [_extra_key, _missing_parameter, _partial_buffers, _wrong_shape]
)
def test_bad_checkpoint_raises_naming_the_key_and_loads_nothing(
    new_encoder, golden_encoder_state, corrupt
):
    state = prefixed(golden_encoder_state("main"), "pipe.dit_mem.")
    key = corrupt(state)
    encoder = new_encoder()
    before = encoder.fingerprint()
    with pytest.raises(CheckpointError) as excinfo:
        load_encoder_state(encoder, state)
    assert key in str(excinfo.value)
    assert encoder.fingerprint() == before


def test_checkpoint_for_another_configuration_is_rejected(new_encoder, golden_encoder_state):
    # t3 weights have another feature_proj width and filter grids than the main model.
    with pytest.raises(CheckpointError, match="feature_proj.weight"):
        load_encoder_state(new_encoder(), golden_encoder_state("t3"))


# -- (d) the official-size encoder ----------------------------------------------------------------


@pytest.fixture(scope="module")
def official_encoder() -> MemoryEncoder:
    """The released 1.3B configuration (~79M parameters); built once for the module."""
    return MemoryEncoder().eval()


def _shape_and_dtype(entry: list) -> tuple[list[int], str]:
    return list(entry[:-1]), entry[-1]


def test_official_parameter_count(official_encoder, official_keys):
    assert sum(p.numel() for p in official_encoder.parameters()) == official_keys["params"]
    assert len(list(official_encoder.parameters())) == official_keys["n_unique_parameters"]
    for module, count in official_keys["params_breakdown"].items():
        submodule = official_encoder.get_submodule(module)
        assert sum(p.numel() for p in submodule.parameters()) == count, module


def test_official_state_dict_keys_shapes_and_dtypes(official_encoder, official_keys):
    aliases = set(official_keys["alias_keys_cnn_dot"])
    assert aliases == {key for key in official_keys["state_dict"] if ".cnn." in key}
    expected = {k: v for k, v in official_keys["state_dict"].items() if k not in aliases}
    assert len(expected) + len(aliases) == official_keys["n_state_dict_keys"]

    state = official_encoder.state_dict()
    assert set(state) == set(expected)
    for name, tensor in state.items():
        shape, dtype = _shape_and_dtype(expected[name])
        assert list(tensor.shape) == shape, name
        assert str(tensor.dtype) == f"torch.{dtype}", name
    # Bookkeeping buffers of this implementation stay out of checkpoints.
    assert not any(k.endswith(("distinct_positions", "token_counts")) for k in state)


def test_official_checkpoint_layout(official_encoder, official_keys):
    expected = official_keys["checkpoint_keys_as_written_by_training_code"]
    written = official_state_dict(official_encoder)
    assert set(written) == set(expected)
    for name, tensor in written.items():
        assert list(tensor.shape) == expected[name], name


def test_official_encoder_tokens(official_encoder, official_keys):
    # The canonical latent pools to one temporal step: one distinct token per clip and band.
    assert official_encoder.token_counts.tolist() == [
        official_keys["constructor"]["target_seq_len"]
    ]
    assert official_encoder.latent_shape == (
        official_keys["constructor"]["in_channels"],
        *official_keys["constructor"]["latent_shape_effective"],
    )
    assert official_encoder.high_pass_module.cnn_output_shape == tuple(
        official_keys["cnn_output_shape_DHW"]
    )
    assert (
        official_encoder.high_pass_module.feature_proj.in_features
        == official_keys["feature_proj_in_features"]
    )


# -- (e) files and folders ------------------------------------------------------------------------


def test_save_and_load_folder_round_trips_bit_exactly(
    make_golden_encoder, encoder_golden, tmp_path
):
    source = make_golden_encoder("t3")
    folder = save_memory_encoder(source, tmp_path / "encoder")
    assert (folder / "config.json").is_file()

    loaded = load_memory_encoder(folder)
    assert not loaded.training
    assert public_config(loaded) == public_config(source)
    assert_same_state(loaded, source)
    assert loaded.fingerprint() == source.fingerprint()
    x = encoder_golden["t3.input.n2"]
    assert torch.equal(loaded(x), source(x))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_bare_official_file(
    golden_encoder_config, golden_encoder_state, encoder_golden, tmp_path, fmt
):
    state = prefixed(with_aliases(golden_encoder_state("main")), "pipe.dit_mem.")
    path = tmp_path / f"DiT-Mem.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)

    encoder = load_memory_encoder(path, config=golden_encoder_config("main"))
    assert not encoder.training
    out = encoder(encoder_golden["input.n3"])
    torch.testing.assert_close(out, encoder_golden["output.n3"], atol=ATOL, rtol=RTOL)


def test_load_to_bfloat16(golden_encoder_config, golden_encoder_state, tmp_path):
    path = tmp_path / "released.safetensors"
    save_file(prefixed(golden_encoder_state("main"), "dit_mem."), path)
    encoder = load_memory_encoder(path, config=golden_encoder_config("main"), dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16


def test_missing_weights_raise_weights_not_found(tmp_path):
    with pytest.raises(WeightsNotFound):
        load_memory_encoder(tmp_path / "nowhere" / "DiT-Mem-1.3B.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFound, match="config.json"):
        load_memory_encoder(empty)
