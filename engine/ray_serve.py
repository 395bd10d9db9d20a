"""The server's app on Ray Serve (the optional extra `engine[ray]`): replicas of the same ASGI app
(engine.serve.create_app), each with its own copy of the model, and Ray's request batching
(`serve.batch`) in place of engine.jobs.Worker; Ray's proxy spreads requests over the replicas
and answers 503 once their queues are full.

    python -m engine.ray_serve --replicas 2 --port 8000     # a local Ray, until Ctrl-C
    serve run engine.ray_serve:build replicas=2             # the same through Ray's own CLI

On a multi-GPU cluster (`ray start` on each node, then the same command against it), give each
replica a GPU: `--device cuda --gpus 1 --replicas N` asks Ray for one GPU per replica, so N GPUs
hold N replicas, placed by Ray across the nodes, each with its own copy of the model and its own
batches; Ray's proxy on every node spreads the requests over them.
"""
import argparse
import asyncio
from dataclasses import dataclass

from ray import serve

from . import jobs as jobs_
from .api import Models
from .embedded import DEFAULT_MODEL, DEFAULT_UPSCALER


class RayExecutor:
    """Jobs batched by Ray Serve in this replica: a batch's jobs of one key (engine.jobs.Job.key)
    run as one denoising loop, the others alone; batches run one at a time on the model."""

    def __init__(self, pipe, max_batch: int = 8, max_wait: float = 0.05):
        jobs_.check_batching(max_batch, max_wait, 1)
        self.pipe, self.stats, self.depth = pipe, jobs_.Stats(), 0
        self.batched = serve.batch(max_batch_size=max_batch,
                                   batch_wait_timeout_s=max_wait)(self._run_batch)

    async def _run_batch(self, batch: list) -> list:
        return await asyncio.to_thread(self._run, batch)

    def _run(self, batch: list) -> list:
        groups: dict = {}
        for i, job in enumerate(batch):
            key = jobs_.batch_key(self.pipe, job)
            groups.setdefault(("alone", i) if key is None else key, []).append(i)
        out: list = [None] * len(batch)
        for members in groups.values():
            out_of = jobs_.run_recorded(self.pipe, [batch[i] for i in members], self.stats)
            for i, r in zip(members, out_of):
                out[i] = r
        return out

    async def run(self, jobs: list, gone) -> list:
        self.depth += len(jobs)
        try:
            results = await asyncio.gather(*(self.batched(j) for j in jobs))
        finally:
            self.depth -= len(jobs)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def close(self):
        pass


@dataclass
class Settings:
    """One replica's model and batching."""
    model: str = str(DEFAULT_MODEL)
    upscaler: str = str(DEFAULT_UPSCALER)
    dtype: str = "float32"
    device: str = "cpu"
    max_batch: int = 8
    max_wait: float = 0.05
    threads: int = 1  # torch threads per replica: its share of the CPU cores


@serve.ingress()
class EngineDeployment:
    """One replica: the model loaded once, the server's app over it."""

    def __init__(self, settings: Settings):
        import torch

        import engine
        from .serve import create_app, env_api_key

        torch.set_num_threads(settings.threads)
        pipe = engine.load(settings.model, dtype=settings.dtype, device=settings.device)
        models = Models(pipe, settings.model, settings.upscaler, settings.model.rstrip("/")
                        .rsplit("/", 1)[-1])
        self.asgi = create_app(models, RayExecutor(pipe, settings.max_batch, settings.max_wait),
                               api_key=env_api_key())

    def __serve_build_asgi_app__(self):
        return self.asgi


def application(settings: Settings = Settings(), replicas: int = 1, max_queued: int = 64,
                actor_options: dict | None = None):
    """The Ray Serve application: `replicas` copies of EngineDeployment."""
    options = actor_options or {"num_cpus": settings.threads}
    return serve.deployment(EngineDeployment, name="engine", num_replicas=replicas,
                            max_ongoing_requests=2 * settings.max_batch,
                            max_queued_requests=max_queued,
                            ray_actor_options=options).bind(settings)


def _gpus(settings: Settings, gpus: float) -> dict | None:
    """Each replica's share of Ray's resources: its CPU threads, and `gpus` GPUs when non-zero."""
    return {"num_cpus": settings.threads, **({"num_gpus": gpus} if gpus else {})}


def build(args: dict):
    """`serve run engine.ray_serve:build replicas=2 model=PATH max_batch=8 gpus=1 device=cuda`: an
    application from Ray's key=value arguments."""
    fields = Settings.__dataclass_fields__
    settings = Settings(**{k: type(fields[k].default)(v) for k, v in args.items() if k in fields})
    return application(settings, int(args.get("replicas", 1)), int(args.get("max_queued", 64)),
                       _gpus(settings, float(args.get("gpus", 0))))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.ray_serve", description="Serve the model "
                                "on a local Ray Serve with several replicas.")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--gpus", type=float, default=0, help="GPUs per replica (with --device cuda)")
    for name, f in Settings.__dataclass_fields__.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    settings = Settings(**{k: getattr(a, k) for k in Settings.__dataclass_fields__})
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(application(settings, a.replicas, actor_options=_gpus(settings, a.gpus)),
              blocking=True)


if __name__ == "__main__":
    main()
