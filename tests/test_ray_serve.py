"""The server's app on a local Ray Serve with 2 replicas and Ray's batching (slow: Ray starts in ~30 s; needs the
extra engine[ray])."""
import base64
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import engine
from engine.api import encode_png

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def test_two_replicas_batch_and_answer_like_alone():
    from ray import serve

    from engine.ray_serve import Settings, application

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(Settings(max_wait=0.5), replicas=2), name="engine", route_prefix="/")
        status = serve.status().applications["engine"].deployments["engine"]
        assert status.replica_states == {"RUNNING": 2}
        url = f"http://127.0.0.1:{port}"
        cases = [("a red circle", s) for s in range(8)] + [("blue star, yellow background", s) for s in range(8)]

        def ask(case):
            r = httpx.post(url + "/v1/images/generations", json={"prompt": case[0], "seed": case[1], "steps": 6},
                           timeout=300)
            assert r.status_code == 200, r.text
            return base64.b64decode(r.json()["data"][0]["b64_json"])
        with ThreadPoolExecutor(16) as ex:
            got = list(ex.map(ask, cases))
        pipe, threads = engine.load(), torch.get_num_threads()
        torch.set_num_threads(Settings().threads)  # each replica's: the arithmetic depends on the thread count
        try:
            want = [base64.b64decode(encode_png(pipe.generate(p, seed=s, steps=6, progress=False)[0]))
                    for p, s in cases]
        finally:
            torch.set_num_threads(threads)
        assert got == want
        sizes = set()
        for _ in range(20):  # /metrics of whichever replica answers: some batch had more than one image
            text = httpx.get(url + "/metrics").text
            sizes |= {int(line.split('"')[1]) for line in text.splitlines() if line.startswith("engine_batches_total{")}
        assert max(sizes) > 1, sizes
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True})
        assert r.status_code == 400 and json.loads(r.text)["error"]["message"].startswith("enable_hr")
    finally:
        serve.shutdown()
        ray.shutdown()
