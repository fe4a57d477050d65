"""Stand-in for modules/images.py: `save_image` (L586-) records its call instead of writing a file."""

from __future__ import annotations

from typing import Any

saved: list[dict[str, Any]] = []
"""Every call, newest last: the image and the arguments A1111's save_image takes (path, basename, seed, prompt,
extension, info, p, suffix, ...)."""


def save_image(image: Any, path: str, basename: str, seed: Any = None, prompt: Any = None, extension: str = "png",
               info: Any = None, **kwargs: Any) -> tuple[str, None]:
    saved.append({"image": image, "path": path, "basename": basename, "seed": seed, "prompt": prompt,
                  "extension": extension, "info": info, **kwargs})
    return f"{path}/{len(saved):05d}-{seed}{kwargs.get('suffix', '')}.{extension}", None
