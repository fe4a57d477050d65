"""The A&E state of one generation, kept on its processing object under one attribute.

A1111 hands the same `p` to every script hook of a generation, so that is where a hook finds what an earlier one left:
process_before_every_sampling installs sampling passes, post_sample reads them and records what to draw,
postprocess_image draws, postprocess appends the pictures. X/Y/Z plot cells are shallow copies of one `p`
(xyz_grid.py), so a cell that sets an override gets a new `RunState` of its own, never a shared one changed in place.
A disabled run creates none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lib_ae.params import AEParams
from lib_ae.visualize import ImageTrace, SubjectMap

if TYPE_CHECKING:
    from .sampling_pass import SamplingPass

RUN_STATE_ATTRIBUTE = "_ae_run"


@dataclass(frozen=True)
class BatchVisual:
    """What to draw for one image: rows of subject maps (last step A&E ran first) and its trace."""

    rows: list[list[SubjectMap]]
    trace: ImageTrace


@dataclass
class RunState:
    params: AEParams | None = None
    """This generation's parameters, parsed once by `process` (None: A&E is off or its settings are invalid)."""
    xyz_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Parameter name -> raw value set by our X/Y/Z axes for this cell."""
    passes: list[SamplingPass] = field(default_factory=list)
    """This batch's sampler runs with A&E (first pass, hires pass); post_sample reads and releases them."""
    visuals: dict[int, BatchVisual] = field(default_factory=dict)
    """Image index in the current batch -> what to draw for it (set by post_sample, read by postprocess_image)."""
    pictures: list[tuple[int, list[Any]]] = field(default_factory=list)
    """(image index in the whole job, its heatmap strip and trace plot), added to the results by postprocess."""


def existing_state(p: Any) -> RunState | None:
    state = vars(p).get(RUN_STATE_ATTRIBUTE) if hasattr(p, "__dict__") else None
    return state if isinstance(state, RunState) else None


def state_of(p: Any) -> RunState:
    """The state of `p`, made on first use."""
    state = existing_state(p)
    if state is None:
        state = RunState()
        setattr(p, RUN_STATE_ATTRIBUTE, state)
    return state


def with_xyz_override(p: Any, name: str, value: Any) -> None:
    """An X/Y/Z cell's value: a new state for this copy of p, carrying the overrides set so far plus this one."""
    current = existing_state(p)
    overrides = dict(current.xyz_overrides) if current is not None else {}
    setattr(p, RUN_STATE_ATTRIBUTE, RunState(xyz_overrides={**overrides, name: value}))


def xyz_overrides(p: Any) -> Mapping[str, Any]:
    state = existing_state(p)
    return state.xyz_overrides if state is not None else {}
