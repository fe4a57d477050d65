"""The prompt-only softmax (the official SD 2.1 mode, `normalize_eot`): "auto", the default, turns it on for
SD2-family checkpoints, as the authors run SD 2.1, and off for the others; the infotext records what was used, and an
explicit setting holds on every model (issue 20, fix 1)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite
from support.webui_host import WebUI, ae_keys


def run_recording(webui: WebUI, monkeypatch: pytest.MonkeyPatch, **named: Any) -> tuple[dict[str, str], list[bool]]:
    used: list[bool] = []
    original = AttendAndExcite.__init__

    def spy(self: AttendAndExcite, *a: Any, **kw: Any) -> None:
        original(self, *a, **kw)
        used.append(self.config.normalize_eot)

    monkeypatch.setattr(AttendAndExcite, "__init__", spy)
    _, processed = webui.run(webui.args(enabled=True, subjects="cat, dog", **named))
    return ae_keys(processed.infotexts[0], webui.host), used


@pytest.mark.parametrize("sd2, expected", [(False, "off"), (True, "on")])
def test_auto_follows_the_model_family(webui: WebUI, monkeypatch: pytest.MonkeyPatch, sd2: bool, expected: str) -> None:
    monkeypatch.setattr(webui.host.model, "is_sd2", sd2, raising=False)
    keys, used = run_recording(webui, monkeypatch)
    assert keys["AE prompt-only softmax"] == expected  # what the image was made with, not "auto"
    assert used == [expected == "on"]


@pytest.mark.parametrize("setting", ["on", "off"])
def test_an_explicit_setting_holds_on_every_model(webui: WebUI, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setattr(webui.host.model, "is_sd2", True, raising=False)
    keys, used = run_recording(webui, monkeypatch, normalize_eot=setting)
    assert keys["AE prompt-only softmax"] == setting and used == [setting == "on"]


def test_the_mode_changes_the_image_on_sd2(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webui.host.model, "is_sd2", True, raising=False)
    _, auto = webui.run(webui.args(enabled=True, subjects="cat, dog"))
    _, off = webui.run(webui.args(enabled=True, subjects="cat, dog", normalize_eot="off"))
    assert not torch.equal(torch.stack(auto.images), torch.stack(off.images))
