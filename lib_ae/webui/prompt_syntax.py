"""A1111's prompt syntax resolved to the plain text a subject suggestion reads (`lib_ae.suggest`).

The text the sampler conditions on at its first step, because that is where A&E and binding do their
work (the first half of the steps) and the text whose tokens the engine can locate (lib_ae/tokens.py):
* `<lora:...>`, `<hypernet:...>` and any other `<name:...>` extra-network tag: removed, as A1111 removes them before
  the prompt is encoded.
* `AND`: only the first sub-prompt (its trailing `:weight` dropped). The other sub-prompts are separate conditioning
  rows that A&E does not read.
* emphasis `(word)`, `(word:1.2)`, `[word]`: the words, without brackets and weights. A bracket also separates words,
  as in A1111, which tokenizes each emphasis segment on its own: `(red)dish` is "red" + "dish".
* prompt editing `[from:to:when]`: the side in effect at step 1, which is `from` unless `when` ends the edit before
  step 1 (A1111: `when` < 1 step). `[add:when]` adds its text later, so it is left out; `[remove::when]` keeps it.
  A decimal `when` is a fraction of `steps`; without `steps` any positive fraction counts as "later than step 1".
  Why the first step's side: the objects' layout, which A&E and binding steer, is settled in the early steps, and the
  maps the engine reads at those steps are computed from exactly this text.
* alternation `[a|b|c]`: the first option, the one A1111 uses at step 1 (it alternates every step after that).
* `BREAK`: a phrase boundary (it starts a new 75-token chunk; a phrase never spans it).

Pure Python, no `modules.*`: the Forges keep the same syntax.
"""

from __future__ import annotations

import re

from lib_ae.suggest import SEGMENT_BREAK

_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")
_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"\s*:\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*$")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_NUMBER = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*$")

def first_step_text(prompt: str, steps: int | None = None) -> str:
    """The text A1111 conditions on at step 1 of `prompt`, brackets and weights removed (rules in the module doc).
    BREAK becomes `SEGMENT_BREAK`; each removed bracket becomes a space (a word boundary)."""
    text = _EXTRA_NETWORK.sub(" ", prompt)
    text = _AND.split(text)[0]
    text = _SUBPROMPT_WEIGHT.sub("", text)
    plain = _Schedule(text, steps).parse()
    return SEGMENT_BREAK.join(part.strip() for part in _BREAK.split(plain))


class _Schedule:
    """A small recursive-descent reader of A1111's bracket syntax that resolves it at step 1.
    Unbalanced brackets are read as literal characters, then dropped like the rest of the punctuation."""

    def __init__(self, text: str, steps: int | None) -> None:
        self.text = text
        self.steps = steps
        self.pos = 0

    def parse(self) -> str:
        out: list[str] = []
        while self.pos < len(self.text):
            out.append(self._item())
        return "".join(out)

    def _item(self) -> str:
        """The step-1 text of one character, escape or bracket group starting at `pos`."""
        char = self.text[self.pos]
        if char == "\\" and self.pos + 1 < len(self.text):
            self.pos += 2
            return self.text[self.pos - 1]  # an escaped bracket is a literal character (punctuation) of the prompt
        if char in "([":
            start = self.pos
            group = self._group()
            if group is not None:
                return " " + group + " "
            self.pos = start + 1
            return " "
        self.pos += 1
        return char

    def _group(self) -> str | None:
        """Read `( ... )` or `[ ... ]` at pos; return its step-1 text, or None if unbalanced."""
        opening = self.text[self.pos]
        closing = ")" if opening == "(" else "]"
        self.pos += 1
        parts: list[list[str]] = [[]]  # split at top-level ':' (or '|', recorded in `alternation`)
        alternation = False
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == closing:
                self.pos += 1
                return self._resolve(opening, ["".join(p) for p in parts], alternation)
            if char in ")]":
                return None
            if char == ":":
                parts.append([])
                self.pos += 1
                continue
            if char == "|" and opening == "[":
                alternation = True
                parts.append([])
                self.pos += 1
                continue
            parts[-1].append(self._item())
        return None

    def _resolve(self, opening: str, parts: list[str], alternation: bool) -> str:
        if opening == "(":
            # (text) or (text:weight); a ':' that is not a weight is kept as text, as A1111 reads it.
            if len(parts) > 1 and _NUMBER.match(parts[-1]):
                parts = parts[:-1]
            return ":".join(parts)
        if alternation:
            return parts[0]
        if len(parts) in (2, 3) and _NUMBER.match(parts[-1]):
            before = parts[0] if len(parts) == 3 else ""
            after = parts[1] if len(parts) == 3 else parts[0]
            return before if self._edit_later_than_first_step(parts[-1].strip()) else after
        return ":".join(parts)

    def _edit_later_than_first_step(self, when: str) -> bool:
        """A1111 uses the 'before' side at step 1 when 1 <= when (when = int(fraction * steps) for decimals)."""
        value = float(when)
        if "." in when:
            if self.steps is None:
                return value > 0
            return int(value * self.steps) >= 1
        return int(value) >= 1
