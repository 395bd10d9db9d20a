"""Load test of `python -m engine serve` on loopback: the same 200 requests (OpenAI and AUTOMATIC1111 text→image,
4 prompts × 2 samplers, one seed each) from 16 concurrent clients, against a server that batches (--max-batch 8)
and one that runs one image at a time (--max-batch 1), alternating. Every answer must be 200 and the same bytes
from both servers (a batched image equals the alone one); 10 more clients go away mid-request. Reports throughput,
p50 / p95 latency, the batch sizes the server ran and its resident memory over the run.

    python bench/bench_serve.py [--requests 200] [--clients 16] [--runs 1]   # → bench/results/serve_load.json
"""
import argparse
import base64
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from engine.embedded import source_commit, versions
from engine.profile import cpu_name

OUT = Path(__file__).resolve().parent / "results" / "serve_load.json"
PROMPTS = ["a red circle", "blue star, yellow background", "a big green triangle in the middle",
           "a small purple ring at the top on a white background"]
SAMPLERS = [("ddim", "DDIM"), ("dpmpp_2m", "DPM++ 2M")]
STEPS = 20


def requests(n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        prompt, (ours, a1111) = PROMPTS[i % len(PROMPTS)], SAMPLERS[(i // len(PROMPTS)) % len(SAMPLERS)]
        if i % 2:
            out.append(("/sdapi/v1/txt2img", {"prompt": prompt, "seed": 1000 + i, "steps": STEPS, "cfg_scale": 7.5,
                                              "sampler_name": a1111}))
        else:
            out.append(("/v1/images/generations", {"prompt": prompt, "seed": 1000 + i, "steps": STEPS,
                                                   "sampler": ours}))
    return out


def _image(path: str, body: dict) -> bytes:
    return base64.b64decode(body["images"][0] if path.startswith("/sdapi") else body["data"][0]["b64_json"])


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


class Server:
    def __init__(self, max_batch: int, threads: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(self.port),
                                      "--max-batch", str(max_batch), "--max-queue", "64"],
                                     env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"the server did not start: {self.proc.stderr.read()}")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def load(server: Server, reqs: list, clients: int, gone: int) -> dict:
    """reqs from `clients` threads (and `gone` more clients that leave after 50 ms)."""
    rss, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            rss.append(_rss_mib(server.proc.pid))
            stop.wait(0.25)
    watcher = threading.Thread(target=sample)
    watcher.start()
    http = httpx.Client(base_url=server.url, timeout=600, limits=httpx.Limits(max_connections=clients + gone))

    def one(req):
        t0 = time.perf_counter()
        r = http.post(req[0], json=req[1])
        return r.status_code, time.perf_counter() - t0, hashlib.sha256(_image(req[0], r.json())).hexdigest() \
            if r.status_code == 200 else r.text

    def leave(req):
        try:
            httpx.post(server.url + req[0], json=req[1], timeout=0.05)
        except httpx.TimeoutException:
            return True
        return False
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex, ThreadPoolExecutor(max(1, gone)) as ex2:
        left = list(ex2.map(leave, reqs[:gone]))
        answers = list(ex.map(one, reqs))
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    lat = sorted(a[1] for a in answers)
    text = server.metrics()
    batches = {int(k): int(v) for k, v in re.findall(r'engine_batches_total\{size="(\d+)"\} (\d+)', text)}
    return {"wall_s": wall, "requests": len(reqs), "throughput_per_s": len(reqs) / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[int(0.95 * (len(lat) - 1))],
            "status": dict(sorted({str(c): sum(a[0] == c for a in answers) for c, _, _ in answers}.items())),
            "left_early": sum(left), "answered_499": int(re.search(r'status="499"\} (\d+)', text)[1])
            if 'status="499"' in text else 0,
            "batches": dict(sorted(batches.items())),
            "mean_batch": sum(k * v for k, v in batches.items()) / max(1, sum(batches.values())),
            "rss_mib": {"first": rss[0], "max": max(rss), "last": rss[-1]}, "hashes": [a[2] for a in answers]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1, help="alternating runs of each server")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = ap.parse_args()
    reqs = requests(args.requests)
    runs = {"batched": [], "one_at_a_time": []}
    for _ in range(args.runs):
        for name, max_batch in (("one_at_a_time", 1), ("batched", 8)):
            server = Server(max_batch, args.threads)
            try:
                load(server, reqs[:16], args.clients, 0)  # warm-up: first calls, allocator
                runs[name].append(load(server, reqs, args.clients, 10))
            finally:
                server.stop()
            r = runs[name][-1]
            print(f"{name}: {r['throughput_per_s']:.2f} req/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
                  f"status {r['status']}, mean batch {r['mean_batch']:.2f}, RSS {r['rss_mib']}", flush=True)
    ok = all(r["status"] == {"200": args.requests} for rs in runs.values() for r in rs)
    same = all(r["hashes"] == runs["one_at_a_time"][0]["hashes"] for rs in runs.values() for r in rs)
    cpu = cpu_name()
    med = {k: statistics.median(r["throughput_per_s"] for r in v) for k, v in runs.items()}
    result = {"cpu": cpu, "threads": args.threads, "clients": args.clients, "requests": args.requests,
              "steps": STEPS, "every_request_answered": ok, "batched_equals_one_at_a_time": same,
              "batching_gain": med["batched"] / med["one_at_a_time"],
              "runs": {k: [{x: y for x, y in r.items() if x != "hashes"} for r in v] for k, v in runs.items()},
              "commit": source_commit(), "model_version": versions(),
              "command": " ".join(["python bench/bench_serve.py", *sys.argv[1:]]), "torch": torch.__version__}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("every_request_answered", "batched_equals_one_at_a_time",
                                             "batching_gain")}))
    if not (ok and same):
        sys.exit(1)


if __name__ == "__main__":
    main()
