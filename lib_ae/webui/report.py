"""What the user reads about A&E: the "AE error" infotext entry (the API returns it in `info` too), the console log,
and console lines said once per process."""

from __future__ import annotations

import logging
from typing import Any

import torch

from lib_ae.sampling_run import TITLE

from .host import Processing

logger = logging.getLogger("lib_ae.webui")

AE_ERROR_KEY = "AE error"
"""Infotext key for what went wrong (invalid args, subjects not found, unsupported sampler, a failure)."""
AE_TRACE_KEY = "AE trace"
"""Infotext key of the one-line excitation summary, e.g. "25 steps, refinement 20/4/0, final min attention 0.83"."""
AE_HIRES_TRACE_KEY = "AE hires trace"
"""The same summary for the hires fix pass, written when A&E also ran there ("Also on the hires fix pass")."""
AE_SUBJECTS_USED_KEY = "AE subjects used"
"""Infotext key, written beside "AE subjects: auto": the subjects found in this image's prompt, e.g. "cat, dog"."""
AE_BINDINGS_KEY = "AE bindings"
"""Infotext key, with a `bind` method: the (modifier, noun) pairs bound for this image, e.g. "red->car, blue->bench"."""
NOTHING_USED = "none"
"""The value of those keys when nothing was found (A1111 drops empty values)."""
MAX_ERROR_TEXT = 300

_said: set[str] = set()


def clear_infotext(p: Processing, keys: tuple[str, ...]) -> None:
    """Drop our keys: X/Y/Z cells share one `extra_generation_params` dict (a shallow copy of p per cell)."""
    for key in keys:
        p.extra_generation_params.pop(key, None)


def report_problem(p: Processing, message: str, *, log: bool = True) -> None:
    """Log `message` (once: callers do not log it themselves) and add it, once, to this generation's "AE error"."""
    if log:
        logger.warning("%s: %s", TITLE, message)
    existing = p.extra_generation_params.get(AE_ERROR_KEY)
    parts = existing.split("; ") if isinstance(existing, str) and existing else []
    if message not in parts:
        parts.append(message)
    text = "; ".join(parts)
    p.extra_generation_params[AE_ERROR_KEY] = (
        text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."
    )


def say_once(message: str) -> None:
    """A console line printed once per process (e.g. why the CUDA-graph fast path is off): it holds for every run."""
    if message not in _said:
        _said.add(message)
        logger.warning("%s: %s", TITLE, message)


def failure_text(error: BaseException, where: str, recomputed: bool = False) -> str:
    """The user's line for an unexpected failure inside the A&E pass at `where` ("step 3"). Out of memory (CUDA's
    OutOfMemoryError, or the RuntimeError other backends raise) says what would fit: the pass's low-memory mode where
    it did not run (`recomputed`), else a smaller batch or image. Anything else names the error with the first line of
    its text (CUDA's out-of-memory text runs over several)."""
    name = type(error).__name__
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        if recomputed:
            advice = "lower the batch size or image size (the pass already recomputed its activations)"
        else:
            advice = (
                "set Settings > Attend and Excite > Memory of the A&E gradient pass to 'recompute' (a fraction of the "
                "memory, the same image), or lower the batch size or image size"
            )
        return f"A&E ran out of memory at {where} ({name}); sampling went on without A&E: {advice}"
    detail = (str(error).splitlines() or [""])[0][:120]
    return f"A&E stopped at {where} ({name}: {detail}); sampling went on without it"


def image_in_job(p: Any, b: int) -> int:
    """0-based index over the whole job of image b of the current batch (p.iteration counts the batches)."""
    return int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1) + b
