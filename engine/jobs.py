"""Image jobs behind a server: one worker thread runs them on a loaded pipeline, one batch at a time,
merging waiting jobs that can share a denoising loop (same kind, size, steps, sampler, guidance,
prompt length and LoRAs) up to a batch limit and a short wait. Every image of a batch is the one its
job gives alone: each image draws its noise from its own seed, and the engine computes an image the
same way whatever else shares its batch (engine.models.blocks.by_row, engine.tiled_vae)."""
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import prompt as pr


class QueueFull(Exception):
    """The queue holds its limit of images; the client should retry later."""


@dataclass(eq=False)
class Job:
    """One image (kind generate, img2img or inpaint), or one call(pipe) run alone (kind call).
    params: the Pipeline method's keyword arguments besides prompt, negative, seed and images."""
    kind: str
    prompt: str = ""
    negative: str | None = None
    seed: int = 0
    params: dict = field(default_factory=dict)
    image: object = None  # img2img / inpaint: the input PIL image
    mask: object = None  # inpaint: the mask PIL image
    call: object = None  # kind call: a function of the pipeline
    future: Future = field(default_factory=Future)

    def key(self, chunks) -> tuple | None:
        """What jobs must share to run in one batch, or None for a job that runs alone. chunks:
        text → its number of 75-token chunks (a batch pads its prompts to the longest)."""
        if self.kind not in ("generate", "img2img") or not self.params.get("guidance", 0) > 1:
            return None  # unguided: a batch of 1 and of n compute a convolution differently
        size = self.image.size if self.image is not None else None
        texts = [self.prompt, self.negative]
        return (self.kind, size, tuple(sorted(self.params.items())), self.negative is None,
                tuple(chunks(t) if t else 1 for t in texts),
                tuple(sorted(pr.lora_tags([t for t in texts if t]).items())))


def run(pipe, jobs: list[Job]) -> list:
    """The results of jobs that share a key (or of one job): a PIL image each, or call's value."""
    j = jobs[0]
    if j.kind == "call":
        return [j.call(pipe)]
    prompts = [x.prompt for x in jobs]
    negative = None if j.negative is None else [x.negative for x in jobs]
    seeds = [x.seed for x in jobs]
    kw = dict(j.params, negative=negative, seed=seeds, progress=False)
    if j.kind == "generate":
        return pipe.generate(prompts, **kw)
    if j.kind == "img2img":
        return pipe.img2img([x.image for x in jobs], prompts, **kw)
    if j.kind == "inpaint":
        return pipe.inpaint(j.image, j.mask, prompts, **dict(kw, seed=j.seed))
    raise ValueError(f"job kind {j.kind!r}: use generate, img2img, inpaint or call")


def batch_key(pipe, job: Job) -> tuple | None:
    """job.key on `pipe`'s prompt encoder; None (alone) for a prompt it cannot read, whose run then
    reports the error."""
    try:
        return job.key(pipe.model.prompt_chunks)
    except ValueError:
        return None


def run_recorded(pipe, batch: list[Job], stats: "Stats") -> list:
    """run(pipe, batch) timed into `stats`; when it fails, its exception is every job's result."""
    t0 = time.perf_counter()
    try:
        results = run(pipe, batch)
    except Exception as e:  # every job of the batch gets the error; the server goes on
        results = [e] * len(batch)
    stats.batch(len(batch), time.perf_counter() - t0, not isinstance(results[0], Exception))
    return results


class Stats:
    """Counters a /metrics page shows: batches by size, images made and failed, run seconds."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batch_sizes: dict[int, int] = {}
        self.images = 0
        self.failed = 0
        self.run_seconds = 0.0

    def batch(self, size: int, seconds: float, ok: bool):
        with self.lock:
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
            self.images += size if ok else 0
            self.failed += 0 if ok else size
            self.run_seconds += seconds


def check_batching(max_batch, max_wait, max_queue):
    if not (isinstance(max_batch, int) and max_batch >= 1 and isinstance(max_queue, int)
            and max_queue >= 1 and math.isfinite(max_wait) and max_wait >= 0):
        raise ValueError(f"batching: max_batch={max_batch!r}, max_wait={max_wait!r} s, "
                         f"max_queue={max_queue!r}; need whole numbers >= 1 and a wait >= 0")


class Worker:
    """Runs jobs on `pipe` in one thread. submit() refuses (QueueFull) once max_queue jobs wait;
    a batch takes the oldest job and every waiting job of its key, up to max_batch, waiting up to
    max_wait seconds for more."""

    def __init__(self, pipe, max_batch: int = 8, max_wait: float = 0.05, max_queue: int = 64):
        check_batching(max_batch, max_wait, max_queue)
        self.pipe, self.max_batch, self.max_wait, self.max_queue = pipe, max_batch, max_wait, \
            max_queue
        self.waiting: list[Job] = []
        self.running = 0
        self.cond = threading.Condition()
        self.stats = Stats()
        self.keys: dict[Job, tuple | None] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="engine-worker", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting, not yet running."""
        return len(self.waiting)

    def submit(self, jobs: list[Job]) -> list[Future]:
        """Queue a request's jobs together, or refuse them all (QueueFull)."""
        with self.cond:
            if self.stopped:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue holds {len(self.waiting)} of {self.max_queue} images")
            self.keys.update((j, batch_key(self.pipe, j)) for j in jobs)
            self.waiting.extend(jobs)
            self.cond.notify_all()
        return [j.future for j in jobs]

    def cancel(self, jobs: list[Job]) -> int:
        """Drop the jobs that still wait (a client that went away); returns how many."""
        with self.cond:
            gone = [j for j in jobs if j in self.waiting]
            self.waiting = [j for j in self.waiting if j not in gone]
            for j in gone:
                del self.keys[j]
        for j in gone:
            j.future.cancel()
        return len(gone)

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()
        for j in self.waiting:
            j.future.cancel()

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.waiting and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return None
            first = self.waiting[0]
            key = self.keys[first]
            deadline = time.monotonic() + (self.max_wait if key is not None else 0)
            while True:
                batch = [first] if key is None else \
                    [j for j in self.waiting if self.keys[j] == key][:self.max_batch]
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self.stopped:
                    break
                self.cond.wait(left)
                if first not in self.waiting:  # cancelled while we waited
                    return []
            self.waiting = [j for j in self.waiting if j not in batch]
            for j in batch:
                del self.keys[j]
            self.running = len(batch)
            return batch

    def _loop(self):
        while (batch := self._take()) is not None:
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            for j, r in zip(batch, run_recorded(self.pipe, batch, self.stats)):
                if isinstance(r, Exception):
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)
            with self.cond:
                self.running = 0
