"""Stand-in for modules/extra_networks.py: `parse_prompt` (L178-191) removes <name:arg1:arg2> tags from a prompt and
returns them by network name."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
"""L175."""


class ExtraNetworkParams:
    def __init__(self, items: list[str] | None = None) -> None:
        self.items = items or []


def parse_prompt(prompt: str) -> tuple[str, dict[str, list[ExtraNetworkParams]]]:
    res: dict[str, list[Any]] = defaultdict(list)

    def found(m: re.Match[str]) -> str:
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res
