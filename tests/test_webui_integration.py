"""End-to-end tests against a real AUTOMATIC1111 WebUI (v1.10.x) over its HTTP API.

They run only when AE_WEBUI_DIR names a webui checkout (otherwise every test is skipped, with the reason). Then:

* AE_WEBUI_URL set (e.g. http://127.0.0.1:7860): that running webui is used as it is (started with --api and this
  extension installed); nothing is started or stopped.
* otherwise the webui in AE_WEBUI_DIR is started for this test session on a free local port with
  `<python> launch.py --api --port N --skip-prepare-environment --skip-install --skip-torch-cuda-test
  --skip-version-check --no-download-sd-model <AE_WEBUI_ARGS>` and stopped afterwards. <python> is AE_WEBUI_PYTHON
  (default AE_WEBUI_DIR/venv/bin/python); AE_WEBUI_ARGS defaults to "--use-cpu all --no-half --precision full" (add
  e.g. "--ckpt models/Stable-diffusion/x.safetensors"); the environment is passed on (HF_HOME, HF_HUB_OFFLINE, ...).
  If no entry of AE_WEBUI_DIR/extensions is this repository, a link extensions/sd-webui-attend-and-excite -> this
  repository is made for the session and removed afterwards. AE_WEBUI_TIMEOUT: seconds to wait for the start (900).

Generations are tiny (64x64, 4 Euler steps, one refinement iteration) so that a CPU-only webui can run them; the
checks do not depend on the model's weights (a random-weight checkpoint is fine): the API and infotext round trips,
and that a disabled A&E gives the same PNG bytes as no A&E at all.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib_ae.params import PARAMS, AEParams  # noqa: E402
from lib_ae.webui.wire import from_infotext, to_infotext  # noqa: E402

WEBUI_DIR = os.environ.get("AE_WEBUI_DIR", "")

pytestmark = pytest.mark.skipif(
    not WEBUI_DIR,
    reason="AE_WEBUI_DIR is not set: these tests need a real A1111 webui checkout (AE_WEBUI_DIR=/path/to/webui; "
    "optionally AE_WEBUI_URL=http://127.0.0.1:7860 to use a running one)",
)

TITLE = "Attend and Excite"
SCRIPT_NAME = "attend and excite"
LINK_NAME = "sd-webui-attend-and-excite"
BASE_REQUEST: dict[str, Any] = {
    "prompt": "a cat and a dog",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 4,
    "sampler_name": "Euler",
    "scheduler": "Automatic",
    "seed": 1234,
    "subseed": -1,
    "cfg_scale": 7,
    "batch_size": 1,
    "n_iter": 1,
    "save_images": False,
    "send_images": True,
}
ENABLED = AEParams(enabled=True, subjects="cat, dog", max_refinement_steps=1)
DISABLED_ARGS = [getattr(AEParams(enabled=False, subjects="cat, dog", max_refinement_steps=1), s.name) for s in PARAMS]
REQUEST_TIMEOUT = 1800

# A1111's infotext parameter syntax (modules/infotext_utils.py re_param), to read the last line back here.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
PARAM_KEYS = {spec.infotext_key for spec in PARAMS}


def is_ae_key(key: str) -> bool:
    """The extension's infotext keys: the parameters' ("AE", "AE subjects", ...) and its reports ("AE error",
    "AE trace", ...)."""
    return key == "AE" or key.startswith("AE ")


# ---------------------------------------------------------------------------------------------------------------------
# The webui


class WebUI:
    def __init__(self, url: str, log: Path | None) -> None:
        self.url = url.rstrip("/")
        self.log = log

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text.decode(errors="replace")

    def txt2img(self, *, base: bool = True, **fields: Any) -> "Result":
        body = {**(BASE_REQUEST if base else {}), **fields}
        status, data = self.request("POST", "/sdapi/v1/txt2img", body)
        assert status == 200, f"HTTP {status}: {str(data)[:2000]}{self.log_tail()}"
        info = json.loads(data["info"])
        assert data["images"], "the webui returned no image"
        return Result(data["images"][0], info["infotexts"][0], info)

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n--- webui log (tail) ---\n" + self.log.read_text(errors="replace")[-4000:]


class Result:
    def __init__(self, image_b64: str, infotext: str, info: dict[str, Any]) -> None:
        self.image = base64.b64decode(image_b64)
        self.infotext = infotext
        self.info = info

    @property
    def fields(self) -> dict[str, str]:
        """The parameters of the infotext's last line, unquoted as A1111's parser does."""
        last = self.infotext.strip().split("\n")[-1]
        fields = {}
        for key, value in RE_PARAM.findall(last):
            value = value.strip()
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = json.loads(value)
            fields[key.strip()] = value
        return fields

    def ae_fields(self) -> dict[str, str]:
        return {key: value for key, value in self.fields.items() if is_ae_key(key)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_extension_link(webui_dir: Path) -> Path | None:
    """Link this repository into the webui's extensions/ unless an entry already is it; the link made, if any."""
    extensions = webui_dir / "extensions"
    for entry in extensions.iterdir() if extensions.is_dir() else []:
        if entry.resolve() == REPO:
            return None
    link = extensions / LINK_NAME
    if link.exists() or link.is_symlink():
        pytest.fail(f"{link} exists and is not this repository ({REPO}); install the extension there or remove it")
    extensions.mkdir(exist_ok=True)
    link.symlink_to(REPO, target_is_directory=True)
    return link


def _wait_until_ready(webui: WebUI, deadline: float, process: subprocess.Popen[bytes] | None) -> None:
    """Ready = the startup finished (its "Startup time" line, when we started it) and script-info lists the script.
    The API's routes answer before Api.__init__ has computed the default script args (api.py L258-270), so a
    txt2img call sent in between fails; the log line comes after that."""
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the webui exited with code {process.returncode}{webui.log_tail()}")
        started = process is None or (
            webui.log is not None and webui.log.exists() and "Startup time" in webui.log.read_text(errors="replace")
        )
        if started:
            try:
                status, data = webui.request("GET", "/sdapi/v1/script-info")
            except (OSError, ValueError):
                status, data = 0, None
            if status == 200 and any(s.get("name") == SCRIPT_NAME for s in data or []):
                return
            if status == 200:
                pytest.fail(f"the webui runs but does not list the {TITLE!r} script{webui.log_tail()}")
        time.sleep(2)
    pytest.fail(f"the webui did not become ready in time{webui.log_tail()}")


@pytest.fixture(scope="session")
def webui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUI]:
    webui_dir = Path(WEBUI_DIR).resolve()
    if not (webui_dir / "launch.py").is_file():
        pytest.fail(f"AE_WEBUI_DIR={WEBUI_DIR} is not a webui checkout (no launch.py)")
    timeout = float(os.environ.get("AE_WEBUI_TIMEOUT", "900"))
    url = os.environ.get("AE_WEBUI_URL")
    if url:
        client = WebUI(url, None)
        _wait_until_ready(client, time.time() + timeout, None)
        yield client
        return
    link = _ensure_extension_link(webui_dir)
    python = os.environ.get("AE_WEBUI_PYTHON") or str(webui_dir / "venv" / "bin" / "python")
    port = _free_port()
    extra = os.environ.get("AE_WEBUI_ARGS", "--use-cpu all --no-half --precision full").split()
    command = [
        python, "launch.py", "--api", "--port", str(port), "--skip-prepare-environment", "--skip-install",
        "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model", *extra,
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("webui") / "webui.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=webui_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    client = WebUI(f"http://127.0.0.1:{port}", log)
    try:
        _wait_until_ready(client, time.time() + timeout, process)
        yield client
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the session we started (launch.py and its children)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if link is not None:
            link.unlink()


@pytest.fixture(scope="session")
def absent(webui: WebUI) -> Result:
    return webui.txt2img()


@pytest.fixture(scope="session")
def enabled_list(webui: WebUI) -> Result:
    return webui.txt2img(alwayson_scripts={TITLE: {"args": [getattr(ENABLED, s.name) for s in PARAMS]}})


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_script_is_listed_with_its_arguments(webui: WebUI) -> None:
    status, scripts = webui.request("GET", "/sdapi/v1/scripts")
    assert status == 200
    assert SCRIPT_NAME in scripts["txt2img"] and SCRIPT_NAME in scripts["img2img"]
    status, info = webui.request("GET", "/sdapi/v1/script-info")
    ours = [s for s in info if s["name"] == SCRIPT_NAME]
    assert sorted(s["is_img2img"] for s in ours) == [False, True]
    for script in ours:
        assert script["is_alwayson"] is True
        assert [a["label"] for a in script["args"]] == [spec.label for spec in PARAMS]
        for arg, spec in zip(script["args"], PARAMS):
            assert arg["value"] == spec.default, spec.name  # Settings defaults unchanged on a test webui
            if spec.kind in ("int", "float"):
                assert (arg["minimum"], arg["maximum"], arg["step"]) == (spec.minimum, spec.maximum, spec.step)


def test_absent_image_has_no_ae_keys(absent: Result) -> None:
    assert absent.ae_fields() == {}


@pytest.mark.parametrize(
    "args",
    [pytest.param(DISABLED_ARGS, id="list"), pytest.param([{"enabled": False, "subjects": "cat, dog"}], id="dict")],
)
def test_disabled_is_byte_identical_to_absent(webui: WebUI, absent: Result, args: list[Any]) -> None:
    disabled = webui.txt2img(alwayson_scripts={TITLE: {"args": args}})
    assert disabled.infotext == absent.infotext
    assert disabled.image == absent.image


def test_list_form_writes_every_parameter_into_the_infotext(enabled_list: Result, absent: Result) -> None:
    fields = enabled_list.ae_fields()
    assert "AE error" not in fields, fields.get("AE error")
    params = {key: value for key, value in fields.items() if key in PARAM_KEYS}
    # "auto" is written as what the (SD1.5) model was run with; report keys such as "AE trace" are ignored.
    as_run = dataclasses.replace(ENABLED, normalize_eot="off")
    assert params == {key: str(value) for key, value in to_infotext(as_run).items()}
    assert from_infotext(fields, strict=True) == ENABLED.as_dict() | {"normalize_eot": "off"}
    # The A&E keys are the only difference in the infotext.
    assert {k: v for k, v in enabled_list.fields.items() if not is_ae_key(k)} == absent.fields


def test_dict_form_equals_the_list_form(webui: WebUI, enabled_list: Result) -> None:
    named = webui.txt2img(
        alwayson_scripts={TITLE: {"args": [{"enabled": True, "subjects": ["cat", "dog"], "max_refinement_steps": 1}]}}
    )
    assert named.infotext == enabled_list.infotext
    assert named.image == enabled_list.image


def test_infotext_request_field_restores_the_arguments(webui: WebUI, enabled_list: Result) -> None:
    # Only the infotext: prompt, seed, size, steps, sampler and the A&E args all come back from it
    # (Api.apply_infotext: request fields that are not set, and the script inputs of the paste fields).
    restored = webui.txt2img(base=False, infotext=enabled_list.infotext, save_images=False, send_images=True)
    assert restored.ae_fields() == enabled_list.ae_fields()
    assert restored.infotext == enabled_list.infotext
    assert restored.image == enabled_list.image


def test_subject_not_in_prompt_is_reported_and_the_image_kept(webui: WebUI) -> None:
    result = webui.txt2img(
        alwayson_scripts={TITLE: {"args": [{"enabled": True, "subjects": "cat, horse", "max_refinement_steps": 1}]}}
    )
    fields = result.ae_fields()
    assert result.image
    assert fields["AE"] == "v1" and fields["AE subjects"] == "cat, horse"
    assert "'horse' is not in the prompt" in fields["AE error"]


def test_wrong_types_are_reported_and_generation_goes_on(webui: WebUI, absent: Result) -> None:
    result = webui.txt2img(alwayson_scripts={TITLE: {"args": [True, 123, "big"]}})
    fields = result.ae_fields()
    assert set(fields) == {"AE error"}, fields
    assert "invalid settings, A&E not applied" in fields["AE error"]
    assert "AE subjects: expected text" in fields["AE error"] and "AE scale factor: expected a number" in fields["AE error"]
    assert {k: v for k, v in result.fields.items() if not is_ae_key(k)} == absent.fields


# The hostile-input table of tests/test_hostile.py, the cases a client can send over HTTP, against the real host: the
# request succeeds, an image comes back, and "AE error" says exactly what was wrong (None: no error). `same`: the image
# must be byte-identical to the one without A&E (A&E refused before touching the latent).
ON_FAST = {"enabled": True, "subjects": "cat, dog", "max_refinement_steps": 1}
HOSTILE_API_CASES: list[tuple[str, Any, dict[str, Any], str | None, bool]] = [
    ("enabled-string-yes", [{"enabled": "yes", "subjects": "cat"}], {}, "AE: expected true or false, got 'yes' (str)", True),
    ("enabled-null", [None, "cat"], {}, "AE: expected true or false, got None (NoneType)", True),
    ("args-nested-list", [[True, "cat"]], {}, "got [True, 'cat'] (list)", True),
    ("subjects-number", [{"enabled": True, "subjects": 5}], {}, "AE subjects: expected text or a list of texts, got 5", True),
    ("scale-1e9", [{**ON_FAST, "scale_factor": 1e9}], {}, "AE scale factor: expected a number between 0 and 100", True),
    ("scale-string-nan", [{**ON_FAST, "scale_factor": "nan"}], {}, "AE scale factor: expected a number", True),
    ("threshold-above-one", [{**ON_FAST, "thresholds": "0:1.5"}], {}, "the threshold must be a number between 0 and 1", True),
    ("iterations-negative", [{**ON_FAST, "max_refinement_steps": -1}], {}, "AE refinement iterations: expected a whole number", True),
    ("unknown-key", [{**ON_FAST, "scale": 5}], {}, "AE: unknown parameter 'scale'", True),
    # No subject words means automatic subjects (issue 13): "a cat and a dog" gives cat and dog, so the image changes.
    ("too-few-positional", [True], {}, None, False),
    ("empty-subjects", [{**ON_FAST, "subjects": " , ,"}], {}, None, False),
    ("auto-no-noun", [{**ON_FAST, "subjects": "auto"}], {"prompt": "very beautiful"},
     "automatic subjects: no noun found in the prompt", True),
    ("bind-without-modifier", [{**ON_FAST, "method": "bind"}], {}, "bind: the prompt has no modifier to bind", True),
    ("fifty-subjects", [{**ON_FAST, "subjects": ", ".join(["cat", "dog"] + [f"thing{i}" for i in range(48)])}], {},
     "48 subjects are not in the prompt", False),
    ("emoji-subject", [{**ON_FAST, "subjects": "🐱, dog"}], {"prompt": "a 🐱 and a dog"}, None, False),
    ("subject-inside-emphasis", [{**ON_FAST, "subjects": "cat"}], {"prompt": "a ((cat:1.4)) and a dog"}, None, False),
    ("subject-after-break", [{**ON_FAST, "subjects": "cat"}], {"prompt": "a dog BREAK a cat"}, None, False),
    ("subject-in-second-and", [{**ON_FAST, "subjects": "dog"}], {"prompt": "a cat AND a dog"},
     "subject 'dog' is only in AND sub-prompt 2", True),
    ("prompt-of-400-tokens", [{**ON_FAST, "subjects": "cat"}], {"prompt": " ".join(["a stone"] * 199) + " and a cat"},
     None, False),
    ("empty-prompt", [{**ON_FAST, "subjects": "cat"}], {"prompt": ""}, "subject 'cat' is not in the prompt", True),
    ("unsupported-sampler", [ON_FAST], {"sampler_name": "UniPC"}, "sampler UniPC is not supported", True),
]


@pytest.mark.parametrize(("args", "fields", "error", "same"), [c[1:] for c in HOSTILE_API_CASES],
                         ids=[c[0] for c in HOSTILE_API_CASES])
def test_hostile_api_input(webui: WebUI, args: Any, fields: dict[str, Any], error: str | None, same: bool) -> None:
    result = webui.txt2img(alwayson_scripts={TITLE: {"args": args}}, **fields)
    reported = result.ae_fields().get("AE error")
    if error is None:
        assert reported is None, reported
    else:
        assert reported is not None and error in reported, reported
    if same:
        # Pixels, not PNG bytes: the PNG carries the infotext, which here has the "AE error" entry.
        assert _pixels(result.image) == _without_ae(webui, fields)


_baselines: dict[str, bytes] = {}


def _pixels(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


def _without_ae(webui: WebUI, fields: dict[str, Any]) -> bytes:
    """The pixels of the same request without alwayson_scripts (deterministic: computed once per request)."""
    key = json.dumps(fields, sort_keys=True)
    if key not in _baselines:
        _baselines[key] = _pixels(webui.txt2img(**fields).image)
    return _baselines[key]
