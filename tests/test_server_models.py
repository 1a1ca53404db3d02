"""Several checkpoints behind one server (`--model-dir`) and A1111's settings, driven the way the
popular clients drive them: webuiapi 0.9.17 itself, Open WebUI's and SillyTavern's request shapes
(their sources: open_webui/routers/images.py, src/endpoints/stable-diffusion.js).

Two exports of the tiny model with different weights (seeds 0 and 1) sit in one folder; a real
server process serves it with the torch stack unimportable. "That model's image" is the library's
image of that folder alone, compared pixel for pixel (the same code on the same provider).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from test_prompt_comments import a1111_strip_comments  # noqa: E402
from test_prompt_styles import a1111_apply_styles_to_prompt, a1111_load_from_csv  # noqa: E402
from test_server import CLEAN_ENV, LAUNCHER, REPO, Server, _free_port, _wait_healthy, decode_png  # noqa: E402

from runtime import Pipeline  # noqa: E402

# A1111's styles.csv: a {prompt} template carrying a comment, an appended style, a negative-only one.
STYLES = (
    'name,prompt,negative_prompt\n"cat ears","{prompt}, cat ears # kept out by the comment rule",lowres\n'
    "quality,masterpiece,\nclean,,blurry\n"
)
JOB = {"prompt": "1girl, cat ears", "negative_prompt": "lowres", "steps": 3, "width": 64, "height": 64,
       "seed": 77, "sampler_name": "Euler", "cfg_scale": 7}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tiny_fp16: Path, tmp_path_factory) -> Path:
    from export.exporter import ExportOptions, run_export
    from export.random_model import build_and_save

    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_fp16, folder / "tiny-a")
    other = build_and_save("tiny", tmp_path_factory.mktemp("tiny-seed1"), seed=1)["single_file"]
    # tiny-b has clip skip 2 only; tiny-a the default 2,1.
    run_export(ExportOptions(model=str(other), output=folder / "nested" / "tiny-b", precision="fp16", clip_skips=(2,)))
    return folder


@pytest.fixture(scope="module")
def styles_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("styles") / "styles.csv"
    path.write_text(STYLES, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(model_dir: Path, styles_file: Path, tmp_path_factory) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-c", LAUNCHER, "--model-dir", str(model_dir), "--port", str(port),
               "--provider", "cpu", "--threads", "1", "--styles-file", str(styles_file)]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=CLEAN_ENV, stdout=sink, stderr=subprocess.STDOUT)
    started = Server(f"http://127.0.0.1:{port}", process, log)
    _wait_healthy(started, None)
    yield started
    process.terminate()
    process.wait(20)


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> dict[str, np.ndarray]:
    """JOB's image from each folder alone, by the library (A1111's Euler, Automatic schedule, NV noise)."""
    images = {}
    for name in ("tiny-a", "nested/tiny-b"):
        pipe = Pipeline.from_pretrained(model_dir / name, provider="cpu", threads=1)
        out = pipe(JOB["prompt"], JOB["negative_prompt"], num_inference_steps=3, guidance_scale=7.0, width=64,
                   height=64, seed=77, sampler="euler", schedule="a1111", rng="nv")  # fmt: skip
        images[name] = np.asarray(out.images[0])
        if name == "tiny-a":
            out = pipe(JOB["prompt"], JOB["negative_prompt"], num_inference_steps=3, guidance_scale=7.0, width=64,
                       height=64, seed=77, sampler="euler", schedule="a1111", rng="nv", clip_skip=1)  # fmt: skip
            images["tiny-a clip skip 1"] = np.asarray(out.images[0])
    assert np.abs(images["tiny-a"].astype(int) - images["nested/tiny-b"]).max() > 8  # the two models differ
    return images


def _models(client: httpx.Client) -> dict[str, dict]:
    return {item["filename"]: item for item in client.get("/sdapi/v1/sd-models").json()}


def _image(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    return decode_png(answer.json()["images"][0])[0]


def test_sd_models_lists_both_as_a1111(server: Server, tiny_source: dict[str, Path]) -> None:
    with server.client() as client:
        models = _models(client)
    assert set(models) == {"tiny-a", "nested/tiny-b"}
    first = models["tiny-a"]
    # The source checkpoint's hashes, recorded at export, as A1111 computes them: the file's sha256, its first 10.
    sha256 = hashlib.sha256(tiny_source["single_file"].read_bytes()).hexdigest()
    assert first["sha256"] == sha256 and first["hash"] == sha256[:10]
    assert first["title"] == f"tiny [{first['hash']}]" and first["model_name"] == "tiny"
    assert set(first) == {"title", "model_name", "hash", "sha256", "filename", "config"}


def test_webuiapi_switches_the_model(server: Server, expected: dict[str, np.ndarray]) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    host, port = server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    with server.client() as client:
        titles = {name: item["title"] for name, item in _models(client).items()}
    assert api.util_get_model_names() == sorted(titles.values())
    for name in ("nested/tiny-b", "tiny-a"):
        api.util_set_model(titles[name])
        api.util_wait_for_ready(check_interval=0.2)
        assert api.get_options()["sd_model_checkpoint"] == titles[name]
        result = api.txt2img(
            **{key: value for key, value in JOB.items() if key != "sampler_name"}, sampler_name="Euler"
        )
        np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected[name])
        assert result.info["sd_model_hash"] == titles[name][-11:-1]


def test_open_webui_round_trip_and_sillytavern_override(server: Server, expected: dict[str, np.ndarray]) -> None:
    with server.client() as client:
        titles = {name: item["title"] for name, item in _models(client).items()}
        options = client.get("/sdapi/v1/options").json()
        options["sd_model_checkpoint"] = titles["nested/tiny-b"]  # Open WebUI: the whole dict, one key changed
        assert client.post("/sdapi/v1/options", json=options).status_code == 200
        np.testing.assert_array_equal(_image(client.post("/sdapi/v1/txt2img", json=JOB)), expected["nested/tiny-b"])
        # SillyTavern: override_settings for one request; the default stays.
        override = {"sd_model_checkpoint": titles["tiny-a"], "CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"}
        body = {**JOB, "override_settings": override, "override_settings_restore_afterwards": True}
        np.testing.assert_array_equal(_image(client.post("/sdapi/v1/txt2img", json=body)), expected["tiny-a"])
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["nested/tiny-b"]
        # restore_afterwards false: the override becomes the setting, as in A1111.
        body["override_settings_restore_afterwards"] = False
        np.testing.assert_array_equal(_image(client.post("/sdapi/v1/txt2img", json=body)), expected["tiny-a"])
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["tiny-a"]


def test_options_refuse_as_a1111_and_apply_the_keys_acted_on(server: Server, expected: dict) -> None:
    with server.client() as client:
        current = "tiny-a"
        assert client.post(
            "/sdapi/v1/options", json={"sd_model_checkpoint": _models(client)[current]["title"]}
        ).is_success
        unknown = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
        assert unknown.status_code == 422 and unknown.json()["error"] == "RuntimeError"
        assert "model 'nope.safetensors' not found" in unknown.json()["detail"]
        bad_key = client.post("/sdapi/v1/options", json={"not_a_setting": 1})
        assert bad_key.status_code == 422 and bad_key.json()["error"] == "KeyError"
        assert client.post("/sdapi/v1/options", json={"not_a_setting": None}).status_code == 200  # A1111: no-op
        # Clip skip: a setting for every request, checked against the checkpoint it will apply to.
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
        skip_1 = expected["tiny-a clip skip 1"]
        np.testing.assert_array_equal(_image(client.post("/sdapi/v1/txt2img", json=JOB)), skip_1)
        clip = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": _models(client)["nested/tiny-b"]["title"],
                                                          "CLIP_stop_at_last_layers": 1})  # fmt: skip
        assert clip.status_code == 422 and "python -m export --clip-skip 2,1" in clip.json()["detail"]
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == _models(client)[current]["title"]
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        # override_settings: that request only.
        once = {**JOB, "override_settings": {"sd_model_checkpoint": _models(client)["tiny-a"]["title"],
                                             "CLIP_stop_at_last_layers": 1}}  # fmt: skip
        answer = client.post("/sdapi/v1/txt2img", json=once)
        np.testing.assert_array_equal(_image(answer), expected["tiny-a clip skip 1"])
        assert json.loads(answer.json()["info"])["clip_skip"] == 1
        np.testing.assert_array_equal(_image(client.post("/sdapi/v1/txt2img", json=JOB)), expected["tiny-a"])
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        # A known A1111 setting this runtime does not use is kept and echoed; trailing slashes work.
        assert client.post("/sdapi/v1/options/", json={"jpeg_quality": 90, "samples_format": "jpg"}).status_code == 200
        assert client.get("/sdapi/v1/options/").json()["samples_format"] == "jpg"
        # Settings acted on become every request's default: ENSD only reaches ancestral samplers (A1111).
        ancestral = {**JOB, "sampler_name": "Euler a"}
        before = _image(client.post("/sdapi/v1/txt2img", json=ancestral))
        assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337}).status_code == 200
        after = client.post("/sdapi/v1/txt2img", json=ancestral)
        assert "ENSD: 31337" in json.loads(after.json()["info"])["infotexts"][0]
        assert np.abs(_image(after).astype(int) - before).max() > 0
        assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 0}).status_code == 200
        # enable_prompt_comments off: '#' is prompt text again.
        commented = {**JOB, "prompt": JOB["prompt"] + " # hidden"}
        with_comments = _image(client.post("/sdapi/v1/txt2img", json=commented))
        assert client.post("/sdapi/v1/options", json={"enable_prompt_comments": False}).status_code == 200
        without = _image(client.post("/sdapi/v1/txt2img", json=commented))
        assert client.post("/sdapi/v1/options", json={"enable_prompt_comments": True}).status_code == 200
    np.testing.assert_array_equal(with_comments, expected[current])
    assert np.abs(without.astype(int) - expected[current]).max() > 0


def test_unload_reload_and_refresh_answer_as_a1111(server: Server, model_dir: Path) -> None:
    with server.client() as client:
        # ooba posts a JSON string body "" to both.
        unload = client.post("/sdapi/v1/unload-checkpoint", content=b'""', headers={"content-type": "application/json"})
        assert unload.status_code == 200 and unload.json() == {}
        reload = client.post("/sdapi/v1/reload-checkpoint", content=b'""', headers={"content-type": "application/json"})
        assert reload.status_code == 200 and reload.json() == {}
        shutil.copytree(model_dir / "tiny-a", model_dir / "tiny-copy")  # same weights, same title: listed once
        (model_dir / "tiny-copy" / "manifest.json").unlink()
        refresh = client.post("/sdapi/v1/refresh-checkpoints")
        assert refresh.status_code == 200 and refresh.json() is None
        assert set(_models(client)) == {"tiny-a", "nested/tiny-b"}
        assert _image(client.post("/sdapi/v1/txt2img", json=JOB)).shape == (64, 64, 3)


def test_the_rest_of_the_api_answers_a1111_shapes(server: Server) -> None:
    with server.client() as client:
        memory = client.get("/sdapi/v1/memory").json()
        ram = memory["ram"]
        assert (
            ram["used"] > 0 and ram["free"] + ram["used"] == ram["total"] and memory["cuda"] == {"error": "unavailable"}
        )
        assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
        assert [
            (item["name"], item["is_alwayson"], item["is_img2img"])
            for item in client.get("/sdapi/v1/script-info").json()
        ] == [("controlnet", True, False), ("controlnet", True, True)]
        assert client.get("/sdapi/v1/face-restorers").json() == []
        assert client.get("/sdapi/v1/hypernetworks").json() == []
        flags = client.get("/sdapi/v1/cmd-flags").json()
        assert flags["api"] is True and flags["ckpt_dir"] is True and flags["api_auth"] is None
        skip = client.post("/sdapi/v1/skip")
        assert skip.status_code == 200 and skip.json() is None
        interrogate = client.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
        assert interrogate.status_code == 501 and interrogate.json()["error"] == "NotImplemented"
        assert client.get("/sdapi/v1/sd-models/").json() == client.get("/sdapi/v1/sd-models").json()


def _a1111_prompts(prompt: str, negative: str, names: list[str]) -> tuple[str, str]:
    """What A1111 generates from: STYLES read and applied as A1111 does (setup_prompts; an unknown
    name is no style), then comments stripped (its comments script runs after)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "styles.csv"
        path.write_text(STYLES, encoding="utf-8")
        rows = a1111_load_from_csv(path)
    positive = a1111_apply_styles_to_prompt(prompt, [rows[name].prompt for name in names if name in rows])
    negative = a1111_apply_styles_to_prompt(negative, [rows[name].negative_prompt for name in names if name in rows])
    return a1111_strip_comments(positive), a1111_strip_comments(negative)


def test_styles_apply_as_a1111(server: Server, expected: dict[str, np.ndarray]) -> None:
    with server.client() as client:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": _models(client)["tiny-a"]["title"]})
        assert client.get("/sdapi/v1/prompt-styles").json() == [
            {
                "name": "cat ears",
                "prompt": "{prompt}, cat ears # kept out by the comment rule",
                "negative_prompt": "lowres",
            },
            {"name": "quality", "prompt": "masterpiece", "negative_prompt": ""},
            {"name": "clean", "prompt": "", "negative_prompt": "blurry"},
        ]
        # The AIYA bot's shape (core/): sampler_index, styles ["None"] when none is picked, denoising_strength null.
        aiya = {**JOB, "sampler_index": "Euler", "styles": ["None"], "denoising_strength": None}
        del aiya["sampler_name"]
        np.testing.assert_array_equal(_image(client.post("/sdapi/v1/txt2img", json=aiya)), expected["tiny-a"])
        # JOB's prompts come from one style: the image is JOB's, and the texts are A1111's for these styles.
        names = ["cat ears", "None"]
        answer = client.post(
            "/sdapi/v1/txt2img", json={**JOB, "prompt": "1girl", "negative_prompt": "", "styles": names}
        )
        np.testing.assert_array_equal(_image(answer), expected["tiny-a"])
        info = json.loads(answer.json()["info"])
        prompt, negative = _a1111_prompts("1girl", "", names)
        assert (info["all_prompts"], info["all_negative_prompts"], info["styles"]) == ([prompt], [negative], names)
        assert info["infotexts"][0].startswith(f"{prompt}\nNegative prompt: {negative}\n")
        names = ["quality", "cat ears", "clean"]  # applied in order, each to the result of the one before
        answer = client.post("/sdapi/v1/txt2img", json={**JOB, "styles": names, "steps": 1})
        info = json.loads(answer.json()["info"])
        assert (info["all_prompts"][0], info["all_negative_prompts"][0]) == _a1111_prompts(
            JOB["prompt"], JOB["negative_prompt"], names
        )
        unknown = client.post("/sdapi/v1/txt2img", json={**JOB, "styles": ["cat_ears"]})
        assert unknown.status_code == 422 and unknown.json()["field"] == "styles"
        assert "'cat ears'" in unknown.json()["detail"]


def test_styles_reach_the_hires_prompts_as_a1111(model_dir: Path, styles_file: Path) -> None:
    """A1111's setup_prompts: an empty hr_prompt is the prompt, then styles apply to the hires prompts too."""
    from runtime.pipeline import Planner
    from runtime.server.config import Limits
    from runtime.server.mapping import build_plan
    from runtime.server.schemas import Txt2ImgRequest
    from runtime.text.styles import StyleLibrary

    planner = Planner.from_folder(model_dir / "tiny-a")
    styles = StyleLibrary(styles_file).find(["quality", "clean"])
    hires = {**JOB, "enable_hr": True, "hr_scale": 1.5, "styles": ["quality", "clean"]}
    for hr_prompt, hr_negative in (("", ""), ("a cat", ""), ("", "ugly")):
        body = Txt2ImgRequest(**hires, hr_prompt=hr_prompt, hr_negative_prompt=hr_negative)
        plan = build_plan(planner, body, Limits(), styles=styles).batches[0].hires
        expected = _a1111_prompts(hr_prompt or JOB["prompt"], hr_negative or JOB["negative_prompt"], body.styles)
        assert (plan.prompt, plan.negative_prompt) == expected


def _data_url(b64: str) -> str:
    return "data:image/png;base64," + b64


def test_openoutpaint_and_webuiapi_request_shapes(server: Server) -> None:
    """openOutpaint (js/): alwayson_scripts {} always, refiner fields, a scheduler label, data-URL
    images, extra keys, trailing slashes; webuiapi: nulls for every field it does not set."""
    from test_server import _png_base64

    with server.client() as client:
        titles = {name: item["title"] for name, item in _models(client).items()}
        assert client.post("/sdapi/v1/options/", json={"sd_model_checkpoint": titles["tiny-a"]}).is_success
        outpaint = {
            **JOB, "steps": 1, "scheduler": "Karras", "alwayson_scripts": {}, "refiner_checkpoint": "None",
            "refiner_switch_at": 0.8, "hr_resize_x": 0, "hr_resize_y": 0, "inpainting_mask_weight": 1,
        }  # fmt: skip
        answer = client.post("/sdapi/v1/txt2img/", json=outpaint)
        assert answer.status_code == 200 and json.loads(answer.json()["info"])["scheduler"] == "Karras"
        # A refiner naming the request's own checkpoint switches nothing in A1111 either.
        assert client.post("/sdapi/v1/txt2img", json={**outpaint, "refiner_checkpoint": "tiny-a"}).status_code == 200
        webuiapi = {**JOB, "steps": 1, "script_name": None, "hr_checkpoint_name": None, "hr_sampler_name": None,
                    "hr_scheduler": None, "scheduler": "automatic", "sampler_index": "Euler", "styles": []}  # fmt: skip
        assert client.post("/sdapi/v1/txt2img", json=webuiapi).status_code == 200
        init, mask = _png_base64(), _png_base64(mode="L", box=(16, 16, 48, 48))
        img2img = {**JOB, "steps": 2, "denoising_strength": 0.5, "alwayson_scripts": {}}
        plain = _image(client.post("/sdapi/v1/img2img", json={**img2img, "init_images": [init], "mask": mask}))
        dataurl = {**img2img, "init_images": [_data_url(init)], "mask": _data_url(mask)}
        np.testing.assert_array_equal(_image(client.post("/sdapi/v1/img2img/", json=dataurl)), plain)
        extras = {"upscaler_1": "Lanczos", "upscaling_resize": 2}
        upscaled = client.post("/sdapi/v1/extra-single-image/", json={**extras, "image": _data_url(init)})
        assert (
            upscaled.json()["image"]
            == client.post("/sdapi/v1/extra-single-image", json={**extras, "image": init}).json()["image"]
        )


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"script_name": "X/Y/Z plot"}, "script_name", "Script 'X/Y/Z plot' not found"),
        (
            {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "model": "canny"}]}}},
            "alwayson_scripts.ControlNet.args.0.model",
            "unknown ControlNet model 'canny'; this model has: none",
        ),
        (
            {"alwayson_scripts": {"controlnet": {"args": []}, "Dynamic Prompts v2": {"args": []}}},
            "alwayson_scripts.Dynamic Prompts v2",
            "Script 'Dynamic Prompts v2' not found",
        ),
        ({"refiner_checkpoint": "sd_xl_refiner_1.0"}, "refiner_checkpoint", "Could not find checkpoint with name"),
        ({"refiner_checkpoint": "nested/tiny-b"}, "refiner_checkpoint", "switching checkpoints during sampling"),
        ({"disable_extra_networks": True}, "disable_extra_networks", "always applied"),
    ],
)
def test_what_a1111_would_refuse_or_this_server_cannot_do_is_a_422(
    server: Server, change: dict, field: str, words: str
) -> None:
    with server.client() as client:
        titles = {name: item["title"] for name, item in _models(client).items()}
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles["tiny-a"]}).is_success
        answer = client.post("/sdapi/v1/txt2img", json={**JOB, **change})
    assert answer.status_code == 422 and answer.json()["field"] == field and words in answer.json()["detail"]


def test_scheduler_names_labels_and_the_hires_same_as_first_pass_words(model_dir: Path) -> None:
    """SillyTavern sends the scheduler's name, openOutpaint its label, A1111's UI "Use same ..." words."""
    from runtime.errors import InvalidRequestError
    from runtime.pipeline import Planner
    from runtime.server.config import Limits
    from runtime.server.mapping import build_plan, check_checkpoint_fields
    from runtime.server.schemas import Txt2ImgRequest

    planner = Planner.from_folder(model_dir / "tiny-a")

    def plan(**fields):
        return build_plan(planner, Txt2ImgRequest(**{**JOB, **fields}), Limits())

    assert plan(scheduler="Karras").batches[0].request.schedule == "karras"
    assert plan(scheduler="karras").batches[0].request.schedule == "karras"
    assert plan(scheduler="").scheduler.label == "Automatic"
    hires = {"enable_hr": True, "hr_scale": 1.5, "scheduler": "Karras"}
    same = plan(**hires, hr_sampler_name="Use same sampler", hr_scheduler="Use same scheduler").batches[0].hires
    assert same.sampler == "euler"
    np.testing.assert_array_equal(same.schedule.sigmas, plan(**hires).batches[0].hires.schedule.sigmas)
    assert plan(**hires, hr_scheduler="karras").batches[0].hires is not None
    with pytest.raises(InvalidRequestError) as error:
        plan(**hires, hr_scheduler="Exponential")
    assert error.value.field == "hr_scheduler" and "Karras" in error.value.message
    body = Txt2ImgRequest(**JOB, **hires, hr_checkpoint_name="Use same checkpoint")
    check_checkpoint_fields(body, "tiny [x]", lambda name: None)  # nothing to find: the same checkpoint
    with pytest.raises(InvalidRequestError) as error:
        check_checkpoint_fields(body.model_copy(update={"hr_checkpoint_name": "other"}), "tiny [x]", lambda _: None)
    assert error.value.field == "hr_checkpoint_name"
