"""Compiled graphs on the CPU: a module's inference call exported with torch.export and compiled ahead
of time by AOTInductor into one C++ library per input shape, kept on disk. Python's per-op overhead
goes and pointwise ops fuse: a small model's step takes about half the time.

The weights are inputs of the graph, not constants in it, so one library serves every checkpoint of
an architecture, and merged LoRAs take effect. Each image runs alone through the graph (with its
CFG pair), so it is computed the same way whatever else shares its batch.

ENGINE_COMPILE: `cached` (default) runs the graphs already compiled and the eager model elsewhere;
`on` also compiles the missing ones on first use (a one-time cost, printed with its time); `off`
never uses them. A graph runs only where it measured faster than the eager model on this machine
(timed once, kept beside it). ENGINE_CACHE_DIR moves the cache (default ~/.cache/engine). Graphs run only in
ENGINE_KERNELS=auto, on the CPU, in fp32 or bf16, without autograd.
"""
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

import torch

from . import kernels
from .kernels.conv import cache_root, forget_choices, measured_choice
from .profile import cpu_name

POLICIES = ("cached", "on", "off")
_SOURCES = ("models/*.py", "kernels/*.py", "graphs.py")  # the code a graph is traced from
_LOADED: dict[str, object] = {}  # key → runner, or None where compiling failed in this process
_LOCK = threading.Lock()


def policy() -> str:
    p = os.environ.get("ENGINE_COMPILE", "cached").lower()
    if p not in POLICIES:
        raise ValueError(f"ENGINE_COMPILE={p!r} is not one of {POLICIES}; unset it or pick one")
    return p


def forget():
    """Drop the graphs and choices this process has read (the files stay): as in a new process."""
    with _LOCK:
        _LOADED.clear()
    forget_choices()


def cache_dir() -> Path:
    return cache_root() / "graphs"


def applies(*inputs: torch.Tensor) -> bool:
    return (policy() != "off" and kernels.mode() == "auto" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)
                    for t in inputs))


# Bumped whenever any module gains or replaces a parameter, buffer or submodule: the weights listed
# for a module stay valid until then (values and dtypes updated in place are read at each call).
_VERSION = [0]


def _bump(*_):
    _VERSION[0] += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_bump)
_LISTED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def run(module: torch.nn.Module, method: str, *inputs: torch.Tensor, copies: int = 1) -> torch.Tensor:
    """module.method(*inputs), image by image through a compiled graph where one is cached (or,
    with ENGINE_COMPILE=on, compiled now); else eagerly. The batch is `copies` blocks of the same
    images (CFG: the unconditional rows, then the conditional ones): rows j, j + B/copies, … are
    one image's and go through the graph together. An input with one row is shared by all."""
    b = max(t.shape[0] for t in inputs)
    if not applies(*inputs) or b % copies:
        return getattr(module, method)(*inputs)
    k = b // copies

    def image(j):
        return tuple(t[j::k].contiguous() if t.shape[0] > 1 else t for t in inputs)
    names, weights, digest = _weights(module)
    graph = _graph(module, method, names, weights, digest, image(0))
    if graph is None:
        return getattr(module, method)(*inputs)
    out = torch.stack([graph(list(weights), *image(j)) for j in range(k)], dim=1)
    return out.reshape(b, *out.shape[2:])


def _weights(module) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...], str]:
    """The module's parameters and buffers (names, tensors) and a digest of their names, shapes and
    dtypes; listed again when any module gained or replaced one, or a dtype changed."""
    listed = _LISTED.get(module)
    if listed is None or listed[0] != _VERSION[0] or listed[1] != tuple(w.dtype for w in listed[3]):
        named = [*module.named_parameters(), *module.named_buffers()]
        digest = hashlib.sha256(json.dumps([n + _spec(w) for n, w in named]).encode()).hexdigest()
        names, weights = tuple(n for n, _ in named), tuple(w for _, w in named)
        listed = _LISTED[module] = (_VERSION[0], tuple(w.dtype for w in weights), names, weights,
                                    digest)
    return listed[2:]


def _spec(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}"


@functools.cache
def _build() -> dict:
    """The engine's model and kernel code, torch and the CPU."""
    root, code = Path(__file__).parent, hashlib.sha256()
    for pattern in _SOURCES:
        for f in sorted(root.glob(pattern)):
            code.update(f.read_bytes())
    return {"code": code.hexdigest(), "torch": torch.__version__, "cpu": cpu_name(),
            "isa": torch.backends.cpu.get_cpu_capability()}


def _key(module, method: str, weights_digest: str, inputs) -> str:
    """What a compiled graph depends on: the engine's model and kernel code, torch, the CPU and the
    thread count, the module's weights (names, shapes, dtypes) and the inputs' shapes and dtypes."""
    desc = {**_build(), "class": type(module).__qualname__, "method": method,
            "threads": torch.get_num_threads(), "weights": weights_digest,
            "inputs": [_spec(t) for t in inputs]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def _graph(module, method, names, weights, digest, inputs):
    k = _key(module, method, digest, inputs)
    with _LOCK:
        if k not in _LOADED:
            path = cache_dir() / f"{type(module).__name__}-{method}-{k}.pt2"
            if not path.exists() and policy() == "on":
                _compile(module, method, names, weights, inputs, path)
            if path.exists():
                graph = _load(path)
                _LOADED[k] = graph if graph is not None and choose(
                    k, lambda: graph(list(weights), *inputs),
                    lambda: getattr(module, method)(*inputs)) == "graph" else None
            elif policy() == "on":
                _LOADED[k] = None  # compiling failed: eager from now on, warned once
            else:
                return None  # a later ENGINE_COMPILE=on may compile it
        return _LOADED[k]


def choose(key: str, graph, eager) -> str:
    """'graph' or 'eager' for this graph on this machine: the faster, timed on first use and kept.
    A graph wins where Python's per-op overhead is a large share (small models); at SD's sizes the
    eager path's prepacked, fused oneDNN kernels can win."""
    return measured_choice(key, {"graph": graph, "eager": eager}, cache_dir() / "choices.json",
                           repeats=3)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _load(path: Path):
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # noqa: BLE001 - the eager model always works
        print(f"engine: {path} did not load ({_why(e)}); "
              "running eagerly. Delete the file to compile it again", file=sys.stderr, flush=True)
        return None


class _Method(torch.nn.Module):
    def __init__(self, module, method):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *inputs):
        return getattr(self.module, self.method)(*inputs)


class _Call(torch.nn.Module):
    """module.method as a function of (weights, *inputs), for torch.export."""

    def __init__(self, module, method, names):
        super().__init__()
        self.inner, self.names = _Method(module, method), names

    def forward(self, weights, *inputs):
        params = {f"module.{n}": w for n, w in zip(self.names, weights)}
        return torch.func.functional_call(self.inner, params, inputs)


def _compile(module, method, names, weights, inputs, path: Path):
    shapes = ", ".join(_spec(t) for t in inputs)
    print(f"engine: compiling {type(module).__name__}.{method} for inputs {shapes} "
          f"(once; kept in {path.parent})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.pt2")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            for kind in (FutureWarning, DeprecationWarning):  # torch's own, from inside it
                warnings.simplefilter("ignore", kind)
            program = torch.export.export(_Call(module, method, names), (list(weights), *inputs))
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.chmod(tmp, 0o644)  # mkstemp's file is its owner's only
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - any failure leaves the eager model, which always works
        print(f"engine: compiling failed ({_why(e)}); "
              "running eagerly. ENGINE_COMPILE=off skips the attempt", file=sys.stderr, flush=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if path.exists():
        print(f"engine: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
