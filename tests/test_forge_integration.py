"""End-to-end tests against a real Forge-family webui (Forge Neo, or lllyasviel's Forge) over its HTTP API, on the CPU.

They run only when AE_FORGE_WEBUI_DIR names the webui's directory (the one with launch.py; otherwise every test is
skipped, with the reason). Then:

* AE_FORGE_WEBUI_URL set: that running webui is used as it is (started with --api and this extension installed).
* otherwise the webui is started for this test session on a free local port with
  `<python> launch.py --api --port N --skip-prepare-environment --skip-install --skip-torch-cuda-test
  --skip-python-version-check --skip-version-check <AE_FORGE_WEBUI_ARGS>` and stopped afterwards. <python> is
  AE_FORGE_WEBUI_PYTHON (default AE_FORGE_WEBUI_DIR/venv/bin/python). AE_FORGE_WEBUI_ARGS defaults to the CPU flag of
  the tree: `--cpu` for Forge Neo (modules_forge/forge_version.py says version "neo"), `--always-cpu` for Forge.
  Unless those arguments name a checkpoint (`--ckpt`, `--ckpt-dir`, `--ckpt-dirs`), a random-weight SD1.5 checkpoint
  is made by tests/support/forge_checkpoint.py (once; about 4.3 GB, 1.5 min on 2 cores) in AE_FORGE_MODELS_DIR
  (default: <tmp>/forge-models) and passed as `--ckpt-dirs DIR` (Neo has no --ckpt) or `--ckpt FILE` (Forge).
  Likewise a random ControlNet for SD1.5 for Forge's built-in ControlNet (AE_FORGE_CONTROLNET_DIR, default
  <tmp>/forge-controlnet, passed as `--controlnet-dir`) unless those arguments name a ControlNet folder.
  If no entry of extensions/ is this repository, a link extensions/sd-webui-attend-and-excite -> this repository is
  made for the session and removed afterwards. AE_FORGE_WEBUI_TIMEOUT: seconds to wait for the start (900).

Generations are tiny (64x64, 4 Euler steps, one refinement iteration: the requests of tests/test_webui_integration.py,
whose client and helpers this module reuses). Neo loads the checkpoint at the first generation, so the first request
takes longer (about 25 s on 2 CPU cores, then about 10 s per request without A&E and 17 s with it); the module
runs in about 15 minutes there, webui start (about 30 s) included.

SDXL: a random-weight SDXL checkpoint is about 10 GB in float32 and each step takes many seconds on a CPU, so the SDXL
case runs only when AE_FORGE_SDXL_CHECKPOINT names an SDXL checkpoint title the webui lists (e.g. one in the same
--ckpt-dirs folder); otherwise it is skipped.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The A1111 suite's client and helpers (only those: importing its tests or fixtures would collect them here too).
import test_webui_integration as a1111  # noqa: E402
from test_webui_integration import (  # noqa: E402
    BASE_REQUEST,
    DISABLED_ARGS,
    ENABLED,
    PARAM_KEYS,
    SCRIPT_NAME,
    TITLE,
    Result,
    WebUI,
    is_ae_key,
)

from lib_ae.params import PARAMS  # noqa: E402
from lib_ae.webui.wire import from_infotext, to_infotext  # noqa: E402

WEBUI_DIR = os.environ.get("AE_FORGE_WEBUI_DIR", "")
CHECKPOINT_NAME = "sd15-random.safetensors"
CHECKPOINT_FLAGS = ("--ckpt", "--ckpt-dir", "--ckpt-dirs")
CONTROLNET_NAME = "ae-random-controlnet-sd15"
CONTROLNET_FLAGS = ("--controlnet-dir", "--controlnet-dirs")
FIXED_ARGS = [
    "--api", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-python-version-check",
    "--skip-version-check",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not WEBUI_DIR,
    reason="AE_FORGE_WEBUI_DIR is not set: these tests need a real Forge / Forge Neo webui directory "
    "(AE_FORGE_WEBUI_DIR=/path/to/webui AE_FORGE_WEBUI_PYTHON=/path/to/its/venv/bin/python; optionally "
    "AE_FORGE_WEBUI_URL=http://127.0.0.1:7860 to use a running one)",
)

ENABLED_DICT = [{"enabled": True, "subjects": ["cat", "dog"], "max_refinement_steps": 1}]
ENABLED_LIST = [getattr(ENABLED, s.name) for s in PARAMS]


def is_neo(webui_dir: Path) -> bool:
    version = webui_dir / "modules_forge" / "forge_version.py"
    return version.is_file() and re.search(r"""^version\s*=\s*["']neo["']""", version.read_text(), re.M) is not None


def _checkpoint_args(webui_dir: Path, extra: list[str]) -> list[str]:
    """`--ckpt-dirs DIR` (Neo) or `--ckpt FILE` (Forge) for a random SD1.5 checkpoint, unless `extra` names one."""
    if any(arg.split("=", 1)[0] in CHECKPOINT_FLAGS for arg in extra):
        return []
    models = Path(os.environ.get("AE_FORGE_MODELS_DIR") or Path(tempfile.gettempdir()) / "forge-models")
    checkpoint = models / CHECKPOINT_NAME
    if not checkpoint.is_file():
        # A process of its own: the 1e9 random parameters are not kept in the test process.
        maker = REPO / "tests" / "support" / "forge_checkpoint.py"
        done = subprocess.run([sys.executable, str(maker), str(checkpoint)], capture_output=True, text=True)
        assert done.returncode == 0 and checkpoint.is_file(), f"making {checkpoint} failed:\n{done.stderr[-4000:]}"
    return ["--ckpt-dirs", str(models)] if is_neo(webui_dir) else ["--ckpt", str(checkpoint)]


def _controlnet_args(extra: list[str]) -> list[str]:
    """`--controlnet-dir DIR` with a random ControlNet for SD1.5 (made once, about 1.4 GB, half a minute) in
    AE_FORGE_CONTROLNET_DIR (default: <tmp>/forge-controlnet; a folder of its own: Neo lists checkpoints in the
    sub-folders of --ckpt-dirs), unless `extra` names a ControlNet folder."""
    if any(arg.split("=", 1)[0] in CONTROLNET_FLAGS for arg in extra):
        return []
    folder = Path(os.environ.get("AE_FORGE_CONTROLNET_DIR") or Path(tempfile.gettempdir()) / "forge-controlnet")
    model = folder / f"{CONTROLNET_NAME}.safetensors"
    if not model.is_file():
        maker = REPO / "tests" / "support" / "forge_checkpoint.py"
        done = subprocess.run([sys.executable, str(maker), str(model), "--controlnet"], capture_output=True, text=True)
        assert done.returncode == 0 and model.is_file(), f"making {model} failed:\n{done.stderr[-4000:]}"
    return ["--controlnet-dir", str(folder)]


@pytest.fixture(scope="session")
def forge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUI]:
    webui_dir = Path(WEBUI_DIR).resolve()
    if not (webui_dir / "launch.py").is_file() or not (webui_dir / "modules_forge").is_dir():
        pytest.fail(f"AE_FORGE_WEBUI_DIR={WEBUI_DIR} is not a Forge webui directory (no launch.py or modules_forge/)")
    timeout = float(os.environ.get("AE_FORGE_WEBUI_TIMEOUT", "900"))
    url = os.environ.get("AE_FORGE_WEBUI_URL")
    if url:
        client = WebUI(url, None)
        a1111._wait_until_ready(client, time.time() + timeout, None)
        yield client
        return
    default_extra = "--cpu" if is_neo(webui_dir) else "--always-cpu"
    extra = os.environ.get("AE_FORGE_WEBUI_ARGS", default_extra).split()
    extra += _checkpoint_args(webui_dir, extra) + _controlnet_args(extra)
    link = a1111._ensure_extension_link(webui_dir)
    python = os.environ.get("AE_FORGE_WEBUI_PYTHON") or str(webui_dir / "venv" / "bin" / "python")
    port = a1111._free_port()
    command = [python, "launch.py", *FIXED_ARGS, "--port", str(port), *extra]
    log = tmp_path_factory.mktemp("forge") / "forge.log"
    with open(log, "wb") as out:
        out.write(("$ " + " ".join(command) + "\n").encode())
        out.flush()
        process = subprocess.Popen(
            command, cwd=webui_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    client = WebUI(f"http://127.0.0.1:{port}", log)
    try:
        a1111._wait_until_ready(client, time.time() + timeout, process)
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
        print(f"Forge log: {log}")


def _extension_errors(webui: WebUI) -> str:
    """Tracebacks in the webui's log that pass through this extension's files (empty if none, or no log)."""
    if webui.log is None or not webui.log.exists():
        return ""
    text = webui.log.read_text(errors="replace")
    blocks = re.split(r"\n(?=\S)", text)
    ours = [b for b in blocks if "Traceback" in b and ("lib_ae" in b or "attend_and_excite" in b)]
    return "\n".join(ours)


@pytest.fixture(scope="session")
def absent(forge: WebUI) -> Result:
    return forge.txt2img()


@pytest.fixture(scope="session")
def enabled_list(forge: WebUI) -> Result:
    return forge.txt2img(alwayson_scripts={TITLE: {"args": ENABLED_LIST}})


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_script_is_listed_with_its_arguments(forge: WebUI) -> None:
    status, scripts = forge.request("GET", "/sdapi/v1/scripts")
    assert status == 200
    assert SCRIPT_NAME in scripts["txt2img"] and SCRIPT_NAME in scripts["img2img"]
    status, info = forge.request("GET", "/sdapi/v1/script-info")
    ours = [s for s in info if s["name"] == SCRIPT_NAME]
    assert sorted(s["is_img2img"] for s in ours) == [False, True]
    for script in ours:
        assert script["is_alwayson"] is True
        assert [a["label"] for a in script["args"]] == [spec.label for spec in PARAMS]
        for arg, spec in zip(script["args"], PARAMS):
            assert arg["value"] == spec.default, spec.name


def test_absent_image_has_no_ae_keys(absent: Result) -> None:
    assert absent.ae_fields() == {}
    assert absent.image


@pytest.mark.parametrize(
    "args",
    [pytest.param(DISABLED_ARGS, id="list"), pytest.param([{"enabled": False, "subjects": "cat, dog"}], id="dict")],
)
def test_disabled_is_byte_identical_to_absent(forge: WebUI, absent: Result, args: list[Any]) -> None:
    disabled = forge.txt2img(alwayson_scripts={TITLE: {"args": args}})
    assert disabled.infotext == absent.infotext
    assert disabled.image == absent.image


def test_enabled_runs_attend_and_excite(forge: WebUI, enabled_list: Result, absent: Result) -> None:
    fields = enabled_list.ae_fields()
    assert "AE error" not in fields, f"{fields.get('AE error')}\n{_extension_errors(forge)}"
    assert "AE trace" in fields, fields
    params = {key: value for key, value in fields.items() if key in PARAM_KEYS}
    # "auto" is written as what the (SD1.5) model was run with.
    ran = dataclasses.replace(ENABLED, normalize_eot="off")
    assert params == {key: str(value) for key, value in to_infotext(ran).items()}
    assert from_infotext(fields, strict=True) == ran.as_dict()
    # The A&E keys are the only difference in the infotext, and A&E moved the latent.
    assert {k: v for k, v in enabled_list.fields.items() if not is_ae_key(k)} == absent.fields
    assert a1111._pixels(enabled_list.image) != a1111._pixels(absent.image)


def test_enabled_is_reproducible(forge: WebUI, enabled_list: Result) -> None:
    again = forge.txt2img(alwayson_scripts={TITLE: {"args": ENABLED_LIST}})
    assert again.infotext == enabled_list.infotext
    assert again.image == enabled_list.image


def test_dict_form_equals_the_list_form(forge: WebUI, enabled_list: Result) -> None:
    named = forge.txt2img(alwayson_scripts={TITLE: {"args": ENABLED_DICT}})
    assert named.infotext == enabled_list.infotext
    assert named.image == enabled_list.image


def test_subject_not_in_prompt_is_reported_and_the_others_run(forge: WebUI) -> None:
    result = forge.txt2img(
        alwayson_scripts={TITLE: {"args": [{"enabled": True, "subjects": "cat, horse", "max_refinement_steps": 1}]}}
    )
    fields = result.ae_fields()
    assert result.image
    assert fields["AE"] == "v1" and fields["AE subjects"] == "cat, horse"
    assert "'horse' is not in the prompt" in fields["AE error"]
    assert "AE trace" in fields, fields  # A&E still ran on "cat"


@pytest.mark.parametrize(
    ("args", "fields", "error", "same"),
    [c[1:] for c in a1111.HOSTILE_API_CASES],
    ids=[c[0] for c in a1111.HOSTILE_API_CASES],
)
def test_hostile_api_input(forge: WebUI, args: Any, fields: dict[str, Any], error: str | None, same: bool) -> None:
    """The A1111 suite's table of hostile API inputs, against Forge: the request succeeds, "AE error" says what was
    wrong (None: no error), and where A&E refuses before touching the latent the pixels are those without A&E."""
    result = forge.txt2img(alwayson_scripts={TITLE: {"args": args}}, **fields)
    reported = result.ae_fields().get("AE error")
    if error is None:
        assert reported is None, reported
    else:
        assert reported is not None and error in reported, reported
    if same:
        assert a1111._pixels(result.image) == _without_ae(forge, fields)


_baselines: dict[str, bytes] = {}


def _without_ae(forge: WebUI, fields: dict[str, Any]) -> bytes:
    """The pixels of the same request without alwayson_scripts (computed once per request)."""
    key = json.dumps(fields, sort_keys=True)
    if key not in _baselines:
        _baselines[key] = a1111._pixels(forge.txt2img(**fields).image)
    return _baselines[key]


def test_no_extension_traceback_in_the_log(forge: WebUI, enabled_list: Result) -> None:
    assert _extension_errors(forge) == ""


def test_sdxl_runs_attend_and_excite(request: pytest.FixtureRequest) -> None:
    checkpoint = os.environ.get("AE_FORGE_SDXL_CHECKPOINT")
    if not checkpoint:
        pytest.skip(
            "AE_FORGE_SDXL_CHECKPOINT is not set: an SDXL checkpoint (random weights: ~10 GB in float32) is too "
            "slow to make and run on a CPU by default"
        )
    forge: WebUI = request.getfixturevalue("forge")
    override = {"override_settings": {"sd_model_checkpoint": checkpoint}, "override_settings_restore_afterwards": True}
    body = {**BASE_REQUEST, **override, "width": 128, "height": 128}
    without = forge.txt2img(base=False, **body)
    result = forge.txt2img(base=False, **body, alwayson_scripts={TITLE: {"args": ENABLED_DICT}})
    fields = result.ae_fields()
    assert "AE error" not in fields, fields.get("AE error")
    assert "AE trace" in fields, fields
    assert a1111._pixels(result.image) != a1111._pixels(without.image)


def test_png_info_reads_the_ae_parameters(forge: WebUI, enabled_list: Result) -> None:
    """What paste and "Send to" read: Forge's PNG-info parse of the image (with the infotext-pasted callbacks)
    gives back every A&E parameter the image was made with."""
    status, data = forge.request("POST", "/sdapi/v1/png-info", {"image": base64.b64encode(enabled_list.image).decode()})
    assert status == 200, data
    assert data["info"] == enabled_list.infotext
    ae = {key: value for key, value in data["parameters"].items() if key in PARAM_KEYS}
    ran = dataclasses.replace(ENABLED, normalize_eot="off")
    assert from_infotext({k: str(v) for k, v in ae.items()}, strict=True) == ran.as_dict()


def test_infotext_request_field_restores_the_arguments(forge: WebUI, absent: Result, enabled_list: Result) -> None:
    # Only the infotext: prompt, seed, size, steps, sampler and the A&E args all come back from it (Forge keeps
    # A1111's Api.apply_infotext and the script's paste fields).
    request = {"infotext": absent.infotext, "save_images": False, "send_images": True}
    status, data = forge.request("POST", "/sdapi/v1/txt2img", request)
    if status == 500 and "parameterized generic" in str(data):
        # Forge Neo 2.26's own bug, without this extension's keys: its "Styles" paste field answers gr.skip() (a
        # gradio 4 update dict) where no style is named, and Api.apply_infotext then calls isinstance(value,
        # list[str]). No infotext request can succeed there.
        pytest.skip(f"this Forge's API rejects every `infotext` request field (a host bug): {data.get('message')}")
    restored = forge.txt2img(base=False, **{**request, "infotext": enabled_list.infotext})
    assert restored.ae_fields() == enabled_list.ae_fields()
    assert restored.infotext == enabled_list.infotext
    assert restored.image == enabled_list.image


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M"])
def test_other_samplers_run_attend_and_excite(forge: WebUI, sampler: str) -> None:
    """DDIM hands the denoiser Forge's VP latent and timestep (the pass maps them as Forge does); DPM++ 2M is a
    multistep sampler in sigma space. Both run A&E, and it moves their images."""
    enabled = forge.txt2img(sampler_name=sampler, alwayson_scripts={TITLE: {"args": ENABLED_DICT}})
    fields = enabled.ae_fields()
    assert "AE error" not in fields, f"{fields.get('AE error')}\n{_extension_errors(forge)}"
    assert "AE trace" in fields, fields
    assert a1111._pixels(enabled.image) != _without_ae(forge, {"sampler_name": sampler})


def _images(forge: WebUI, **fields: Any) -> tuple[list[bytes], list[str]]:
    """Every image of a txt2img response (grids, cells, our pictures) with its infotext."""
    status, data = forge.request("POST", "/sdapi/v1/txt2img", {**BASE_REQUEST, **fields})
    assert status == 200, f"HTTP {status}: {str(data)[:2000]}{forge.log_tail()}"
    info = json.loads(data["info"])
    return [base64.b64decode(image) for image in data["images"]], info["infotexts"]


def test_heatmaps_are_added_after_the_image(forge: WebUI, enabled_list: Result) -> None:
    images, infotexts = _images(forge, alwayson_scripts={TITLE: {"args": [{**ENABLED_DICT[0], "heatmaps": True}]}})
    assert len(images) == 3  # the image, then its heatmap strip and its trace plot
    assert a1111._pixels(images[0]) == a1111._pixels(enabled_list.image)  # drawing them changes no pixel
    assert "AE heatmaps: True" in infotexts[0]
    assert all(a1111._pixels(picture) != a1111._pixels(images[0]) for picture in images[1:])


def _xyz_args(forge: WebUI, axis: str, values: str) -> list[Any]:
    """The X/Y/Z plot's positional arguments: X = `axis` over `values`, Y and Z none, the cells returned. Forge keeps
    A1111's order of arguments; Neo adds "Row Count" before "Grid Margins"."""
    status, info = forge.request("GET", "/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = xyz["args"][0]["choices"]
    nothing = labels.index("Nothing")
    # legend off, the cells in, no sub grids, fixed seeds
    args = [labels.index(axis), values, None, nothing, "", None, nothing, "", None,
            False, True, False, False, False, False, False]  # fmt: skip
    has_row_count = [a["label"] for a in xyz["args"]][-3] == "Row Count"
    return args + ([0, 0, False] if has_row_count else [0, False])


def test_xyz_plot_over_an_ae_parameter(forge: WebUI) -> None:
    """An "[AE] Scale factor" axis over A&E enabled in the request: scale 0 leaves the latent as it is (the image
    without A&E), 20 moves it, and each cell's infotext records its own value."""
    plain = _without_ae(forge, {})
    images, infotexts = _images(
        forge,
        script_name="x/y/z plot",
        script_args=_xyz_args(forge, "[AE] Scale factor", "0, 20"),
        alwayson_scripts={TITLE: {"args": ENABLED_DICT}},
    )
    cells, cell_infotexts = images[1:3], infotexts[1:3]
    assert len(images) == 3, len(images)  # the grid, then its two cells
    assert a1111._pixels(cells[0]) == plain
    assert a1111._pixels(cells[1]) != plain
    scales = [re.search(r"AE scale factor: ([^,]+)", text) for text in cell_infotexts]
    assert [m.group(1) if m else None for m in scales] == ["0.0", "20.0"], cell_infotexts


def _hint() -> str:
    """A drawn edge map (ControlNet's module None takes it as it is), base64 PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 12, 30, 44), outline="white", width=2)
    draw.rectangle((36, 16, 58, 52), outline="white", width=2)
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_beside_forges_builtin_controlnet(forge: WebUI) -> None:
    """Forge's own ControlNet (sd_forge_controlnet), one unit with a random ControlNet for SD1.5: A&E runs beside it
    (its residuals enter the pass as constants), moves the image, and the same request gives the same bytes."""
    status, listed = forge.request("GET", "/controlnet/model_list")
    assert status == 200, listed
    model = next((m for m in listed["model_list"] if CONTROLNET_NAME in m), None)
    assert model is not None, f"{CONTROLNET_NAME} is not among Forge's ControlNet models: {listed}"
    unit = {"enabled": True, "module": "None", "model": model, "image": _hint(), "weight": 1.0,
            "resize_mode": "Crop and Resize", "processor_res": 64, "guidance_start": 0.0, "guidance_end": 1.0,
            "control_mode": "Balanced", "pixel_perfect": False}  # fmt: skip
    controlnet_only = forge.txt2img(alwayson_scripts={"ControlNet": {"args": [unit]}})
    assert a1111._pixels(controlnet_only.image) != _without_ae(forge, {}), "the ControlNet unit changed nothing"
    both = {"ControlNet": {"args": [unit]}, TITLE: {"args": ENABLED_DICT}}
    enabled = forge.txt2img(alwayson_scripts=both)
    fields = enabled.ae_fields()
    assert "AE error" not in fields, f"{fields.get('AE error')}\n{_extension_errors(forge)}"
    assert "AE trace" in fields, fields
    assert a1111._pixels(enabled.image) != a1111._pixels(controlnet_only.image)
    again = forge.txt2img(alwayson_scripts=both)
    assert again.image == enabled.image and again.infotext == enabled.infotext


def test_every_sampler_is_run_or_refused_with_a_message(forge: WebUI, enabled_list: Result) -> None:
    """Every sampler this Forge offers (its /sdapi/v1/samplers): the refused ones (`lib_ae.forge.model
    .UNSUPPORTED_SAMPLERS`) say so in "AE error" and keep the image; every other one runs A&E at as many steps as
    Euler does, with no error. One request per sampler (about 15 s each on a CPU)."""
    from lib_ae.forge.model import UNSUPPORTED_SAMPLERS

    status, samplers = forge.request("GET", "/sdapi/v1/samplers")
    assert status == 200, samplers
    names = [sampler["name"] for sampler in samplers]
    assert "Euler" in names and "DDIM" in names, names
    euler_steps = re.match(r'"?(\d+) steps', enabled_list.ae_fields()["AE trace"])
    assert euler_steps is not None, enabled_list.ae_fields()
    problems: dict[str, str] = {}
    for name in names:
        result = forge.txt2img(sampler_name=name, alwayson_scripts={TITLE: {"args": ENABLED_DICT}})
        fields = result.ae_fields()
        if name in UNSUPPORTED_SAMPLERS:
            if f"sampler {name} is not supported" not in fields.get("AE error", ""):
                problems[name] = f"refused without the message: {fields}"
            continue
        trace = re.match(r'"?(\d+) steps', fields.get("AE trace", ""))
        if "AE error" in fields or trace is None:
            problems[name] = f"A&E did not run cleanly: {fields}"
        elif trace.group(1) != euler_steps.group(1):
            problems[name] = f"A&E ran at {trace.group(1)} steps, Euler at {euler_steps.group(1)}: {fields['AE trace']}"
    assert problems == {}, f"{problems}\n{_extension_errors(forge)}"
