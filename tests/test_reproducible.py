"""The same A&E request twice gives the same latent, under the threading a CPU webui runs with.

A1111 never limits torch's threads, answers each API request on a worker thread of its own, and on the CPU runs its
"InvokeAI" cross-attention (an einsum product, a softmax, an einsum product, in place of ldm's `CrossAttention.forward`).
The A&E gradient goes back through that attention. Reductions on several threads (the softmax backward among them)
give last-bit different results for a different split of the work, and a gradient step can carry such a bit into the
image; so this test runs the generation on at least 2 threads, with that attention, several times in one process:
on the main thread and on fresh threads, with the heap moved in between (other allocations of varied sizes kept
alive, as other requests leave behind), and requires bit-equal latents.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest
import torch
from ldm.modules import attention as ldm_attention

from lib_ae.params import PARAMS

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "tests" / "host"
TITLE = "Attend and Excite"
REQUEST: dict[str, Any] = {"prompt": "a cat and a dog", "steps": 4, "seed": 7, "width": 128, "height": 128}
AE_VALUES: dict[str, Any] = {"enabled": True, "subjects": "cat, dog", "max_refinement_steps": 2}
REPEATS = 4


def einsum_cross_attention_forward(self: Any, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None,
                                   **kwargs: Any) -> torch.Tensor:
    """Attention as A1111's CPU optimisation computes it (sd_hijack_optimizations.py, "InvokeAI", unsliced at these
    sizes): keys pre-scaled, heads folded into the batch, einsum scores, softmax in the input dtype, einsum values."""
    heads = self.heads
    context = x if context is None else context
    q = self.to_q(x)
    k = self.to_k(context) * self.scale
    v = self.to_v(context)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        batch, length, width = t.shape
        return t.reshape(batch, length, heads, width // heads).permute(0, 2, 1, 3).reshape(batch * heads, length, -1)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    scores = torch.einsum("b i d, b j d -> b i j", q, k).softmax(dim=-1)
    out = torch.einsum("b i j, b j d -> b i d", scores, v)
    batch = out.shape[0] // heads
    out = out.reshape(batch, heads, out.shape[1], out.shape[2]).permute(0, 2, 1, 3).reshape(batch, out.shape[1], -1)
    return self.to_out(out)


@pytest.fixture(scope="module")
def host() -> Iterator[ModuleType]:
    """The stand-in host on sys.path for this module, A1111's thread settings (torch's default, at least 2) and its
    CPU attention on ldm's CrossAttention."""
    added = [str(HOST)]
    if importlib.util.find_spec("gradio") is None:
        added.insert(0, str(HOST / "gradio_stub"))
    sys.path[:0] = added
    preexisting = set(sys.modules)
    threads = torch.get_num_threads()
    original_forward = ldm_attention.CrossAttention.forward
    torch.set_num_threads(max(2, threads))
    ldm_attention.CrossAttention.forward = einsum_cross_attention_forward
    try:
        import standin

        standin.reset_host(standin.StandInSdModel(seed=0))
        yield standin
    finally:
        ldm_attention.CrossAttention.forward = original_forward
        torch.set_num_threads(threads)
        for path in added:
            sys.path.remove(path)
        for name in [n for n in sys.modules if n not in preexisting and n.split(".")[0] in ("modules", "standin", "gradio")]:
            del sys.modules[name]
        # The adapter binds this host's modules at import (tests/conftest.py drops it for the same reason).
        for name in [n for n in sys.modules if n == "lib_ae.webui" or n.startswith("lib_ae.webui.")]:
            del sys.modules[name]


def on_fresh_thread(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run `fn` on a new thread, as A1111's API runs a request on a worker thread (its own OpenMP team)."""
    result: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as error:  # re-raised on the test's thread
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def test_same_request_gives_the_same_latent(host: ModuleType) -> None:
    runner = host.load_extension(ROOT)
    args = host.script_args(runner, {TITLE: [AE_VALUES.get(s.name, s.default) for s in PARAMS]})
    assert torch.get_num_threads() >= 2

    def generate() -> torch.Tensor:
        _, processed = host.txt2img(runner, args, **REQUEST)
        assert not any("AE error" in text for text in processed.infotexts), processed.infotexts
        return torch.stack(processed.images)

    rng = random.Random(0)
    left_behind: list[torch.Tensor] = []
    first = generate()
    for repeat in range(REPEATS - 1):
        # Move the heap: what earlier requests leave alive shifts where this one's tensors land.
        left_behind += [torch.empty(rng.randint(1, 1 << 16)) for _ in range(rng.randint(1, 64))]
        latent = on_fresh_thread(generate) if repeat % 2 == 0 else generate()
        difference = (latent - first).abs().max().item()
        assert torch.equal(latent, first), f"repeat {repeat + 1}: max |difference| {difference:.3e} from the first run"
    baseline = host.txt2img(None, None, **REQUEST)[1].images
    assert not torch.equal(first, torch.stack(baseline)), "A&E changed nothing: the test would prove nothing"
