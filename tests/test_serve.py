"""The HTTP server on a free loopback port, driven by the official `openai` client and plain HTTP: the same seed
gives the CLI's bytes, concurrent requests batch and still equal their alone images, and bad input, a full queue
and a client that goes away are answered without losing the server."""
import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

import engine
from engine import cli, jobs
from engine.api import Limits, Models, encode_png
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from engine.serve import LocalExecutor, create_app


class Server:
    """create_app served by uvicorn in a thread on a free port."""

    def __init__(self, pipe, limits=Limits(), api_key=None, **batching):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.executor = LocalExecutor(pipe, **batching)
        app = create_app(Models(pipe, str(DEFAULT_MODEL), str(DEFAULT_UPSCALER), "tiny"), self.executor, limits,
                         api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def block(self):
        """Hold the worker on a job until the returned event is set."""
        ev = threading.Event()
        self.executor.worker.submit([jobs.Job("call", call=lambda pipe: ev.wait(60))])
        _until(lambda: self.executor.worker.running == 1)
        return ev


def _until(cond, timeout=10.0):
    t = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def pipe():
    return engine.load()


@pytest.fixture(scope="module")
def server(pipe):
    s = Server(pipe, max_batch=8, max_wait=0.3, max_queue=64)
    yield s
    s.stop()


@pytest.fixture
def small_server(pipe):
    s = Server(pipe, Limits(max_body=4096, max_images=2), max_batch=1, max_wait=0.0, max_queue=1)
    yield s
    s.stop()


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def _alone(pipe, prompt, seed, **kw) -> bytes:
    return _png(encode_png(pipe.generate(prompt, seed=seed, progress=False, **kw)[0]))


def test_openai_client_gives_the_cli_bytes(server, tmp_path):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.images.generate(prompt="a red circle", n=2, size="64x64", response_format="b64_json",
                               extra_body={"seed": 11, "steps": 10})
    assert len(r.data) == 2 and r.data[0].b64_json != r.data[1].b64_json
    for i, seed in enumerate((11, 12)):
        out = tmp_path / f"{seed}.png"
        assert cli.main(["generate", "--prompt", "a red circle", "--seed", str(seed), "--steps", "10",
                         "--out", str(out), "--quiet"]) == 0
        assert _png(r.data[i].b64_json) == out.read_bytes()
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_a1111_txt2img_over_plain_http(server, pipe):
    body = {"prompt": "blue star, yellow background", "negative_prompt": "", "seed": 5, "steps": 8,
            "cfg_scale": 5, "sampler_name": "DPM++ 2M Karras", "batch_size": 2, "width": 64, "height": 64,
            "restore_faces": False, "enable_hr": False}
    r = server.http.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [5, 6] and r.json()["parameters"] == body
    kw = dict(steps=8, guidance=5.0, sampler="dpmpp_2m", schedule="karras")
    assert [_png(x) for x in r.json()["images"]] == [_alone(pipe, body["prompt"], s, **kw) for s in (5, 6)]
    r = server.http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2})
    assert r.status_code == 200 and 0 <= json.loads(r.json()["info"])["seed"] < 2**32  # seed -1: random
    assert [s["name"] for s in server.http.get("/sdapi/v1/samplers").json()][:3] == ["DDIM", "Euler", "Euler a"]


def test_a1111_img2img_and_inpaint(server, pipe):
    start = pipe.generate("a red circle", seed=1, steps=6, progress=False)[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(steps=8, guidance=7.0, seed=2, progress=False)
    body = {"prompt": "a blue square", "init_images": ["data:image/png;base64," + encode_png(start)],
            "denoising_strength": 0.6, "steps": 8, "seed": 2}
    r = server.http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert _png(r.json()["images"][0]) == _png(encode_png(pipe.img2img(start, "a blue square", strength=0.6, **kw)[0]))
    r = server.http.post("/sdapi/v1/img2img", json=dict(body, mask=encode_png(mask), denoising_strength=1.0))
    assert r.status_code == 200, r.text
    want = pipe.inpaint(start, mask, "a blue square", strength=1.0, **kw)[0]
    assert _png(r.json()["images"][0]) == _png(encode_png(want))


def test_concurrent_requests_batch_and_equal_alone(server, pipe):
    cases = [("a red circle", 1), ("red ring on black", 2), ("a big green triangle in the middle", 3),
             ("blue star, yellow background", 4), ("a red circle", 5), ("a yellow square", 6)]
    before = server.executor.stats.batch_sizes.copy()

    def ask(case):
        r = server.http.post("/v1/images/generations", json={"prompt": case[0], "seed": case[1], "steps": 6})
        return _png(r.json()["data"][0]["b64_json"])
    with ThreadPoolExecutor(len(cases)) as ex:
        got = list(ex.map(ask, cases))
    assert got == [_alone(pipe, p, s, steps=6) for p, s in cases]
    grown = {k: v - before.get(k, 0) for k, v in server.executor.stats.batch_sizes.items()}
    assert max(k for k, v in grown.items() if v) > 1, grown  # at least one real batch
    text = server.http.get("/metrics").text
    for name in ("engine_requests_total", "engine_queue_depth", "engine_batches_total", "engine_request_seconds_bucket"):
        assert name in text
    assert server.http.get("/health").json()["status"] == "ok"


def test_engine_edit_endpoint_gives_the_cli_bytes(server, pipe, tmp_path):
    src = tmp_path / "src.png"
    pipe.generate("a red circle on a blue background", seed=4, steps=6, progress=False)[0].save(src)
    args = {"prompt": "a green circle on a blue background", "source": "a red circle on a blue background",
            "steps": 6, "lam": 0.5}
    r = server.http.post("/engine/v1/edit", json=dict(args, image=base64.b64encode(src.read_bytes()).decode()))
    assert r.status_code == 200, r.text
    out = tmp_path / "edit.png"
    argv = ["edit", "--image", str(src), "--out", str(out), "--quiet"]
    assert cli.main(argv + [x for k, v in args.items() for x in (f"--{k}", str(v))]) == 0
    assert _png(r.json()["image"]) == out.read_bytes()
    report = r.json()["reports"]["out.json"]
    assert report["edits"][0]["prompt"] == args["prompt"] and report["image"] == "image.png"
    assert sorted(r.json()["images"]) == ["out.png", "out_sheet.png"]


def test_openai_client_edit_keeps_the_outside(server, pipe):
    src = pipe.generate("a red circle on a blue background", seed=4, steps=6, progress=False)[0]
    rgba = src.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (20, 20, 44, 44))  # transparent: the part to edit
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="a green star", n=1,
                           size="64x64", extra_body={"seed": 3, "steps": 4, "candidates": 1, "repaint": 1})
    out = Image.open(io.BytesIO(_png(r.data[0].b64_json))).convert("RGB")
    keep = Image.new("L", (64, 64), 255)
    keep.paste(0, (20, 20, 44, 44))
    diff = [abs(a - b) for a, b, k in zip(out.tobytes(), src.tobytes(), keep.convert("RGB").tobytes()) if k]
    assert max(diff) == 0  # outside the mask: the source, pixel for pixel
    assert out.crop((20, 20, 44, 44)).tobytes() != src.crop((20, 20, 44, 44)).tobytes()


BLACK = encode_png(Image.new("RGB", (64, 64)))


@pytest.mark.parametrize("path,body,status,match", [
    ("/v1/images/generations", {"prompt": 3}, 400, "prompt=3"),
    ("/v1/images/generations", {}, 400, "prompt: required"),
    ("/v1/images/generations", {"prompt": "x", "n": 3}, 400, "need 1 to 2 images"),
    ("/v1/images/generations", {"prompt": "x", "size": "63x64"}, 400, "multiple of 4"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": "x", "size": "2048x2048"}, 413, "limit"),
    ("/v1/images/generations", {"prompt": "x", "steps": 1000}, 400, "at most 150"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "b64_json"),
    ("/v1/images/generations", {"prompt": "x", "sampler": "nope"}, 400, "use one of"),
    ("/v1/images/generations", {"prompt": "<lora:missing:1> x"}, 400, "lora"),
    ("/v1/images/generations", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/images/generations", ["x"], 400, "JSON object"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, 400, "enable_hr"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, 400, "sampler_name"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 400, "init_images: required"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["@@@"]}, 400, "base64"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"not a png").decode()]}, 400,
     "not a readable image"),
    ("/engine/v1/edit", {"prompt": "x", "out": "/etc/passwd"}, 400, "set by the server"),
    ("/engine/v1/edit", {"prompt": "x", "model": "/tmp"}, 400, "set by the server"),
    ("/engine/v1/edit", {"prompt": "x", "image": BLACK, "no-such-flag": 1}, 400, "unrecognized"),
    ("/engine/v1/blend", {"prompt": "x"}, 400, "required: --image, --mask"),
    ("/engine/v1/edit", {"prompt": "x", "image": BLACK, "lam": "high"}, 400, "invalid float value"),
    ("/engine/v1/rm", {}, 404, "use one of"),
])
def test_bad_requests_get_one_line(small_server, path, body, status, match):
    r = small_server.http.post(path, json=body)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert match in msg and "\n" not in msg and r.json()["detail"] == msg


def test_oversized_and_malformed_bodies(small_server):
    r = small_server.http.post("/v1/images/generations", content=b"{" + b" " * 5000 + b"}",
                               headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = small_server.http.post("/v1/images/generations", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    assert small_server.http.get("/nope").status_code == 404
    assert small_server.http.get("/v1/images/generations").status_code == 405
    assert small_server.http.get("/health").json()["status"] == "ok"  # still serving


def test_full_queue_answers_503_then_serves(small_server):
    release = small_server.block()
    first = ThreadPoolExecutor(1).submit(small_server.http.post, "/v1/images/generations",
                                         json={"prompt": "a red circle", "steps": 2})
    _until(lambda: small_server.executor.depth == 1)
    r = small_server.http.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
    release.set()
    assert first.result().status_code == 200
    assert small_server.http.post("/v1/images/generations", json={"prompt": "x", "steps": 2}).status_code == 200


def test_client_that_goes_away_frees_its_slot(small_server):
    release = small_server.block()
    body = json.dumps({"prompt": "a red circle", "steps": 2}).encode()
    with socket.create_connection(("127.0.0.1", small_server.port)) as s:
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _until(lambda: small_server.executor.depth == 1)
    _until(lambda: small_server.executor.depth == 0, 5)  # cancelled, not run
    release.set()
    r = small_server.http.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 2})
    assert r.status_code == 200
    assert 'status="499"' in small_server.http.get("/metrics").text


def test_a_failing_job_is_answered_and_the_server_goes_on(server, pipe):
    start = encode_png(pipe.generate("a red circle", seed=1, steps=2, progress=False)[0])
    mask = encode_png(Image.new("RGB", (64, 64), "white"))
    r = server.http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [start], "mask": mask,
                                                           "sampler_name": "Euler", "steps": 2})
    assert r.status_code == 400 and "use sampler ddim" in r.json()["error"]["message"]
    assert server.http.post("/v1/images/generations", json={"prompt": "x", "steps": 2}).status_code == 200


def test_an_image_over_the_limit_is_refused_before_decoding(server):
    huge = encode_png(Image.new("RGB", (2100, 2100)))  # over 4 × max_pixels
    r = server.http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [huge]})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]


def test_serve_flags_fail_before_loading(cli_error):
    cli_error(["serve", "--max-batch", "0"], "max_batch")
    cli_error(["serve", "--max-images", "0"], "max_images")
    cli_error(["serve", "--model", "/nonexistent/model"], "/nonexistent/model")


def test_api_key(pipe):
    s = Server(pipe, api_key="s3cret", max_batch=1, max_wait=0.0)
    try:
        r = s.http.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 2})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        bad = s.http.get("/metrics", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        assert s.http.get("/health").status_code == 200
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret")
        assert len(client.images.generate(prompt="a red circle", extra_body={"steps": 2}).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope").images.generate(prompt="x")
    finally:
        s.stop()
