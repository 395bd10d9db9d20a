"""Per-stage wall-clock timing and an optional torch.profiler chrome trace (`--profile DIR`)."""
import contextlib
import platform
import time
from pathlib import Path

import torch

from . import images
from .kernels import cpu

_records: list | None = None


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def stage(name: str):
    """Label a stage in the trace; time it when a `profiled` block is active."""
    with torch.profiler.record_function(name):
        if _records is None:
            yield
            return
        _sync()
        t0 = time.perf_counter()
        yield
        _sync()
        _records.append((name, time.perf_counter() - t0))


def table(records) -> str:
    counts: dict[str, int] = {}
    lines = [f"{'stage':<20}{'ms':>12}"]
    for name, sec in records:
        counts[name] = counts.get(name, 0) + 1
        label = f"{name} {counts[name]}" if name == "unet step" else name
        lines.append(f"{label:<20}{sec * 1e3:>12.1f}")
    lines.append(f"{'total':<20}{sum(s for _, s in records) * 1e3:>12.1f}")
    return "\n".join(lines)


@contextlib.contextmanager
def profiled(out_dir=None):
    """Collect stage times (yielded list); with out_dir, also write a chrome trace there and print
    the table."""
    global _records
    records: list = []
    _records = records
    try:
        if out_dir is None:
            yield records
            return
        out = Path(out_dir)
        images.make_folder(out)  # taken back with the command's outputs
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            yield records
        prof.export_chrome_trace(str(out / "trace.json"))
        print(table(records))
        print(f"chrome trace: {out / 'trace.json'} (open in chrome://tracing or ui.perfetto.dev)")
    finally:
        _records = None


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the machine type: what a timing was measured
    on."""
    return cpu.cpuinfo("model name") or platform.machine()
