"""ldm-serve end to end: the real app on the session's Ray instance, called with the clients people use
(webuiapi, the openai package, requests) on 127.0.0.1, and compared pixel for pixel with the Pipeline."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

requests = pytest.importorskip("requests")
pytest.importorskip("ray.serve")

PROMPT = "a red circle on a blue background"
STEPS = 6


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def direct():
    """The Pipeline as the server runs it: the embedded model with a batch-invariant UNet."""
    from ldm_engine import Pipeline
    from ldm_engine.optimize.batch_invariant import make_batch_invariant

    pipe = Pipeline.from_pretrained()
    make_batch_invariant(pipe.model.unet)
    return pipe


def _solo(pipe, seed, steps=STEPS, guidance=4.0, sampler="ddim", eta=None, prompt=PROMPT, size=64):
    out = pipe(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler, eta=eta,
               height=size, width=size, progress=False)
    return _pixels(out.images[0])


def test_webuiapi_txt2img_matches_the_pipeline(serve_url, direct):
    webuiapi = pytest.importorskip("webuiapi")
    port = int(serve_url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DDIM", steps=STEPS)
    result = api.txt2img(prompt=PROMPT, seed=11, cfg_scale=4.0, width=64, height=64, batch_size=2, eta=0.0)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    info = result.info
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11 and info["steps"] == STEPS
    assert info["sampler_name"] == "DDIM" and info["width"] == 64 and info["sd_model_name"] == "shapes"
    assert len(info["infotexts"]) == 2 and "Seed: 12" in info["infotexts"][1]
    raw = _png(result.json["images"][1])
    assert "Seed: 12" in raw.text["parameters"] and "Sampler: DDIM" in raw.text["parameters"]
    for i, seed in enumerate((11, 12)):  # each image is what the Pipeline gives that seed alone
        assert np.array_equal(_pixels(result.images[i]), _solo(direct, seed))


def test_openai_client_generate_b64_and_url(serve_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
    out = client.images.generate(model="shapes", prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                 extra_body={"steps": STEPS})
    assert len(out.data) == 2 and out.created > 0
    image = _png(out.data[0].b64_json)
    assert image.size == (64, 64) and "parameters" in image.text
    assert out.data[0].revised_prompt == PROMPT
    by_url = client.images.generate(model="shapes", prompt=PROMPT, n=1, size="64x64", response_format="url",
                                    extra_body={"steps": STEPS})
    got = requests.get(by_url.data[0].url, timeout=30)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)
    models = client.models.list()
    assert {m.id for m in models.data} == {"shapes", "shapes-b"}
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="no-such-model", prompt=PROMPT, size="64x64")
    assert "not served here" in str(e.value)


def test_openai_edit_with_alpha_mask(serve_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = repaint

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    out = client.images.edit(model="shapes", image=("in.png", png(image), "image/png"),
                             mask=("mask.png", png(mask), "image/png"), prompt=PROMPT, n=1, size="64x64",
                             response_format="b64_json", extra_body={"steps": STEPS})
    result = _pixels(_png(out.data[0].b64_json))
    assert (result[:16] == np.array([30, 60, 200])).all()  # outside the mask: the input
    assert (result[16:48, 16:48] != np.array([30, 60, 200])).any()  # inside: repainted
    bad_mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model="shapes", image=("in.png", png(image), "image/png"),
                           mask=("mask.png", png(bad_mask), "image/png"), prompt=PROMPT, size="64x64")
    assert "mask" in str(e.value)


def test_a1111_info_routes_and_model_switch(serve_url):
    base = f"{serve_url}/sdapi/v1"
    names = {s["name"] for s in requests.get(f"{base}/samplers", timeout=30).json()}
    assert {"DDIM", "Euler a", "DPM++ 2M"} <= names
    models = requests.get(f"{base}/sd-models", timeout=30).json()
    assert [m["model_name"] for m in models] == ["shapes", "shapes-b"]
    assert requests.get(f"{base}/options", timeout=30).json()["sd_model_checkpoint"].startswith("shapes [")
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "sampler_name": "DDIM"}
    try:
        assert requests.post(f"{base}/options", json={"sd_model_checkpoint": "shapes-b"}, timeout=30).status_code == 200
        info = json.loads(requests.post(f"{base}/txt2img", json=body, timeout=60).json()["info"])
        assert info["sd_model_name"] == "shapes-b"
        override = dict(body, override_settings={"sd_model_checkpoint": "shapes"})
        assert json.loads(requests.post(f"{base}/txt2img", json=override, timeout=60).json()["info"])[
            "sd_model_name"] == "shapes"
    finally:
        requests.post(f"{base}/options", json={"sd_model_checkpoint": "shapes"}, timeout=30)
    assert requests.post(f"{base}/options", json={"sd_model_checkpoint": "nope"}, timeout=30).status_code == 404
    assert requests.get(f"{serve_url}/health", timeout=10).json() == {"status": "ok"}
    metrics = requests.get(f"{serve_url}/metrics", timeout=10).text
    for name in ("ldm_requests_total", "ldm_queue_depth", "ldm_batch_images_bucket", "ldm_step_seconds_bucket"):
        assert name in metrics


def test_img2img_and_inpainting_through_a1111(serve_url):
    base = f"{serve_url}/sdapi/v1"
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mbuf = io.BytesIO()
    mask.save(mbuf, format="PNG")
    body = {"prompt": PROMPT, "init_images": [f"data:image/png;base64,{b64}"], "steps": 4, "sampler_name": "DDIM",
            "denoising_strength": 0.5, "width": 64, "height": 64, "seed": 3}
    out = requests.post(f"{base}/img2img", json=body, timeout=60)
    assert out.status_code == 200, out.text
    assert out.json()["parameters"]["init_images"] is None  # A1111 does not echo the input images
    for fill in (0, 1, 2, 3):
        masked = dict(body, mask=base64.b64encode(mbuf.getvalue()).decode(), inpainting_fill=fill, mask_blur=0)
        out = requests.post(f"{base}/img2img", json=masked, timeout=60)
        assert out.status_code == 200, out.text
        pixels = _pixels(_png(out.json()["images"][0]))
        assert (pixels[:, 32:] == np.array([200, 40, 40])).all()  # outside the mask: the input, as A1111 pastes it
        assert (pixels[:, :32] != np.array([200, 40, 40])).any()


def test_jobs_progress_result_and_cancel(serve_url):
    base = f"{serve_url}/v1/jobs"
    job = requests.post(base, json={"prompt": PROMPT, "steps": 4, "width": 64, "height": 64, "seed": 5,
                                    "sampler_name": "DDIM"}, timeout=30)
    assert job.status_code == 202
    job_id = job.json()["id"]
    deadline = time.time() + 60
    while (view := requests.get(f"{base}/{job_id}", timeout=30).json())["state"] not in ("done", "failed"):
        assert time.time() < deadline
        time.sleep(0.05)
    assert view["state"] == "done" and view["step"] == view["steps"] == 4
    assert json.loads(view["result"]["info"])["all_seeds"] == [5]

    long = requests.post(base, json={"prompt": PROMPT, "steps": 150, "width": 64, "height": 64}, timeout=30).json()
    while (view := requests.get(f"{base}/{long['id']}", timeout=30).json())["step"] < 3:
        assert view["state"] in ("queued", "running") and time.time() < deadline + 60
        time.sleep(0.02)
    assert view["eta_s"] is not None and view["eta_s"] > 0, view
    cancelled = requests.delete(f"{base}/{long['id']}", timeout=30).json()
    at_cancel = cancelled["step"]
    time.sleep(1.0)
    final = requests.get(f"{base}/{long['id']}", timeout=30).json()
    assert final["state"] == "cancelled"
    assert final["step"] <= at_cancel + 2  # the answer to one step report, read at the next step
    nxt = requests.post(f"{serve_url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 64,
                                                                "height": 64}, timeout=60)
    assert nxt.status_code == 200
    assert requests.get(f"{base}/nope", timeout=30).status_code == 404


def test_a1111_progress_and_interrupt(serve_url):
    base = f"{serve_url}/sdapi/v1"
    answer = {}

    def long_request():
        answer["r"] = requests.post(f"{base}/txt2img", json={"prompt": PROMPT, "steps": 150, "width": 64,
                                                             "height": 64}, timeout=120)

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.time() + 60
    while (p := requests.get(f"{base}/progress", timeout=30).json())["state"]["sampling_step"] < 3:
        assert time.time() < deadline
        time.sleep(0.02)
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 150
    started = time.time()
    assert requests.post(f"{base}/interrupt", timeout=30).status_code == 200
    thread.join(60)
    assert answer["r"].status_code == 409 and time.time() - started < 10
    assert requests.get(f"{base}/progress", timeout=30).json()["state"]["interrupted"]


def test_concurrent_requests_are_batched_and_each_matches_its_solo_image(serve_url, direct):
    seeds = list(range(100, 108))
    body = {"prompt": PROMPT, "steps": STEPS, "width": 64, "height": 64, "sampler_name": "DDIM", "cfg_scale": 4.0}

    def call(seed):
        r = requests.post(f"{serve_url}/sdapi/v1/txt2img", json=dict(body, seed=seed), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, seeds))
    for seed, answer in zip(seeds, answers):
        assert json.loads(answer["info"])["all_seeds"] == [seed]
        assert np.array_equal(_pixels(_png(answer["images"][0])), _solo(direct, seed))
    metrics = requests.get(f"{serve_url}/metrics", timeout=10).text
    batches = [line for line in metrics.splitlines() if line.startswith("ldm_batch_images_count")]
    sums = [line for line in metrics.splitlines() if line.startswith("ldm_batch_images_sum")]
    assert float(sums[0].split()[-1]) / float(batches[0].split()[-1]) > 1.0  # some requests shared a batch


@pytest.mark.parametrize("path,body,status,needle", [
    ("/sdapi/v1/txt2img", "{not json", 400, "JSON"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": "many"}, 400, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": -64, "height": 64}, 400, "width"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 100000, "height": 100000}, 400, "max_pixels"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 64, "height": 64, "steps": 100000}, 400, "max_steps"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 64, "height": 64, "sampler_name": "Nope"}, 400, "sampler"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 64, "height": 64, "batch_size": 1000}, 400, "max_images"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 72, "height": 64}, 400, "multiple"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": ["@@not base64@@"]}, 400, "base64"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [base64.b64encode(b"hello").decode()]}, 400, "image"),
    ("/v1/images/generations", {"prompt": PROMPT, "size": "64x"}, 400, "size"),
    ("/v1/images/generations", {"prompt": PROMPT, "n": 0}, 400, "n"),
    ("/v1/images/generations", {"prompt": PROMPT, "model": "unknown"}, 404, "unknown"),
])
def test_bad_input_is_a_4xx_naming_the_problem(serve_url, path, body, status, needle):
    kwargs = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = requests.post(f"{serve_url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    text = r.text
    assert needle.lower() in text.lower()
    if path.startswith("/v1/"):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(f"{serve_url}/health", timeout=10).status_code == 200


def test_decompression_bomb_and_mismatched_mask_are_refused(serve_url):
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # a few KB declaring 400 megapixels
    body = {"prompt": PROMPT, "init_images": [base64.b64encode(bomb.getvalue()).decode()]}
    r = requests.post(f"{serve_url}/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 400 and "pixels" in r.text
    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64)).save(image, format="PNG")
    Image.new("L", (32, 32), 255).save(mask, format="PNG")
    body = {"prompt": PROMPT, "init_images": [base64.b64encode(image.getvalue()).decode()],
            "mask": base64.b64encode(mask.getvalue()).decode(), "width": 64, "height": 64}
    r = requests.post(f"{serve_url}/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 400 and "mask" in r.text


def test_auth_backpressure_on_the_strict_app(strict_url):
    assert requests.get(f"{strict_url}/health", timeout=10).status_code == 200  # open
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64}
    assert requests.post(f"{strict_url}/sdapi/v1/txt2img", json=body, timeout=60).status_code == 401
    wrong = requests.post(f"{strict_url}/sdapi/v1/txt2img", json=body, timeout=60, auth=("user", "nope"))
    assert wrong.status_code == 401 and "credentials" in wrong.text
    assert requests.post(f"{strict_url}/sdapi/v1/txt2img", json=body, timeout=60, auth=("user", "pass")).ok
    bearer = {"Authorization": "Bearer sk-test"}
    assert requests.get(f"{strict_url}/v1/models", headers=bearer, timeout=30).ok
    bad = requests.get(f"{strict_url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"

    # one request at a time, one queued: of 6 at once some must be turned away, none may hang
    long = dict(body, steps=40)

    def a1111(_):
        return requests.post(f"{strict_url}/sdapi/v1/txt2img", json=long, timeout=120, auth=("user", "pass"))

    def oai(_):
        return requests.post(f"{strict_url}/v1/images/generations", headers=bearer, timeout=120,
                             json={"prompt": PROMPT, "size": "64x64", "steps": 40})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(a1111, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes, codes
    assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 503)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(oai, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 429 in codes, codes
    assert requests.post(f"{strict_url}/sdapi/v1/txt2img", json=body, timeout=60, auth=("user", "pass")).ok
