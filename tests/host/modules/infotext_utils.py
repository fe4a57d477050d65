"""Stand-in for modules/infotext_utils.py: quoting values and parsing the parameters line back."""

from __future__ import annotations

import json
import re
from typing import Any

# The "key: value" pattern of L16 (keys start with a word character and hold word characters, spaces, '-' or '/';
# a value is a JSON string or runs to the next comma) and the "WxH" pattern of L18, written out anew.
_PARAM = re.compile(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)")
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(text: Any) -> Any:
    """L56-60: a value containing a comma, a colon or a newline is written as a JSON string, anything else as is."""
    return json.dumps(text, ensure_ascii=False) if any(c in str(text) for c in ",:\n") else text


def unquote(text: str) -> str:
    """L63-70: the inverse of `quote` for a JSON string; any other text unchanged."""
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        try:
            return str(json.loads(text))
        except ValueError:
            pass
    return text


def parse_generation_parameters(x: str) -> dict[str, Any]:
    """L234-281 without styles and defaults: prompt lines, "Negative prompt:", and the last line's parameters when it
    holds at least three; quoted values are unquoted, "WxH" values split into "<key>-1" and "<key>-2"."""
    res: dict[str, Any] = {}
    *lines, lastline = x.strip().split("\n")
    if len(_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        (negative if in_negative else prompt).append(line)
    for k, v in _PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = _IMAGE_SIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res["Prompt"] = "\n".join(prompt)
    res["Negative prompt"] = "\n".join(negative)
    return res
