"""A1111's wire formats of the parameters: the script's positional args or the API's dict (`alwayson_scripts`), and
the infotext written into every image. Pure Python over `lib_ae.params`, shared by the hosts that keep A1111's
extension surface (A1111 and the Forges).

STABILITY. The positional order is `PARAMS` order, which clients (scripts, saved API payloads) rely on, and the
infotext keys are written into images forever (see `lib_ae.params`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lib_ae.params import (
    AUTO_SUBJECTS_TEXT,
    PARAM_NAMES,
    PARAMS,
    PARAMS_BY_NAME,
    AEParams,
    ParamsError,
    ParamSpec,
    describe_value,
    parse_value,
    validate,
)

logger = logging.getLogger(__name__)

INFOTEXT_FORMAT = "v1"
"""Value written under the presence key "AE" (the `enabled` parameter's infotext key).

The key's presence says that A&E was on for the image; its value names the version of *this* set of infotext keys and
their meaning, so that a later release can read old images. It is deliberately not "AE" itself (A1111 writes a
parameter whose value equals its key as the bare key, which its own parser then cannot read back) and not a
number-x-number value (which A1111's parser splits into two keys)."""


def from_script_args(args: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> AEParams:
    """The parameters from A1111's slice of script args (UI or `alwayson_scripts[...]["args"]`), with X/Y/Z
    `overrides` (field name -> raw value) written over single values.

    Two forms:
    (a) positional, in `PARAMS` order; fewer values than parameters leave the rest at their defaults, more is an error;
    (b) a dict as the first arg, keyed by field name, e.g. `{"enabled": true, "subjects": ["cat", "dog"]}`; missing
        keys take their defaults (so `enabled` must be given to switch A&E on), unknown keys are an error. The args
        after the dict are A1111's UI defaults (the API fills the rest of the script's slice with them) and are not
        read; a second dict among them is an error (its keys would be silently lost).
    Raises `ParamsError` listing every problem.
    """
    named, problems = _named_args(args)
    named.update(overrides or {})
    try:
        values = validate(named)
    except ParamsError as error:
        raise ParamsError(problems + error.messages) from None
    if problems:
        raise ParamsError(problems)
    return AEParams(**values)


def requested_params(args: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> AEParams | None:
    """The parameters of this generation, or None when A&E is off. Raises `ParamsError`.

    The one place that tells enabled from disabled: only the enable flag is looked at before deciding that A&E is
    off, so a disabled script never complains about its other values. An invalid flag (e.g. the API's
    `{"enabled": "yes", "subject": "cat"}`) is reported together with every other problem of the same args.
    """
    named, _ = _named_args(args)
    named.update(overrides or {})
    try:
        enabled = parse_value("enabled", named.get("enabled", PARAMS_BY_NAME["enabled"].default))
    except ParamsError:
        from_script_args(args, overrides)  # raises with all the problems, the flag's included
        raise
    if not enabled:
        return None
    return from_script_args(args, overrides)


def _named_args(args: Sequence[Any]) -> tuple[dict[Any, Any], list[str]]:
    """The one place that tells the API's dict form from the positional form: field name -> raw value, and the
    problems of the form itself (not a list, too many values, a second dict, keys that are not text)."""
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise ParamsError([f"AE: script args must be a list, got {describe_value(args)}"])
    problems: list[str] = []
    if args and isinstance(args[0], Mapping):
        mapping = args[0]
        problems += [
            f"AE: dict keys must be parameter names (text), got {describe_value(key)}"
            for key in mapping
            if not isinstance(key, str)
        ]
        problems += [
            f"AE: only the first dict of the args is read, but arg {index + 1} is a dict too "
            f"({describe_value(extra)}); put all the parameters in one dict"
            for index, extra in enumerate(args[1:], start=1)
            if isinstance(extra, Mapping)
        ]
        return {key: value for key, value in mapping.items() if isinstance(key, str)}, problems
    if len(args) > len(PARAMS):
        problems.append(
            f"AE: got {len(args)} positional args but there are only {len(PARAMS)} parameters "
            f"({', '.join(PARAM_NAMES)})"
        )
    return dict(zip(PARAM_NAMES, args)), problems


# ---------------------------------------------------------------------------------------------------------------------
# Infotext


def to_infotext(params: AEParams) -> dict[str, str | int | float | bool]:
    """The generation-parameter entries for `p.extra_generation_params`; empty when A&E is disabled.

    "AE: v1" marks that A&E was on (see `INFOTEXT_FORMAT`); every other parameter follows under its infotext key,
    always all of them, so an image records the complete settings even when they are defaults. Values are plain
    str/int/float/bool; A1111 renders and quotes them (`infotext_utils.quote`).
    """
    if not params.enabled:
        return {}
    entries: dict[str, str | int | float | bool] = {PARAMS_BY_NAME["enabled"].infotext_key: INFOTEXT_FORMAT}
    for spec in PARAMS:
        if spec.name != "enabled":
            entries[spec.infotext_key] = getattr(params, spec.name)
    if params.auto_subjects:
        entries[PARAMS_BY_NAME["subjects"].infotext_key] = AUTO_SUBJECTS_TEXT
    return entries


def from_infotext(fields: Mapping[str, Any], *, strict: bool = False) -> dict[str, Any]:
    """Field name -> typed value for every A&E key in parsed infotext fields (A1111 hands over strings).

    `enabled` is always in the result: True iff any A&E key is present, so pasting an infotext without A&E switches
    the checkbox off. With A&E keys present, a parameter that is `absent_means_default` and missing takes its default
    (the image was written before that parameter existed). A text value A1111's parser split as "number x number" (a
    subject like "3x4") is rejoined.
    A value that does not parse is skipped with a warning (a hand-edited infotext should not break a paste), or with
    `strict` raises `ParamsError` listing every such value.
    """
    result: dict[str, Any] = {}
    problems: list[str] = []
    present = False
    for spec in PARAMS:
        raw = _infotext_value(fields, spec)
        if raw is None:
            continue
        present = True
        if spec.name == "enabled":
            if str(raw) != INFOTEXT_FORMAT:
                logger.warning("AE infotext format %r is not %r; reading the keys it shares", raw, INFOTEXT_FORMAT)
            continue
        try:
            result[spec.name] = parse_value(spec.name, raw)
        except ParamsError as error:
            problems.extend(error.messages)
    if problems:
        if strict:
            raise ParamsError(problems)
        for message in problems:
            logger.warning("ignoring an infotext value: %s", message)
    if present:
        for spec in PARAMS:
            if spec.absent_means_default and _infotext_value(fields, spec) is None:
                result[spec.name] = spec.default
    return {"enabled": present, **result}


def _infotext_value(fields: Mapping[str, Any], spec: ParamSpec) -> Any:
    key = spec.infotext_key
    if key in fields:
        return fields[key]
    if spec.kind == "str" and f"{key}-1" in fields and f"{key}-2" in fields:
        # A1111's parser turned "3x4" into "<key>-1": "3", "<key>-2": "4" (it is meant for sizes); undo it exactly.
        return f"{fields[f'{key}-1']}x{fields[f'{key}-2']}"
    return None
