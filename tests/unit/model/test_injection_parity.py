"""Parity of the memory injection with the official DiT-Mem reference (``injection_golden_tiny``).

The fixture holds a tiny Wan DiT (reference weights converted to diffusers' layout), one set of
inputs and the reference outputs with memory, with all-zero memory and without memory, plus the
hidden states after each block. The sensitivity tests re-implement plausible mistakes (memory
without timestep modulation, without ``norm1``, injected into one block only) and check that the
parity comparison rejects each of them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

from model.attention import UnsupportedAttentionBackend
from model.injection import MemoryAttnProcessor, MemoryInjector
from model.tokens import MemoryTokens

ATOL = RTOL = 1e-4  # fixtures README, float32
WRONG_MIN_DIFF = 1e-3


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def diffusers_weights(injection_golden) -> dict[str, torch.Tensor]:
    prefix = "diffusers."
    return {k[len(prefix) :]: v for k, v in injection_golden.items() if k.startswith(prefix)}


@pytest.fixture
def make_transformer(injection_golden_meta, diffusers_weights):
    """A new fixture DiT with the golden weights (no injector) per call."""

    def make() -> WanTransformer3DModel:
        model = WanTransformer3DModel(
            **injection_golden_meta["diffusers_config_WanTransformer3DModel"]
        )
        model.load_state_dict(diffusers_weights, strict=True)
        return model.eval()

    return make


@pytest.fixture
def transformer(make_transformer) -> WanTransformer3DModel:
    return make_transformer()


@pytest.fixture
def injector(transformer) -> MemoryInjector:
    return MemoryInjector(transformer)


@pytest.fixture(scope="module")
def inputs(injection_golden) -> dict[str, torch.Tensor]:
    return dict(
        hidden_states=injection_golden["input.latents"],
        timestep=injection_golden["input.timestep"],
        encoder_hidden_states=injection_golden["input.context"],
    )


@pytest.fixture(scope="module")
def memory(injection_golden) -> MemoryTokens:
    return MemoryTokens.from_dense(injection_golden["input.memory_tokens"])


def run(model: WanTransformer3DModel, **inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def run_with_block_outputs(model, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    outputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda _module, _args, out: outputs.append(out))
        for block in model.blocks
    ]
    try:
        return run(model, **inputs), outputs
    finally:
        for handle in handles:
            handle.remove()


# -- parity ---------------------------------------------------------------------------------------


def test_output_with_memory_matches_reference(
    transformer, injector, inputs, memory, injection_golden
):
    with injector.use(memory):
        out = run(transformer, **inputs)
    assert_matches(out, injection_golden["output.ref_mem"])
    assert_matches(out, injection_golden["output.ref_mem.fp64ref"])
    # The memory effect is far larger than the tolerance, so the parity above is meaningful.
    assert max_abs_diff(out, injection_golden["output.ref_nomem"]) > WRONG_MIN_DIFF


def test_zero_memory_matches_reference_and_differs_from_no_memory(
    transformer, injector, inputs, memory, injection_golden
):
    zeros = MemoryTokens.from_dense(torch.zeros_like(memory.tokens))
    with injector.use(zeros):
        out = run(transformer, **inputs)
    assert_matches(out, injection_golden["output.ref_mem_zeros"])
    assert max_abs_diff(out, injection_golden["output.ref_nomem"]) > WRONG_MIN_DIFF


def test_output_without_memory_matches_reference(transformer, injector, inputs, injection_golden):
    out = run(transformer, **inputs)
    assert_matches(out, injection_golden["output.ref_nomem"])
    assert_matches(out, injection_golden["output.ref_nomem.fp64ref"])
    assert_matches(out, injection_golden["output.diffusers_nomem"])


def test_injector_without_memory_is_bit_identical_to_stock(transformer, inputs, memory):
    stock = run(transformer, **inputs)
    original_processors = [block.attn1.processor for block in transformer.blocks]

    injector = MemoryInjector(transformer)
    assert all(isinstance(b.attn1.processor, MemoryAttnProcessor) for b in transformer.blocks)
    assert torch.equal(run(transformer, **inputs), stock)
    with injector.use(None):
        assert torch.equal(run(transformer, **inputs), stock)
    with injector.use(memory):
        run(transformer, **inputs)
    assert injector.memory is None
    assert torch.equal(run(transformer, **inputs), stock)

    injector.remove()
    assert [b.attn1.processor for b in transformer.blocks] == original_processors
    assert torch.equal(run(transformer, **inputs), stock)
    # Removal also frees the transformer for a new injector.
    MemoryInjector(transformer).remove()


@pytest.mark.parametrize("case", ["nomem", "mem"])
def test_block_hidden_states_match_reference(
    transformer, injector, inputs, memory, injection_golden, case
):
    with injector.use(memory if case == "mem" else None):
        _, blocks = run_with_block_outputs(transformer, inputs)
    assert len(blocks) == len(transformer.blocks) == 2
    for index, hidden in enumerate(blocks):
        assert_matches(hidden, injection_golden[f"block{index}.out.{case}"])


def test_injector_rejects_memory_of_another_width(transformer, injector, memory):
    with pytest.raises(ValueError, match="width"):
        injector.set_memory(MemoryTokens.from_dense(memory.tokens[..., :-1]))


def test_injector_cannot_be_installed_twice(transformer, injector):
    with pytest.raises(RuntimeError):
        MemoryInjector(transformer)


# -- compact memory, order, batch -----------------------------------------------------------------


def test_compact_memory_equals_dense_memory(transformer, injector, inputs, memory):
    distinct = memory.tokens[:, :3]
    counts = torch.tensor([5, 1, 6])
    compact = MemoryTokens(tokens=distinct, counts=counts)
    dense = MemoryTokens.from_dense(compact.expand())
    assert dense.tokens.shape[1] == int(counts.sum())

    with injector.use(dense):
        expected = run(transformer, **inputs)
    with injector.use(compact):
        out = run(transformer, **inputs)
    assert_matches(out, expected, atol=1e-5)
    # The counts matter: the same distinct tokens counted once give another result.
    with injector.use(MemoryTokens.from_dense(distinct)):
        once = run(transformer, **inputs)
    assert max_abs_diff(once, expected) > WRONG_MIN_DIFF


def test_memory_order_does_not_matter(transformer, injector, inputs, memory, injection_golden):
    permutation = torch.randperm(memory.tokens.shape[1], generator=torch.Generator().manual_seed(0))
    with injector.use(MemoryTokens.from_dense(memory.tokens[:, permutation])):
        out = run(transformer, **inputs)
    assert_matches(out, injection_golden["output.ref_mem"])


def test_single_memory_is_broadcast_over_the_batch(transformer, injector, inputs, memory):
    generator = torch.Generator().manual_seed(3)
    second = dict(
        hidden_states=torch.randn(inputs["hidden_states"].shape, generator=generator),
        timestep=torch.tensor([250.0]),
        encoder_hidden_states=torch.randn(
            inputs["encoder_hidden_states"].shape, generator=generator
        ),
    )
    batched = dict(
        hidden_states=torch.cat([inputs["hidden_states"], second["hidden_states"]]),
        timestep=torch.cat([inputs["timestep"], second["timestep"]]),
        encoder_hidden_states=torch.cat(
            [inputs["encoder_hidden_states"], second["encoder_hidden_states"]]
        ),
    )
    with injector.use(memory):
        separate = [run(transformer, **inputs), run(transformer, **second)]
    with injector.use(memory):
        together = run(transformer, **batched)
    assert_matches(together, torch.cat(separate), atol=1e-5)


def test_per_request_memory_in_a_batch(transformer, injector, inputs, memory):
    other = MemoryTokens.from_dense(memory.tokens.flip(-1))
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    with injector.use(MemoryTokens.from_dense(torch.cat([memory.tokens, other.tokens]))):
        together = run(transformer, **doubled)
    with injector.use(memory):
        first = run(transformer, **inputs)
    with injector.use(other):
        second = run(transformer, **inputs)
    assert_matches(together, torch.cat([first, second]), atol=1e-5)


# -- memory keys/values cache ---------------------------------------------------------------------


def step_context(transformer, branch: str, step: int, sigma: float = 0.5):
    """The cache context diffusers' WanPipeline opens around each forward of a step."""
    return transformer.cache_context(branch, step_index=step, sigma=sigma, num_inference_steps=2)


def test_memory_kv_cache_is_shared_by_the_branches_of_a_step(transformer, injector, inputs, memory):
    with injector.use(memory):
        with step_context(transformer, "cond", 0):
            first = run(transformer, **inputs)
        cached = dict(injector.context.cache)
        assert sorted(cached) == list(range(len(transformer.blocks)))

        # The other branch of the same step reuses them, even given another timestep object.
        with step_context(transformer, "uncond", 0):
            second = run(transformer, **dict(inputs, timestep=inputs["timestep"].clone()))
        assert all(injector.context.cache[i] is cached[i] for i in cached)
        assert torch.equal(second, first)

        # The next step recomputes them, even for the same timestep tensor.
        with step_context(transformer, "cond", 1, sigma=0.25):
            third = run(transformer, **inputs)
        assert all(injector.context.cache[i] is not cached[i] for i in cached)
        assert torch.equal(third, first)
    assert injector.context.cache == {}


def test_direct_calls_cache_no_memory_kv(transformer, injector, inputs, memory):
    # Without a cache context nothing says whether two forwards share a step.
    with injector.use(memory):
        first = run(transformer, **inputs)
        assert injector.context.cache == {}
        assert torch.equal(run(transformer, **inputs), first)
        assert injector.context.cache == {}


def test_cached_memory_kv_follow_the_step(transformer, injector, inputs, memory):
    other_step = dict(inputs, timestep=torch.tensor([100.0]))
    with injector.use(memory):
        with step_context(transformer, "cond", 0):
            run(transformer, **inputs)
        with step_context(transformer, "cond", 1, sigma=0.1):
            out = run(transformer, **other_step)
    with injector.use(memory):
        expected = run(transformer, **other_step)
    assert torch.equal(out, expected)


# -- CFG branch detection (memory guidance) --------------------------------------------------------


def test_branch_comes_from_the_cache_context_not_the_forward_order(
    transformer, injector, inputs, memory, injection_golden
):
    stock = run(transformer, **inputs)
    # "uncond" first, then "cond", with the very same timestep tensor: detection by timestep
    # identity and order would take the first forward for the conditional one.
    with injector.use(memory, conditional_only=True):
        with step_context(transformer, "uncond", 0):
            uncond = run(transformer, **inputs)
        with step_context(transformer, "cond", 0):
            cond = run(transformer, **inputs)
    assert torch.equal(uncond, stock)
    assert_matches(cond, injection_golden["output.ref_mem"])
    # Without memory guidance both branches see the memory.
    with injector.use(memory), step_context(transformer, "uncond", 0):
        assert_matches(run(transformer, **inputs), injection_golden["output.ref_mem"])


def test_direct_calls_are_conditional_unless_overridden(
    transformer, injector, inputs, memory, injection_golden
):
    stock = run(transformer, **inputs)
    with injector.use(memory, conditional_only=True):
        # Two direct calls with the same timestep tensor: both conditional, whatever the order.
        for _ in range(2):
            assert_matches(run(transformer, **inputs), injection_golden["output.ref_mem"])
        with injector.branch("uncond"):
            assert torch.equal(run(transformer, **inputs), stock)
            # The override wins over a cache context too.
            with step_context(transformer, "cond", 0):
                assert torch.equal(run(transformer, **inputs), stock)
        with injector.branch("cond"), step_context(transformer, "uncond", 0):
            assert_matches(run(transformer, **inputs), injection_golden["output.ref_mem"])
        assert_matches(run(transformer, **inputs), injection_golden["output.ref_mem"])


def test_branch_rejects_unknown_names(injector):
    with pytest.raises(ValueError, match="branch"), injector.branch("negative"):
        pass


def test_remove_unregisters_the_diffusers_hooks(transformer, injector):
    modules = [transformer, *transformer.blocks]
    assert all(HookRegistry.check_if_exists_or_initialize(m).hooks for m in modules)
    injector.remove()
    assert not any(HookRegistry.check_if_exists_or_initialize(m).hooks for m in modules)


# -- attention backends ---------------------------------------------------------------------------


@pytest.fixture
def backend_restored():
    """``set_attention_backend`` also sets diffusers' process-wide active backend; the
    ``attention_backend`` context manager puts the previous one back on exit."""
    with attention_backend(AttentionBackendName.NATIVE):
        yield


@pytest.mark.parametrize("backend", ["flex", "_native_cudnn"])
def test_unsupported_attention_backend_fails_at_the_first_memory_forward(
    backend_restored, transformer, injector, inputs, memory, backend
):
    transformer.set_attention_backend(backend)
    # Without memory the stock processor runs, on the backend diffusers was given.
    assert all(b.attn1.processor.fallback._attention_backend == backend for b in transformer.blocks)
    with injector.use(memory), pytest.raises(UnsupportedAttentionBackend, match=backend):
        run(transformer, **inputs)


def test_native_backends_with_memory_match_the_default(
    backend_restored, transformer, injector, inputs, memory, injection_golden
):
    with injector.use(memory):
        default = run(transformer, **inputs)
        transformer.set_attention_backend("native")
        assert torch.equal(run(transformer, **inputs), default)
        # On CPU, PyTorch's kernel with a log-sum-exp is its flash kernel: the default one.
        transformer.set_attention_backend("_native_flash")
        assert torch.equal(run(transformer, **inputs), default)
        # The math kernel gives no log-sum-exp: one masked softmax, exact up to rounding.
        transformer.set_attention_backend("_native_math")
        assert_matches(run(transformer, **inputs), injection_golden["output.ref_mem"])


# -- sensitivity: wrong injections must fail the parity comparison --------------------------------


@pytest.fixture
def block_tembs(transformer):
    """The timestep embedding each block receives, captured by our own pre-hooks."""
    tembs: dict[torch.nn.Module, torch.Tensor] = {}

    def capture(block, args):
        # WanTransformer3DModel calls blocks as (hidden_states, text_states, temb, rotary_emb).
        tembs[block] = args[2]

    handles = [block.register_forward_pre_hook(capture) for block in transformer.blocks]
    yield tembs
    for handle in handles:
        handle.remove()


def _memory_kv_variant(tembs, *, normalize: bool, modulate: bool):
    """A stand-in for ``MemoryAttnProcessor.memory_kv`` written from the reference semantics."""

    def memory_kv(self, attn, like):
        block = self.block
        tokens = self.context.memory.tokens.float()
        if normalize:
            tokens = block.norm1(tokens)
        if modulate:
            modulation = block.scale_shift_table + tembs[block].float()
            shift, scale = modulation.chunk(6, dim=1)[:2]
            tokens = tokens * (1 + scale) + shift
        tokens = tokens.type_as(like)
        key = attn.norm_k(attn.to_k(tokens)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(tokens).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        return SimpleNamespace(step=None, key=key, value=value)

    return memory_kv


def _memory_in_first_block_only(transformer: WanTransformer3DModel) -> None:
    for block in transformer.blocks[1:]:
        block.attn1.set_processor(block.attn1.processor.fallback)


def test_reimplemented_reference_semantics_match(
    monkeypatch, transformer, injector, block_tembs, inputs, memory, injection_golden
):
    # The harness for the wrong variants, with nothing wrong, reproduces the reference.
    monkeypatch.setattr(
        MemoryAttnProcessor,
        "memory_kv",
        _memory_kv_variant(block_tembs, normalize=True, modulate=True),
    )
    with injector.use(memory):
        out = run(transformer, **inputs)
    assert_matches(out, injection_golden["output.ref_mem"])


@pytest.mark.parametrize(
    ("normalize", "modulate"),
    [
        pytest.param(True, False, id="norm1-without-modulation"),
        pytest.param(False, False, id="raw"),
    ],
)
def test_memory_without_block_treatment_breaks_parity(
    monkeypatch,
    transformer,
    injector,
    block_tembs,
    inputs,
    memory,
    injection_golden,
    normalize,
    modulate,
):
    monkeypatch.setattr(
        MemoryAttnProcessor,
        "memory_kv",
        _memory_kv_variant(block_tembs, normalize=normalize, modulate=modulate),
    )
    with injector.use(memory):
        out = run(transformer, **inputs)
    assert max_abs_diff(out, injection_golden["output.ref_mem"]) > WRONG_MIN_DIFF


def test_memory_in_one_block_only_breaks_parity(
    transformer, injector, inputs, memory, injection_golden
):
    _memory_in_first_block_only(transformer)
    with injector.use(memory):
        out, blocks = run_with_block_outputs(transformer, inputs)
    # Block 0 is still right; the missing injection in block 1 shows in the output.
    assert_matches(blocks[0], injection_golden["block0.out.mem"])
    assert max_abs_diff(out, injection_golden["output.ref_mem"]) > WRONG_MIN_DIFF
