"""Worker of tests/test_cpu_reproducible.py, run in a fresh process: the same A&E evaluation repeated, on the
threads a CPU webui uses, as A1111 would run it after loading this extension's preload.py.

Prints one JSON line: the hash of each run's updated latent, the thread count and MKL's reproducibility mode.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
import threading
from pathlib import Path
from typing import Callable

import torch  # A1111 has imported torch (initialize.imports) before it loads any extension's preload.py

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SD15_FULL_WIDTH = dict(
    image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
    context_dim=768, use_checkpoint=False, legacy=False,
)
"""SD1.5's unet_config.params (configs/stable-diffusion/v1-inference.yaml): the real widths, where MKL's matrix
products split their work over threads (the tiny test UNets are too narrow to reach those code paths)."""
LATENT = 8


def run_preload() -> None:
    """What A1111's script_loading.preload_extensions does with an extension's preload.py."""
    spec = importlib.util.spec_from_file_location("preload", ROOT / "preload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.preload(argparse.ArgumentParser())


def randomize_quickly(unet: torch.nn.Module, seed: int) -> None:
    """Random weights as tests/support/models.py gives them (N(0, 1/fan_in), biases and gains near 0 and 1, nothing
    zeroed), drawn in place in float32: for 860M parameters the float64 draw there takes most of a minute. Every run
    of this process uses the same weights, which is all the comparison needs."""
    generator = torch.Generator().manual_seed(seed)
    gains = {id(m.weight) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)}
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.ndim > 1:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)
            else:
                parameter.normal_(1.0 if id(parameter) in gains else 0.0, 0.1, generator=generator)


def on_fresh_thread(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A1111 answers each API request on a worker thread of its own."""
    result: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preload", action="store_true", help="load the extension's preload.py first, as A1111 does")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if args.preload:
        run_preload()

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, TokenSelection
    from lib_ae.cpu_determinism import mkl_reproducibility_mode

    torch.set_num_threads(max(2, torch.get_num_threads()))
    with torch.device("meta"):
        unet = UNetModel(**SD15_FULL_WIDTH)
    unet.to_empty(device="cpu")
    randomize_quickly(unet, seed=0)
    unet.eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, LATENT, LATENT, generator=generator)
    t = torch.tensor([600.0])
    context = torch.randn(1, 77, 768, generator=generator)
    selection = TokenSelection.official(77, [[2], [5]])
    capture = AttentionCapture(unet)
    engine = AttendAndExcite(capture, ExciteConfig(thresholds={}))

    def generate() -> torch.Tensor:
        def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> None:
            unet(latent_rows, t.index_select(0, rows), context=context.index_select(0, rows))

        latent, _ = engine.step(x, 0, engine.plan(10), [selection], run_unet, gradient_scale=[1.0])
        return latent

    rng = random.Random(0)
    left_behind: list[torch.Tensor] = []
    hashes = []
    for repeat in range(args.repeats):
        # Move the heap between runs, as other requests do.
        left_behind += [torch.empty(rng.randint(1, 1 << 16)) for _ in range(rng.randint(1, 64))]
        latent = on_fresh_thread(generate) if repeat % 2 else generate()
        assert not torch.equal(latent, x), "the step changed nothing: the comparison would prove nothing"
        hashes.append(hashlib.sha256(latent.numpy().tobytes()).hexdigest())
    print(json.dumps({"hashes": hashes, "threads": torch.get_num_threads(), "mkl_mode": mkl_reproducibility_mode()}))


if __name__ == "__main__":
    main()
