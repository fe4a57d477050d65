"""The gradient pass's memory (lib_ae.pass_memory): recomputation gives the same bytes as keeping the activations, the
pass's own attention equals the host's, the memory kept for the backward really falls, and the choice between the
modes (from the free memory, or after running out of it) never changes a result."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, Initno, InitnoConfig, TokenSelection
from lib_ae.capture import ForwardComplete
from lib_ae.pass_memory import (
    KEEP_BYTES_PER_LATENT_PIXEL,
    PassAttention,
    PassMemory,
    choose_recompute,
    keep_estimate,
    LeanForward,
    lean_forward,
    transformer_blocks,
)
from support.models import SD1_LIKE, SD2_LIKE, SDXL_LIKE, TinyUnetConfig, make_unet
from support.threads import one_thread  # noqa: F401  (module-scoped, autouse)

CONFIGS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE, "sdxl": SDXL_LIKE}
SELECTION = TokenSelection.official(77, [[2], [5]])


def inputs(config: TinyUnetConfig, dtype: torch.dtype, batch: int = 2, side: int = 32
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, side, side, generator=g, dtype=dtype)
    t = torch.tensor([700.0, 300.0][:batch], dtype=dtype)
    context = torch.randn(batch, 77, config.context_dim, generator=g, dtype=dtype)
    return x, t, context


def run_steps(unet: torch.nn.Module, memory: PassMemory, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              config: ExciteConfig | None = None, steps: tuple[int, ...] = (0, 1),
              run_unet: Callable[[torch.Tensor, torch.Tensor], object] | None = None) -> tuple[torch.Tensor, Any]:
    capture = AttentionCapture(unet)
    engine = AttendAndExcite(capture, config or ExciteConfig(thresholds={}), pass_memory=memory)
    plan = engine.plan(10)

    def plain_run(latent: torch.Tensor, rows: torch.Tensor) -> None:
        unet(latent, t[rows], context=context[rows])

    z = x
    try:
        for step in steps:
            z, _ = engine.step(z, step, plan, [SELECTION] * x.shape[0], run_unet or plain_run)
        return z, engine
    finally:
        capture.remove()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_recomputation_gives_the_same_bytes(family: str, dtype: torch.dtype) -> None:
    """Forced on the same inputs, the two modes give bit-identical latents (with the early stop inside a recomputed
    block), for the pass's own attention and for the host's: so choosing a mode from the free memory never changes an
    image."""
    unet = make_unet(CONFIGS[family], seed=4, dtype=dtype)
    x, t, context = inputs(CONFIGS[family], dtype)
    for attention in (PassAttention(), None):
        kept, _ = run_steps(unet, PassMemory("keep", attention), x, t, context)
        recomputed, _ = run_steps(unet, PassMemory("recompute", attention), x, t, context)
        assert torch.equal(kept, recomputed)
        assert (kept - x).abs().max() > 1e-3  # the update did something


def test_recomputation_with_refinement_gives_the_same_bytes() -> None:
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float32)
    x, t, context = inputs(SD1_LIKE, torch.float32)
    config = ExciteConfig(thresholds={0: 0.99}, max_refinement_iterations=3)
    kept, _ = run_steps(unet, PassMemory("keep"), x, t, context, config, steps=(0,))
    recomputed, _ = run_steps(unet, PassMemory("recompute"), x, t, context, config, steps=(0,))
    assert torch.equal(kept, recomputed)


def test_recomputation_with_self_attention_gives_the_same_bytes() -> None:
    """InitNO reads self-attention through the attn1 hooks: they repeat their work in the recomputation too."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float64)
    x, t, context = inputs(SD1_LIKE, torch.float64)
    small = InitnoConfig(top_k=1, rounds=1, round_steps=1, final_steps=1)
    results = []
    for mode in ("keep", "recompute"):
        capture = AttentionCapture(unet)
        engine = AttendAndExcite(capture, Initno(ExciteConfig(thresholds={}), small), pass_memory=PassMemory(mode))
        evaluation = engine.evaluator.forward_backward(
            x[:1], lambda leaf: unet(leaf, t[:1], context=context[:1]),
            engine.evaluator.loss_plan([(SELECTION, None)], x.device), (8, 8), purpose="initial")
        capture.remove()
        results.append((evaluation.grads, evaluation.objective))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][0].abs().max() > 0


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_own_attention_equals_the_host_attention(family: str) -> None:
    """A1111's SDP forward, as the pass computes it, against ldm's own attention (the host's), in float64."""
    unet = make_unet(CONFIGS[family], seed=4, dtype=torch.float64)
    x, t, context = inputs(CONFIGS[family], torch.float64)
    own, _ = run_steps(unet, PassMemory("keep"), x, t, context)
    host, _ = run_steps(unet, PassMemory("keep", None), x, t, context)
    assert torch.allclose(own, host, rtol=0, atol=1e-12)
    assert not torch.equal(own, host)  # really another computation (SDPA's), not the host's run again


def saved_bytes(unet: torch.nn.Module, memory: PassMemory, recompute: bool, x: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one pass (outside checkpointed blocks: inside them torch's own
    saved-tensor hooks take the tensors and keep none), parameters excluded."""
    capture = AttentionCapture(unet)
    parameters = {p.data_ptr() for p in unet.parameters()}
    kept: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameters:
            kept[(tensor.data_ptr(), tensor.storage_offset())] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.no_grad(), capture.probe(8, 8):
        unet(x, t, context=context)
    try:
        with torch.enable_grad(), lean_forward(unet, capture, memory, recompute), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            leaf = x.detach().requires_grad_(True)
            for p in unet.parameters():
                p.requires_grad_(False)
            with capture.record(8, 8):
                unet(leaf, t, context=context)
    finally:
        for p in unet.parameters():
            p.requires_grad_(True)
        capture.remove()
    return sum(kept.values())


def test_recomputation_keeps_a_fraction_of_the_activations() -> None:
    """What the backward must keep, counted (not timed): recomputation keeps under a third of it on an SDXL-like
    UNet (in the webui the rest is what made SDXL 1024 need +6.3 GiB)."""
    unet = make_unet(SDXL_LIKE, seed=4, dtype=torch.float32)
    x, t, context = inputs(SDXL_LIKE, torch.float32, batch=1)
    kept = saved_bytes(unet, PassMemory("keep"), False, x, t, context)
    recomputed = saved_bytes(unet, PassMemory("keep"), True, x, t, context)
    assert recomputed < kept / 3, (recomputed, kept)
    assert recomputed > 0


def test_choice_from_the_free_memory() -> None:
    need = keep_estimate(rows=1, latent_height=128, latent_width=128)
    assert need == 128 * 128 * KEEP_BYTES_PER_LATENT_PIXEL
    assert choose_recompute("auto", None, need) is False  # unknown (CPU): keep
    assert choose_recompute("auto", 3 * need, need) is False
    assert choose_recompute("auto", need, need) is True
    assert choose_recompute("keep", 0, need) is False
    assert choose_recompute("recompute", 10 * need, need) is True
    with pytest.raises(ValueError, match="auto, keep, recompute"):
        PassMemory("fast")  # type: ignore[arg-type]


def test_out_of_memory_while_keeping_recomputes_and_gives_the_same_bytes() -> None:
    """`auto` keeps the activations where the free memory is unknown; when that runs out of memory, the evaluation is
    made again with recomputation, and so is the rest of the pass: the image is the one recomputation gives."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float32)
    x, t, context = inputs(SD1_LIKE, torch.float32)
    failures = [1]
    recomputing: list[bool] = []

    def failing_once(latent: torch.Tensor, rows: torch.Tensor) -> None:
        blocks = transformer_blocks(unet)
        recomputing.append(any("forward" in vars(block) for block in blocks))
        if torch.is_grad_enabled() and failures and not recomputing[-1]:
            failures.pop()
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        unet(latent, t[rows], context=context[rows])

    fallen_back, engine = run_steps(unet, PassMemory("auto"), x, t, context, run_unet=failing_once)
    recomputed, _ = run_steps(unet, PassMemory("recompute"), x, t, context)
    assert not failures, "the injected failure was not reached"
    assert torch.equal(fallen_back, recomputed)
    assert engine.evaluator.memory_modes_used == ["recompute"]


def test_out_of_memory_in_a_forced_mode_is_not_hidden() -> None:
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float32)
    x, t, context = inputs(SD1_LIKE, torch.float32)

    def failing(latent: torch.Tensor, rows: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        unet(latent, t[rows], context=context[rows])

    with pytest.raises(torch.OutOfMemoryError):
        run_steps(unet, PassMemory("keep"), x, t, context, run_unet=failing)


@contextmanager
def foreign_forward(module: torch.nn.Module) -> Iterator[list[int]]:
    calls: list[int] = []
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del module.forward


def test_the_unet_is_left_as_it_was_and_foreign_forwards_are_kept() -> None:
    """Every `forward` the pass sets lives only during the pass (the graph guard would see one as a hazard); an
    instance-level `forward` another extension set is called through and put back."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float32)
    x, t, context = inputs(SD1_LIKE, torch.float32)
    block = transformer_blocks(unet)[0]
    with foreign_forward(block) as calls:
        mine = block.forward
        run_steps(unet, PassMemory("recompute"), x, t, context)
        assert block.forward is mine
        assert calls, "the foreign forward must still run inside the pass"
    assert not any("forward" in vars(m) for m in unet.modules())


def test_the_pass_walks_the_unet_once_per_sampling_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """`LeanForward` builds its forwards at the first evaluation and sets the same ones at every later one (walking the
    modules was a tenth of an eager evaluation's CPU time); `release()` (the pass's end) builds them anew. A foreign
    forward set between evaluations is still what each evaluation wraps and puts back."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float32)
    capture = AttentionCapture(unet)
    lean = LeanForward()
    walks = []
    original_modules = torch.nn.Module.modules

    def counted(self: torch.nn.Module) -> Any:
        if self is unet:
            walks.append(1)
        return original_modules(self)

    monkeypatch.setattr(torch.nn.Module, "modules", counted)
    memory = PassMemory("recompute")
    seen = []
    for _ in range(3):
        with lean(unet, capture, memory, recompute=True):
            seen.append([vars(m)["forward"] for m, _ in lean.patches(unet, memory, True)])
        assert not any("forward" in vars(m) for m in original_modules(unet))
    assert len(walks) == 2 and seen[0] == seen[1] == seen[2]  # attention modules + transformer blocks, once
    lean.release()
    with lean(unet, capture, memory, recompute=True):
        pass
    assert len(walks) == 4
    block = transformer_blocks(unet)[0]
    with foreign_forward(block):
        mine = block.forward
        with lean(unet, capture, memory, recompute=True):
            assert block.forward is not mine
        assert block.forward is mine
    capture.remove()


def test_host_forward_serves_what_own_attention_does_not_cover() -> None:
    """A mask (or sgm's extra tokens) goes to the host's own forward; the context transform (A1111's hypernetworks)
    and the upcast are applied."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float64)
    attn2 = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    hidden = torch.randn(2, 16, attn2.to_q.in_features, dtype=torch.float64)
    context = torch.randn(2, 77, SD1_LIKE.context_dim, dtype=torch.float64)
    capture = AttentionCapture(unet)
    host = attn2(hidden, context=context)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[:, 40:] = False
    host_masked = attn2(hidden, context=context, mask=mask)
    doubled = PassAttention(upcast=True, context_for_kv=lambda c: (2 * c, c))
    with lean_forward(unet, capture, PassMemory("keep", doubled), recompute=False):
        transformed = attn2(hidden, context=context)
        masked = attn2(hidden, context=context, mask=mask)
    with lean_forward(unet, capture, PassMemory("keep"), recompute=False):
        own = attn2(hidden, context=context)
    capture.remove()
    assert torch.allclose(own, host, rtol=0, atol=1e-12)
    assert not torch.allclose(transformed, host)  # the key's context was doubled
    with torch.no_grad():
        expected = attn2.to_out(torch.nn.functional.scaled_dot_product_attention(
            *(t.view(2, -1, attn2.heads, t.shape[-1] // attn2.heads).transpose(1, 2)
              for t in (attn2.to_q(hidden), attn2.to_k(2 * context), attn2.to_v(context)))
        ).transpose(1, 2).reshape(2, 16, -1))
    assert torch.allclose(transformed, expected, rtol=0, atol=1e-12)
    assert torch.equal(masked, host_masked)  # the host's own forward served the mask


def test_forward_complete_leaves_no_checkpoint_state_behind() -> None:
    """The capture's early stop inside a recomputed block ends the forward cleanly: the next forward without
    gradients (the sampler's) saves nothing and runs as before."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float32)
    x, t, context = inputs(SD1_LIKE, torch.float32)
    with torch.no_grad():
        before = unet(x, t, context=context)
    run_steps(unet, PassMemory("recompute"), x, t, context)
    with torch.no_grad():
        after = unet(x, t, context=context)
    assert torch.equal(before, after)
    assert issubclass(ForwardComplete, BaseException)


def test_recomputation_inside_a_replayed_graph_equals_eager_keeping() -> None:
    """The graph path (the CPU stand-in that replays the captured computation) with recomputation gives the eager
    path's bytes with the activations kept: the fast path and the low-memory mode combine."""
    from lib_ae import GraphableRunner
    from test_engine_graphs import ReplayingCpuBackend

    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float64)
    x, t, context = inputs(SD1_LIKE, torch.float64)
    results = []
    for graphs, mode in ((False, "keep"), (True, "recompute")):
        capture = AttentionCapture(unet)
        backend = ReplayingCpuBackend()
        engine = AttendAndExcite(capture, ExciteConfig(thresholds={}), cuda_graphs=graphs, graph_backend=backend,
                                 pass_memory=PassMemory(mode))  # type: ignore[arg-type]
        runner = GraphableRunner(lambda z, tt, c: unet(z, tt, context=c), (t, context), key="memory")
        z = x
        for step in (0, 1):
            z, _ = engine.step(z, step, engine.plan(10), [SELECTION] * 2, runner)
        capture.remove()
        assert (backend.replays > 0) is graphs
        results.append(z)
    assert torch.equal(results[0], results[1])


def test_a_tensor_among_the_extra_arguments_goes_to_the_host_forward() -> None:
    """An attention call with a `value` tensor (Forge's patched attention passes one) is the host's to compute: the
    own attention must not compare the tensor with 0 (its truth value is ambiguous)."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float64)
    attn2 = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    served: list[Any] = []

    def host_forward(x: torch.Tensor, context: Any = None, mask: Any = None, **extra: Any) -> torch.Tensor:
        served.append(extra)
        return x

    attn2.forward = host_forward  # type: ignore[method-assign]
    capture = AttentionCapture(unet)
    hidden = torch.randn(1, 16, attn2.to_q.in_features, dtype=torch.float64)
    context = torch.randn(1, 77, SD1_LIKE.context_dim, dtype=torch.float64)
    with lean_forward(unet, capture, PassMemory("keep"), recompute=False):
        assert attn2(hidden, context=context, value=context) is hidden
        attn2(hidden, context=context, n_times_crossframe_attn_in_self=0)
    capture.remove()
    del attn2.forward
    assert len(served) == 1 and "value" in served[0]
