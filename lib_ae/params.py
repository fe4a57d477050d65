"""The single declarative spec of the user-facing Attend-and-Excite parameters.

Everything the user can set is declared once, as a typed field of `AEParams` made by `param(default, label=...,
infotext_key=..., ...)`: type checkers see the fields, and `PARAMS`, one `ParamSpec` per field in field order, is
read from them (a dataclass rather than pydantic: A1111 ships pydantic 1, Forge Neo a later one, and the spec needs
no more than the standard library gives). The rest derives from `PARAMS`:

* the UI (built by `lib_ae/webui/controls.py`): one component per `ParamSpec`, in `PARAMS` order, labelled
  `ParamSpec.label` (labels are also the ui-config.json keys, so they are unique and must not change lightly);
* the wire formats of A1111-family hosts (`lib_ae/webui/wire.py`): the API's positional list in `PARAMS` order or
  its dict keyed by field name, and the infotext, one readable key per parameter (`ParamSpec.infotext_key`);
* X/Y/Z plot axes: the specs with `xyz=True`, values parsed with `parse_value`;
* validation: `ParamSpec.parse` for one value, `validate` / `AEParams.__post_init__` for a whole set.

STABILITY. `PARAMS` order is the positional API order that clients (scripts, saved API payloads) rely on, and the
infotext keys are written into images forever. New parameters are therefore only ever *appended* to `PARAMS`, with
a default that reproduces the previous behaviour; existing names, positions and infotext keys never change
(tests/test_params.py freezes them).

STRICTNESS. Values are checked, never guessed: a bool field takes a bool (or the strings "true"/"false", because
A1111's infotext and API machinery hand over strings), a number field takes an int/float (not a bool) or a numeric
string, a text field takes text. Every problem of a set of arguments is collected and reported at once in a
`ParamsError`, each message naming the parameter, what was expected and what was given.

CANONICAL TEXT. The text parameters are stored in a canonical spelling, so that equal settings compare equal
and survive the infotext round trip: subjects as "cat, red car" (split on commas, whitespace collapsed, empty items and
case-insensitive duplicates dropped), thresholds as "0:0.05, 10:0.5, 20:0.8" (sorted by step; "none" when empty), the
method as one of its choices in lower case ("excite+bind"; `METHODS`, one per objective of `lib_ae.objectives`).

AUTOMATIC SUBJECTS. No subject words (an empty box, an empty list, or "auto" alone) means that the host finds the
subjects in each image's prompt (`lib_ae.suggest`). Its canonical text is the empty string, the spec's default; the
infotext writes it as "AE subjects: auto" (A1111 drops empty values), and the host writes the subjects it used beside
it.

`AEParams`, the validated set, takes its fields from `PARAMS` and parses the two text parameters once: the host uses
the typed `subject_names` / `threshold_steps`; the canonical text is what goes into the infotext and the API.

This module is host-free (no `modules.*`, no gradio, no pydantic), so it is unit-tested on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import numpy as np

from .config import REFERENCE_STEPS

logger = logging.getLogger(__name__)

ParamKind = Literal["bool", "int", "float", "str"]

INFOTEXT_KEY_PATTERN = re.compile(r"\w[\w \-/]+")
"""A1111's infotext key syntax (`infotext_utils.re_param_code`): keys that do not fully match are not parsed back."""

OFFICIAL_THRESHOLDS_TEXT = "0:0.05, 10:0.5, 20:0.8"
EMPTY_THRESHOLDS_TEXT = "none"
"""Canonical spelling of "no iterative refinement": a non-empty word, because A1111 drops empty infotext values."""

METHODS: tuple[str, ...] = (
    "excite", "bind", "excite+bind", "conform", "initno", "initno+selfcross", "conform+selfcross",
)
"""`method`'s choices, one per objective of `lib_ae.objectives` (which checks that they match): Attend-and-Excite
alone (the default, the behaviour before the parameter existed), SynGen's binding alone, both in one update,
CONFORM's contrastive objective, InitNO (the initial noise optimised first), or Self-Cross guidance on InitNO or on
CONFORM. Each
value is one published pipeline, and "a+b" names the combination, so one infotext value says what ran and one X/Y/Z
axis compares them all."""

AUTO_SUBJECTS_TEXT = "auto"
"""How automatic subjects are written in the infotext and may be typed: the subjects are found in the prompt."""



class ParamsError(ValueError):
    """Invalid A&E parameters; `messages` holds one precise, human message per problem."""

    def __init__(self, messages: Sequence[str]) -> None:
        self.messages: list[str] = list(messages)
        super().__init__("\n".join(self.messages))


class _ValueProblem(ValueError):
    """One value did not pass its spec; `messages`: complete, user-facing, one per problem."""

    def __init__(self, messages: str | Sequence[str]) -> None:
        self.messages: list[str] = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("; ".join(self.messages))


# ---------------------------------------------------------------------------------------------------------------------
# Text parameters: subjects and thresholds


def parse_subjects(text: str) -> list[str]:
    """Split subject text into subjects: commas separate, items are stripped, runs of whitespace become one space,
    empty items are dropped, and a later item equal to an earlier one ignoring case is dropped (order kept).

    A subject may be a phrase ("red car"); CLIP lower-cases prompts, so "Cat" and "cat" are the same subject.
    """
    subjects: list[str] = []
    seen: set[str] = set()
    for item in text.split(","):
        subject = " ".join(item.split())
        if not subject:
            continue
        key = subject.lower()
        if key in seen:
            logger.debug("AE subjects: dropping duplicate subject %r", subject)
            continue
        seen.add(key)
        subjects.append(subject)
    return subjects


def format_subjects(subjects: Sequence[str]) -> str:
    """The canonical subjects text: "cat, red car"."""
    return ", ".join(subjects)


def _subject_problems(subjects: Sequence[str], key: str) -> list[str]:
    problems = []
    for subject in subjects:
        # A subject wrapped in double quotes is nearly always an attempt to group a phrase (commas already do that),
        # and it is the one spelling A1111's infotext parser would unquote on the way back, corrupting the value.
        if subject[0] == '"' and subject[-1] == '"':
            problems.append(
                f"{key}: {subject!r} is wrapped in double quotes; write subjects without them "
                f"(commas separate subjects, a subject may be a phrase)"
            )
    return problems


def parse_thresholds(text: str) -> dict[int, float]:
    """Parse "step:threshold" pairs separated by commas, e.g. "0:0.05, 10:0.5, 20:0.8".

    Steps are refinement step indices for `REFERENCE_STEPS` (50) sampling steps; the step plan scales them to the
    actual step count, so only 0..49 can ever be reached. Thresholds are in [0, 1]. Empty text or "none" means no
    iterative refinement. Raises `ParamsError` listing every bad entry.
    """
    thresholds, problems = _parse_thresholds(text, _spec_key("thresholds"))
    if problems:
        raise ParamsError(problems)
    return thresholds


def _parse_thresholds(text: str, key: str) -> tuple[dict[int, float], list[str]]:
    thresholds: dict[int, float] = {}
    problems: list[str] = []
    if text.strip().lower() in ("", EMPTY_THRESHOLDS_TEXT):
        return thresholds, problems
    example = f"e.g. {OFFICIAL_THRESHOLDS_TEXT!r}, or 'none'"
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue  # a trailing comma changes nothing
        step_text, colon, value_text = entry.partition(":")
        if not colon:
            problems.append(f"{key}: {entry!r} is not a step:threshold pair ({example})")
            continue
        step = _parse_whole(step_text.strip())
        if step is None or not 0 <= step < REFERENCE_STEPS:
            problems.append(
                f"{key}: in {entry!r} the step must be a whole number from 0 to {REFERENCE_STEPS - 1} "
                f"(steps are given for {REFERENCE_STEPS} sampling steps and scaled to the actual count)"
            )
            continue
        try:
            threshold = float(value_text.strip())
        except ValueError:
            threshold = math.nan
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            problems.append(f"{key}: in {entry!r} the threshold must be a number between 0 and 1")
            continue
        if step in thresholds:
            problems.append(f"{key}: step {step} is given more than once")
            continue
        thresholds[step] = threshold
    return thresholds, problems


def format_thresholds(thresholds: Mapping[int, float]) -> str:
    """Canonical text of a thresholds mapping: sorted by step, shortest exact float spelling; "none" when empty."""
    if not thresholds:
        return EMPTY_THRESHOLDS_TEXT
    return ", ".join(f"{int(step)}:{float(value)!r}" for step, value in sorted(thresholds.items()))


def _parse_whole(text: str) -> int | None:
    """A whole number written as digits ("10"), nothing else (no sign, no decimals)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _canonical_subjects(value: str | Sequence[str], key: str) -> str:
    """Canonical subjects text; "" (automatic) for no subjects or "auto" alone, in any case."""
    if isinstance(value, str):
        subjects = parse_subjects(value)
    else:
        problems = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                problems.append(f"{key}: item {index} of the list must be text, got {describe_value(item)}")
            elif "," in item:
                problems.append(
                    f"{key}: item {index} of the list contains a comma ({item!r}); give one subject per item"
                )
        if problems:
            raise _ValueProblem(problems)
        subjects = parse_subjects(", ".join(value))
    problems = _subject_problems(subjects, key)
    if problems:
        raise _ValueProblem(problems)
    if len(subjects) == 1 and subjects[0].lower() == AUTO_SUBJECTS_TEXT:
        return ""
    return format_subjects(subjects)


def _canonical_method(value: str, key: str) -> str:
    method = "".join(value.split()).lower()  # "Excite + Bind" is excite+bind
    if method not in METHODS:
        raise _ValueProblem(f"{key}: expected one of {', '.join(METHODS)}, got {describe_value(value)}")
    return method


PROMPT_ONLY_SOFTMAX: tuple[str, ...] = ("auto", "on", "off")
"""`normalize_eot`: the official SD 2.1 mode on for SD2-family checkpoints (OpenCLIP), off for the others (auto, the
default); or on / off for every model. The booleans of the earlier parameter read as on / off."""


def _canonical_switch(value: str | bool, key: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    word = value.strip().lower()
    word = {"true": "on", "false": "off"}.get(word, word)
    if word not in PROMPT_ONLY_SOFTMAX:
        raise _ValueProblem(f"{key}: expected one of {', '.join(PROMPT_ONLY_SOFTMAX)}, got {describe_value(value)}")
    return word


def _canonical_thresholds(value: str, key: str) -> str:
    thresholds, problems = _parse_thresholds(value, key)
    if problems:
        raise _ValueProblem(problems)
    return format_thresholds(thresholds)


# ---------------------------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One user-facing parameter.

    `label`: the UI label; unique, because ui-config.json keys are built from it.
    `minimum`/`maximum`: inclusive range of a number. `step`: the UI slider's step; for an int parameter the value
    must also lie on the grid `minimum + k * step` (kernel_size: 1, 3, 5, ... is "odd"), for a float it is only the
    UI's granularity.
    `infotext_key`: the key written into the image's generation parameters (A1111 key syntax, "AE " prefix).
    `xyz`: offered as an X/Y/Z plot axis.
    `canonical`: for text parameters, validates the text and returns its canonical spelling.
    `accepts_list`: a text parameter that may also be given as a list of strings (subjects).
    `choices`: a text parameter that takes one of these values (shown as a radio group and an X/Y/Z dropdown).
    `accepts_bool`: a text parameter that also takes true / false (it was a bool parameter once).
    `absent_means_default`: an infotext with A&E keys but without this one was written before the parameter existed,
    so the image was made with the default: reading it gives the default (appended parameters that change the result).
    """

    name: str
    label: str
    kind: ParamKind
    default: bool | int | float | str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    infotext_key: str
    help: str
    xyz: bool = True
    canonical: Callable[[Any, str], str] | None = field(default=None, compare=False, repr=False)
    accepts_list: bool = False
    choices: tuple[str, ...] | None = None
    accepts_bool: bool = False
    absent_means_default: bool = False

    def __post_init__(self) -> None:
        if not INFOTEXT_KEY_PATTERN.fullmatch(self.infotext_key):
            raise ValueError(f"{self.name}: infotext key {self.infotext_key!r} is not readable by A1111's parser")
        if self.kind in ("int", "float") and (self.minimum is None or self.maximum is None or self.step is None):
            raise ValueError(f"{self.name}: a number parameter needs minimum, maximum and step")

    def parse(self, raw: Any) -> bool | int | float | str:
        """The typed, validated value of `raw`; raises `_ValueProblem` with a complete message otherwise."""
        if self.kind == "bool":
            return self._parse_bool(raw)
        if self.kind == "int":
            return self._parse_int(raw)
        if self.kind == "float":
            return self._parse_float(raw)
        return self._parse_str(raw)

    def expected(self) -> str:
        """What a valid value looks like, in words (for messages and documentation)."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            if self.choices:
                return "one of " + ", ".join(self.choices)
            return "text or a list of texts" if self.accepts_list else "text"
        assert self.minimum is not None and self.maximum is not None and self.step is not None
        if self.kind == "int":
            grid = self._int_grid()
            if self.step != 1 and len(grid) <= 16:
                return "one of " + ", ".join(str(v) for v in grid)
            return f"a whole number between {self.minimum:g} and {self.maximum:g}"
        return f"a number between {self.minimum:g} and {self.maximum:g}"

    def _problem(self, raw: Any) -> _ValueProblem:
        return _ValueProblem(f"{self.infotext_key}: expected {self.expected()}, got {describe_value(raw)}")

    def _parse_bool(self, raw: Any) -> bool:
        if isinstance(raw, (bool, np.bool_)):  # numpy's bool is a bool too (e.g. from a dataframe of settings)
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise self._problem(raw)

    def _number(self, raw: Any) -> float | int:
        """int/float (never bool) or a numeric string, finite and in range; anything else is a problem."""
        if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (numbers.Real, str)):
            raise self._problem(raw)
        value: float | int
        if isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise self._problem(raw) from None
        elif isinstance(raw, numbers.Integral):
            value = int(raw)
        else:
            value = float(raw)
        assert self.minimum is not None and self.maximum is not None
        # Comparing first keeps huge ints (10**400) out of float(); NaN fails every comparison.
        if not (self.minimum <= value <= self.maximum) or not math.isfinite(value):
            raise self._problem(raw)
        return value

    def _parse_int(self, raw: Any) -> int:
        value = self._number(raw)
        # 20.0 (a gradio slider or JSON client) and "20" are the whole number 20; 20.5 is not a whole number.
        if isinstance(value, float):
            if not value.is_integer():
                raise self._problem(raw)
            value = int(value)
        if value not in self._int_grid():
            raise self._problem(raw)
        return value

    def _int_grid(self) -> range:
        assert self.minimum is not None and self.maximum is not None and self.step is not None
        return range(int(self.minimum), int(self.maximum) + 1, int(self.step))

    def _parse_float(self, raw: Any) -> float:
        return float(self._number(raw))

    def _parse_str(self, raw: Any) -> str:
        if isinstance(raw, str):
            text = raw
        elif self.accepts_list and isinstance(raw, (list, tuple)):
            text = raw  # type: ignore[assignment]  # the canonicaliser checks the items
        elif self.accepts_bool and isinstance(raw, (bool, np.bool_)):
            text = raw  # type: ignore[assignment]  # the canonicaliser turns it into its word
        else:
            raise self._problem(raw)
        return self.canonical(text, self.infotext_key) if self.canonical is not None else text




_SPEC_METADATA = "ae_param"
_KINDS: Mapping[str, ParamKind] = {"bool": "bool", "int": "int", "float": "float", "str": "str"}

_Value = TypeVar("_Value", bool, int, float, str)


def param(default: _Value, **spec: Any) -> _Value:
    """An `AEParams` field with its default and the rest of its `ParamSpec` (label, infotext key, range, ...): each
    parameter is declared once, as a typed field that type checkers see, and `PARAMS` is read from the fields."""
    value: _Value = field(default=default, metadata={_SPEC_METADATA: spec})  # type: ignore[assignment]
    return value


def _spec_of(declared: dataclasses.Field[Any]) -> ParamSpec:
    kind = _KINDS[declared.type if isinstance(declared.type, str) else declared.type.__name__]
    default = declared.default
    assert isinstance(default, (bool, int, float, str)), declared.name  # every field is made by `param`
    return ParamSpec(name=declared.name, kind=kind, default=default, **declared.metadata[_SPEC_METADATA])


def _spec_key(name: str) -> str:
    return PARAMS_BY_NAME[name].infotext_key


def xyz_params() -> tuple[ParamSpec, ...]:
    """The parameters offered as X/Y/Z plot axes, in `PARAMS` order."""
    return tuple(spec for spec in PARAMS if spec.xyz)


def parse_value(name: str, raw: Any) -> bool | int | float | str:
    """Typed, validated value of one parameter (e.g. an X/Y/Z axis value); raises `ParamsError`."""
    if name not in PARAMS_BY_NAME:
        raise ParamsError([unknown_name(name)])
    try:
        return PARAMS_BY_NAME[name].parse(raw)
    except _ValueProblem as problem:
        raise ParamsError(problem.messages) from None


# ---------------------------------------------------------------------------------------------------------------------
# The parameter set


@dataclass(frozen=True)
class AEParams:
    """One complete, valid set of user parameters. Its fields are the parameters' declarations (`PARAMS` is read
    from them).

    Construction validates every field (raising `ParamsError`) and stores the canonical form: numbers as int/float,
    subjects and thresholds in canonical text, the form of the API, the UI and the infotext. The text is parsed here,
    once: the host reads the typed values `subject_names` and `threshold_steps`.
    """

    # The fields, in the stable positional API order: only ever append (see the module docstring).
    enabled: bool = param(
        False,
        label="Enable Attend and Excite",
        infotext_key="AE",
        help="Run Attend-and-Excite on this generation.",
    )
    subjects: str = param(
        "",
        label="Subject words",
        infotext_key="AE subjects",
        help="Words or phrases of the prompt that must appear in the image, separated by commas, e.g. 'cat, red car'. "
            "Each must occur in the prompt as written; the first occurrence is used. Empty (or 'auto'): the nouns of "
            "the "
            "prompt are found for you (shown as suggested in the token view).",
        canonical=_canonical_subjects,
        accepts_list=True,
    )
    scale_factor: float = param(
        20.0,
        label="Scale factor",
        minimum=0.0,
        maximum=100.0,
        step=0.5,
        infotext_key="AE scale factor",
        help="Step size of the latent update (official: 20). Larger pushes harder and may distort the image.",
    )
    alter_fraction: float = param(
        0.5,
        label="Fraction of steps updated",
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        infotext_key="AE steps fraction",
        help="Fraction of the sampling steps, from the start, whose latent is updated (official: 25 of 50 = 0.5).",
    )
    thresholds: str = param(
        OFFICIAL_THRESHOLDS_TEXT,
        label="Refinement thresholds",
        infotext_key="AE thresholds",
        help="step:threshold pairs. At these steps the latent is refined until every subject's attention reaches the "
            f"threshold. Steps are for {REFERENCE_STEPS} sampling steps and scaled to the actual count; 'none' = no "
            "refinement.",
        canonical=_canonical_thresholds,
    )
    max_refinement_steps: int = param(
        20,
        label="Max refinement iterations",
        minimum=0,
        maximum=100,
        step=1,
        infotext_key="AE refinement iterations",
        help="Most update iterations at one refinement step (official: 20).",
    )
    smooth_attentions: bool = param(
        True,
        label="Smooth attention maps",
        infotext_key="AE smoothing",
        help="Gaussian-smooth each subject's attention map before taking its maximum (official: on).",
    )
    sigma: float = param(
        0.5,
        label="Smoothing sigma",
        minimum=0.05,
        maximum=5.0,
        step=0.05,
        infotext_key="AE sigma",
        help="Sigma of the smoothing kernel (official: 0.5).",
    )
    kernel_size: int = param(
        3,
        label="Smoothing kernel size",
        minimum=1,
        maximum=15,
        step=2,
        infotext_key="AE kernel size",
        help="Side of the smoothing kernel, odd (official: 3).",
    )
    attention_res: int = param(
        0,
        label="Attention map size (0 = auto)",
        minimum=0,
        maximum=128,
        step=1,
        infotext_key="AE attention size",
        help="Side of the square cross-attention maps the loss reads; 0 = 1/32 of the image (16 at 512x512).",
    )
    normalize_eot: str = param(
        "auto",
        label="Prompt-only softmax",
        infotext_key="AE prompt-only softmax",
        help="Re-softmax over the prompt's own tokens only, without the end-of-text padding (the official SD 2.1 "
            "mode, as the authors run SD 2.1). auto: on for SD2-family checkpoints, off for the others.",
        canonical=_canonical_switch,
        choices=PROMPT_ONLY_SOFTMAX,
        accepts_bool=True,
    )
    apply_to_hires: bool = param(
        False,
        label="Also on the hires fix pass",
        infotext_key="AE hires",
        help="Also run on the second (hires fix) pass; the official method only runs on the first.",
        xyz=False,  # hires on/off is what the built-in hires axes already vary; this one only doubles the A&E cost
    )
    heatmaps: bool = param(
        False,
        label="Show attention heatmaps",
        infotext_key="AE heatmaps",
        help="Add to the results, per image, each subject's attention map at the last step A&E ran, over the image, "
            "and a plot of the excitation; saved like the images, returned by the API as extra images.",
        xyz=False,
    )
    heatmaps_first_step: bool = param(
        False,
        label="Heatmaps also at the first step",
        infotext_key="AE heatmaps first step",
        help="With the heatmaps: a second row with the maps at the first step, before A&E moved the latent.",
        xyz=False,
    )
    method: str = param(
        "excite",
        label="Method",
        infotext_key="AE method",
        help="excite: Attend-and-Excite, every subject must appear. bind: SynGen's binding, each modifier's attention "
            "is pulled onto its noun's ('a red car and a blue bench': red goes to the car), on the modifiers of the "
            "subjects. excite+bind: both, each loss with its own step size. conform: CONFORM, the subjects' attention "
            "pushed apart and each kept with its modifiers (needs two subjects). initno: InitNO, the starting noise "
            "optimised for the subjects before sampling (seconds more per image), then A&E. initno+selfcross: "
            "Self-Cross guidance on InitNO, which also keeps each subject's self-attention off the others. "
            "conform+selfcross: Self-Cross guidance on CONFORM.",
        canonical=_canonical_method,
        choices=METHODS,
        absent_means_default=True,
    )
    bind_step_size: float = param(
        20.0,
        label="Binding step size",
        minimum=0.0,
        maximum=100.0,
        step=0.5,
        infotext_key="AE bind step size",
        help="Step size of the binding update (SynGen: 20, the same at every updated step). With excite+bind the "
            "binding loss moves the latent by this step and the excite loss by the scale factor.",
        absent_means_default=True,
    )
    conform_temperature: float = param(
        0.5,
        label="CONFORM temperature",
        minimum=0.05,
        maximum=2.0,
        step=0.05,
        infotext_key="AE conform temperature",
        help="Temperature of CONFORM's contrastive loss (official: 0.5); lower contrasts the subjects more sharply.",
        absent_means_default=True,
    )


    def __post_init__(self) -> None:
        values = validate({spec.name: getattr(self, spec.name) for spec in PARAMS})
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: canonical values are set once, here
        object.__setattr__(self, "_subject_names", tuple(parse_subjects(values["subjects"])))
        object.__setattr__(self, "_threshold_steps", MappingProxyType(parse_thresholds(values["thresholds"])))

    @property
    def subject_names(self) -> tuple[str, ...]:
        """The subjects, in the order given (parsed once, at construction)."""
        names: tuple[str, ...] = getattr(self, "_subject_names")  # noqa: B009  # set in __post_init__, not a field
        return names

    @property
    def threshold_steps(self) -> Mapping[int, float]:
        """Refinement thresholds keyed by step at `REFERENCE_STEPS` steps (parsed once, read-only)."""
        steps: Mapping[int, float] = getattr(self, "_threshold_steps")  # noqa: B009  # as above
        return steps

    @property
    def auto_subjects(self) -> bool:
        """No subject words: the host finds the subjects in each prompt."""
        return not self.subject_names

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value: the API's dict form."""
        return {spec.name: getattr(self, spec.name) for spec in PARAMS}


PARAMS: tuple[ParamSpec, ...] = tuple(_spec_of(f) for f in dataclasses.fields(AEParams))
"""Every parameter's spec, in `AEParams`'s field order: the stable positional API order."""
PARAM_NAMES: tuple[str, ...] = tuple(spec.name for spec in PARAMS)
PARAMS_BY_NAME: Mapping[str, ParamSpec] = {spec.name: spec for spec in PARAMS}


def validate(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a full or partial field-name -> raw value mapping; returns every field, typed and canonical.

    Missing fields take their defaults. Raises `ParamsError` with all problems. No subjects is valid: the host finds
    them in the prompt (see AUTOMATIC SUBJECTS in the module doc).
    """
    problems: list[str] = []
    for name in values:
        if name not in PARAMS_BY_NAME:
            problems.append(unknown_name(name))
    result: dict[str, Any] = {}
    for spec in PARAMS:
        raw = values.get(spec.name, spec.default)
        try:
            result[spec.name] = spec.parse(raw)
        except _ValueProblem as problem:
            problems.extend(problem.messages)
    if problems:
        raise ParamsError(problems)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def unknown_name(name: object) -> str:
    return f"AE: unknown parameter {name!r}; valid names are {', '.join(PARAM_NAMES)}"


def describe_value(value: Any) -> str:
    """`'abc' (str)`: the value, shortened, and its type, for messages (module-qualified unless built in, so that
    numpy's `bool` is not mistaken for Python's)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{text} ({name})"


def _check_spec_consistency() -> None:
    """Unique names, labels and infotext keys; canonical defaults (`AEParams` takes its fields from `PARAMS`)."""
    for attribute in ("name", "label", "infotext_key"):
        seen = [getattr(spec, attribute) for spec in PARAMS]
        if len(set(seen)) != len(seen):
            raise AssertionError(f"duplicate ParamSpec.{attribute} in {seen}")
    for spec in PARAMS:
        if spec.parse(spec.default) != spec.default:
            raise AssertionError(f"{spec.name}: the default {spec.default!r} is not canonical")


_check_spec_consistency()
