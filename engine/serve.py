"""`python -m engine serve`: an HTTP server (Starlette on uvicorn, the optional extra
`engine[serve]`) speaking OpenAI's Images API, AUTOMATIC1111's sdapi and the engine's own commands
(engine.api), with request batching (engine.jobs), /health and Prometheus /metrics. The same app
runs on Ray Serve (engine.ray_serve) with Ray's batching in place of the worker."""
import asyncio
import contextlib
import hmac
import json
import os
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from . import jobs as jobs_
from .api import Api, BadRequest, Limits, Models
from .memory import OutOfMemory

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def error(status: int, message: str, headers=None) -> JSONResponse:
    """One JSON object that OpenAI clients (error.message) and AUTOMATIC1111 clients (detail)
    read."""
    kind = {429: "rate_limit_error", 503: "server_busy"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    message = message.strip().splitlines()[0] if message.strip() else "error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status},
                         "detail": message}, status, headers=headers)


class Metrics:
    """Requests by route and status, and their latency, in Prometheus' text format."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # route → [bucket counts..., sum, count]

    def observe(self, route: str, status: int, seconds: float):
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        h = self.latency.setdefault(route, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
        for i, b in enumerate(LATENCY_BUCKETS):
            h[i] += seconds <= b
        h[-2] += seconds
        h[-1] += 1

    def text(self, executor) -> str:
        s = executor.stats
        out = ["# HELP engine_requests_total HTTP requests answered, by route and status",
               "# TYPE engine_requests_total counter"]
        out += [f'engine_requests_total{{route="{r}",status="{c}"}} {n}'
                for (r, c), n in sorted(self.requests.items())]
        out += ["# HELP engine_request_seconds time from request to answer",
                "# TYPE engine_request_seconds histogram"]
        for r, h in sorted(self.latency.items()):
            out += [f'engine_request_seconds_bucket{{route="{r}",le="{b}"}} {h[i]}'
                    for i, b in enumerate(LATENCY_BUCKETS)]
            out += [f'engine_request_seconds_bucket{{route="{r}",le="+Inf"}} {h[-1]}',
                    f'engine_request_seconds_sum{{route="{r}"}} {h[-2]:.6f}',
                    f'engine_request_seconds_count{{route="{r}"}} {h[-1]}']
        out += ["# HELP engine_queue_depth images waiting for the worker",
                "# TYPE engine_queue_depth gauge", f"engine_queue_depth {executor.depth}",
                "# HELP engine_batches_total batches run, by their number of images",
                "# TYPE engine_batches_total counter"]
        out += [f'engine_batches_total{{size="{k}"}} {v}' for k, v in sorted(s.batch_sizes.items())]
        out += ["# HELP engine_images_total images made", "# TYPE engine_images_total counter",
                f"engine_images_total {s.images}",
                "# HELP engine_failed_images_total images whose batch failed",
                "# TYPE engine_failed_images_total counter", f"engine_failed_images_total {s.failed}",
                "# HELP engine_run_seconds_total seconds the worker spent running batches",
                "# TYPE engine_run_seconds_total counter",
                f"engine_run_seconds_total {s.run_seconds:.6f}"]
        return "\n".join(out) + "\n"


class LocalExecutor:
    """Jobs run by an engine.jobs.Worker in this process."""

    def __init__(self, pipe, max_batch=8, max_wait=0.05, max_queue=64):
        self.worker = jobs_.Worker(pipe, max_batch, max_wait, max_queue)

    @property
    def depth(self):
        return self.worker.depth

    @property
    def stats(self):
        return self.worker.stats

    async def run(self, jobs: list, gone) -> list:
        futures = [asyncio.wrap_future(f) for f in self.worker.submit(jobs)]
        together = asyncio.gather(*futures)
        while True:
            done, _ = await asyncio.wait({together}, timeout=0.25)
            if done:
                return together.result()
            if await gone():
                self.worker.cancel(jobs)
                together.cancel()
                raise ClientDisconnect

    def close(self):
        self.worker.stop()


def _check_length(request: Request, limits: Limits, required: bool = False):
    size = request.headers.get("content-length")
    if size is None and required or size is not None and (not size.isdigit()
                                                          or int(size) > limits.max_body):
        raise BadRequest(f"need a Content-Length of at most {limits.max_body} bytes", 413)


async def _body(request: Request, limits: Limits) -> bytes:
    _check_length(request, limits)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limits.max_body:
            raise BadRequest(f"the body is over this server's limit of {limits.max_body} bytes",
                             413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request, limits: Limits) -> dict:
    raw = await _body(request, limits)
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON ({e.msg if hasattr(e, 'msg') else e}); send a "
                         "JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def _form(request: Request, limits: Limits) -> tuple[dict, dict]:
    """(fields, files) of a multipart body, files as bytes."""
    _check_length(request, limits, required=True)
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=limits.max_body)
    except (AssertionError, ValueError, KeyError) as e:
        raise BadRequest(f"the body is not a multipart form ({e}); send multipart/form-data") \
            from None
    except HTTPException as e:
        raise BadRequest(f"the form: {e.detail}") from None
    fields, files = {}, {}
    for k, v in form.multi_items():
        if hasattr(v, "read"):
            files.setdefault(k, await v.read())
        else:
            fields[k] = v
    return fields, files


def _guarded(app, api_key: str):
    """`app` behind an API key: every route but /health asks for `Authorization: Bearer KEY` (what
    OpenAI's clients send)."""
    want = f"Bearer {api_key}".encode()

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and not hmac.compare_digest(
                dict(scope["headers"]).get(b"authorization", b""), want):
            reply = error(401, "a missing or wrong API key: send Authorization: Bearer KEY")
            return await reply(scope, receive, send)
        await app(scope, receive, send)
    return guarded


def env_api_key() -> str | None:
    """The API key the server asks for: ENGINE_API_KEY, or None (no key) when unset or empty."""
    return os.environ.get("ENGINE_API_KEY") or None


def create_app(models: Models, executor, limits: Limits = Limits(), api_key: str | None = None):
    """The ASGI app of a server over `models` whose jobs `executor` runs (LocalExecutor, or
    engine.ray_serve's); with `api_key`, every route but /health asks for it."""
    api = Api(models, limits)
    metrics = Metrics()
    started = time.time()

    def endpoint(route: str, read, build):
        """A POST route: read(request) → args of build, build(*args) → (jobs, finish); the jobs
        run, finish(results) is the answer."""
        async def handle(request: Request):
            t0 = time.perf_counter()
            status = 200
            try:
                args = await read(request)
                jobs, finish = build(*args)
                results = await executor.run(jobs, request.is_disconnected)
                return JSONResponse(finish(results))
            except BadRequest as e:
                status = e.status
                return error(status, str(e))
            except jobs_.QueueFull as e:
                status = 503
                return error(status, f"busy: {e}; retry later", {"Retry-After": "1"})
            except ClientDisconnect:
                status = 499
                return error(status, "the client went away")
            except OutOfMemory as e:
                status = 413
                return error(status, str(e))
            except (ValueError, OSError, FloatingPointError) as e:
                status = 400
                return error(status, str(e))
            except Exception as e:  # the server answers and goes on
                status = 500
                return error(status, f"{type(e).__name__}: {e}")
            finally:
                metrics.observe(route, status, time.perf_counter() - t0)
        return Route(route, handle, methods=["POST"])

    async def json_body(request):
        return (await _json(request, limits),)

    async def form_body(request):
        return await _form(request, limits)

    async def command_body(request):
        return request.path_params["name"], await _json(request, limits)

    async def health(request):
        return JSONResponse({"status": "ok", "model": models.name, "queue": executor.depth,
                             "uptime_s": round(time.time() - started, 1)})

    async def metrics_page(request):
        return PlainTextResponse(metrics.text(executor),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def listing(items):
        async def page(request):
            return JSONResponse(items())
        return page

    async def not_found(request, exc):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    routes = [
        Route("/health", health), Route("/metrics", metrics_page),
        Route("/v1/models", listing(lambda: {"object": "list", "data": [
            {"id": models.name, "object": "model", "owned_by": "engine"}]})),
        Route("/sdapi/v1/samplers", listing(api.a1111_samplers)),
        Route("/sdapi/v1/sd-models", listing(api.a1111_models)),
        endpoint("/v1/images/generations", json_body, api.openai_generations),
        endpoint("/v1/images/edits", form_body, api.openai_edits),
        endpoint("/sdapi/v1/txt2img", json_body, api.a1111_txt2img),
        endpoint("/sdapi/v1/img2img", json_body, api.a1111_img2img),
        endpoint("/engine/v1/{name}", command_body, api.command),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        executor.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found},
                    lifespan=lifespan)
    return _guarded(app, api_key) if api_key else app


def load_models(a) -> Models:
    """The models of `python -m engine serve`'s flags."""
    import engine

    pipe = engine.load(a.model, dtype=a.dtype, device=a.device, variant=a.variant,
                       config=a.config, prediction_type=a.prediction_type, tokenizer=a.tokenizer,
                       embeddings=a.embeddings, semi=a.semi, max_memory=a.max_memory,
                       loras=a.lora, lora_dir=a.lora_dir, lora_strict=a.lora_strict)
    return Models(pipe, a.model, a.upscaler, Path(a.model).name)


def main(a):
    """Serve until Ctrl-C / SIGTERM."""
    import uvicorn

    limits = Limits(max_images=a.max_images, max_pixels=a.max_pixels, max_steps=a.max_steps)
    jobs_.check_batching(a.max_batch, a.max_wait, a.max_queue)
    models = load_models(a)
    executor = LocalExecutor(models.pipe, a.max_batch, a.max_wait, a.max_queue)
    api_key = env_api_key()
    print(f"serving {a.model} on http://{a.host}:{a.port} (batches of up to {a.max_batch}, "
          f"queue of {a.max_queue}{'; API key required' if api_key else ''})", flush=True)
    uvicorn.run(create_app(models, executor, limits, api_key), host=a.host, port=a.port,
                log_level="warning")
