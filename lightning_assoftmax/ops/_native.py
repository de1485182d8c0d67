"""Fused CPU kernels written in C, compiled on first use and called through ``ctypes``.

Why: at few classes a loss is a few microseconds of arithmetic per thousand samples, and a chain
of torch ops spends most of its time starting ops. One C call does the whole forward (loss and
gradient) in one pass over cache-resident tiles.

How: ``native/kernels.c`` is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) into ``<cache>/kernels/`` (see :func:`lightning_assoftmax._cache.default_cache_dir`),
once per machine and source version (well under a second), and loaded with ``ctypes``, which
releases the GIL during the call so that row ranges can run on several threads.

Where that is not possible (no compiler, a read-only cache, a non-CPU tensor) the torch
implementation runs instead, with the same results; it is logged once. Set
``LIGHTNING_ASSOFTMAX_NATIVE=0`` to always use the torch implementation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from lightning_assoftmax._cache import default_cache_dir
from lightning_assoftmax.ops._blocks import FEW_CLASSES

__all__ = [
    "count_not_binary",
    "direct_rows",
    "kernel_applies",
    "kernel_view",
    "native_for",
    "native_library",
    "native_status",
    "new_gradient",
    "pointer",
    "rows_major",
    "run_rows",
    "scale_by_rows",
    "set_vector_kernels",
    "split_workers",
    "to_input_layout",
    "vector_kernels_available",
]

_log = logging.getLogger(__name__)
_BASE_FLAGS = [
    "-O3",
    "-std=c11",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
]
#: Rows x classes below which one thread does the whole call (thread start-up costs more).
PARALLEL_ELEMENTS = 1 << 18

_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "reason": "not loaded yet"}
_pool: dict = {}


def _enabled() -> bool:
    return os.environ.get("LIGHTNING_ASSOFTMAX_NATIVE", "1").strip().lower() not in {
        "0",
        "false",
        "no",
        "off",
    }


def _compiler() -> str | None:
    explicit = os.environ.get("CC")
    if explicit:
        return shutil.which(explicit) or None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _compile(cc: str, source_dir: Path, target: Path) -> None:
    """Compile ``kernels.c`` into ``target`` (atomically: concurrent processes may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        errors = ""
        # The widest vectors this CPU has; then portable fallbacks for compilers that refuse.
        for extra in (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []):
            cmd = [cc, *_BASE_FLAGS, *extra, str(source_dir / "kernels.c"), "-o", tmp, "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
            errors = done.stderr.strip()[-2000:]
        raise RuntimeError(f"{cc} failed: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_double
    for suffix in ("f32", "f64"):
        fn = getattr(lib, f"singlelabel_{suffix}")
        fn.restype = i64
        fn.argtypes = [ptr, ptr, i64] + [ptr] * 5 + [i32] + [i64] * 8 + [f64] * 2 + [i64] * 2
        fn = getattr(lib, f"multilabel_{suffix}")
        fn.restype = i64
        fn.argtypes = [ptr, ptr, i32] + [ptr] * 6 + [i64] * 11 + [f64] * 4 + [i64] * 2
        fn = getattr(lib, f"ml_scale_{suffix}")
        fn.restype = None
        fn.argtypes = [ptr] * 5 + [f64] + [i64] * 4
        fn = getattr(lib, f"not_binary_{suffix}")
        fn.restype = i64
        fn.argtypes = [ptr, i64]
    lib.vector_kernels_available.restype = i32
    lib.vector_kernels_available.argtypes = []


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    source_dir = Path(str(resources.files("lightning_assoftmax.ops") / "native"))
    digest = hashlib.sha256()
    for source in sorted(source_dir.glob("*.[ch]")):  # every file kernels.c may include
        digest.update(source.name.encode() + source.read_bytes())
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    for part in (cc, version.stdout, " ".join(_BASE_FLAGS), platform.machine(), _cpu_identity()):
        digest.update(part.encode())
    target = default_cache_dir() / "kernels" / f"lightning_assoftmax-{digest.hexdigest()[:20]}.so"
    if not target.exists():
        _compile(cc, source_dir, target)
    lib = ctypes.CDLL(str(target))
    _declare(lib)
    return lib


def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` when disabled or unavailable (the reason is logged once)."""
    if not _enabled():
        return None
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["lib"] = _load()
                _state["reason"] = "loaded"
            except Exception as err:  # any failure means: use the torch implementation
                _state["reason"] = f"unavailable: {err}"
                _log.warning(
                    "lightning_assoftmax: compiled CPU kernels %s; using the torch "
                    "implementation (same results, slower at few classes).",
                    _state["reason"],
                )
            _state["tried"] = True
    return _state["lib"]


def native_status() -> str:
    """``"loaded"``, ``"disabled"``, ``"not loaded yet"`` or ``"unavailable: <reason>"``."""
    if not _enabled():
        return "disabled"
    return _state["reason"]


def vector_kernels_available() -> bool:
    """Whether the library has the AVX-512 kernels for float rows with few labels (it has when the
    compiler targets a CPU with AVX-512F/BW/VL/DQ)."""
    lib = native_library()
    return lib is not None and bool(lib.vector_kernels_available())


def set_vector_kernels(enabled: bool) -> bool:
    """Use the AVX-512 kernels where they apply (the default) or always the generic C kernels,
    e.g. to test both on one machine; returns the previous setting."""
    flag = ctypes.c_int.in_dll(native_library(), "vector_kernels_enabled")
    previous = bool(flag.value)
    flag.value = int(enabled)
    return previous


def _executor(workers: int) -> ThreadPoolExecutor:
    # Keyed by process too: a forked child (e.g. a DataLoader worker) has none of the threads.
    key = (os.getpid(), workers)
    pool = _pool.get(key)
    if pool is None:
        pool = _pool[key] = ThreadPoolExecutor(workers, thread_name_prefix="assoftmax")
    return pool


def run_rows(call, num_rows: int, num_classes: int) -> int:
    """``call(r0, r1)`` over ``[0, num_rows)``, split over ``torch.get_num_threads()`` threads
    when the work is large enough; returns the sum of the calls' results, or the lowest of them
    where one is negative (a failure code)."""
    workers = split_workers(num_rows, num_classes)
    if workers <= 1:
        return call(0, num_rows)
    bounds = [num_rows * k // workers for k in range(workers + 1)]
    results = list(_executor(workers).map(call, bounds[:-1], bounds[1:]))
    lowest = min(results)
    return lowest if lowest < 0 else sum(results)


def split_workers(num_rows: int, num_classes: int) -> int:
    """How many threads :func:`run_rows` uses for these rows (1: the calling thread alone)."""
    workers = min(torch.get_num_threads(), max(1, num_rows * num_classes // PARALLEL_ELEMENTS))
    return workers if num_rows >= 2 * workers else 1


#: Channel-second logits ``(N, C, L)`` with more classes than this stay on the torch path: the
#: kernels would read each sample's classes ``L`` elements apart, one cache line per element.
MAX_STRIDED_CLASSES = 4096


def kernel_applies(layout, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether the compiled kernels handle these logits (CPU, a supported dtype and layout)."""
    if layout.columns and not layout.transposed and layout.num_classes > MAX_STRIDED_CLASSES:
        return False
    return native_for(layout.z, dtypes) is not None


def native_for(z: Tensor, dtypes: tuple[torch.dtype, ...]) -> ctypes.CDLL | None:
    """The compiled kernels if they handle logits ``z`` (CPU, a supported dtype), else ``None``."""
    if z.device.type != "cpu" or z.dtype not in dtypes:
        return None
    return native_library()


def direct_rows(logits: Tensor, dtypes: tuple[torch.dtype, ...]) -> tuple[ctypes.CDLL, Tensor] | None:
    """``(library, rows)`` when the compiled kernels take ``(M, C)`` logits without a block
    layout, else ``None``: few classes are read in tiles with any strides, long rows in place
    (made contiguous first)."""
    if logits.dim() != 2:
        return None
    lib = native_for(logits, dtypes)
    if lib is None:
        return None
    return lib, logits if logits.shape[1] < FEW_CLASSES else logits.contiguous()


def kernel_view(layout, t: Tensor) -> tuple[int, int, tuple[int, int, int]]:
    """``(rows, length, strides)`` of logits-shaped ``t`` as the kernels read it: ``(B, C, L)``
    with element strides. ``(M, C)`` rows (those of :func:`direct_rows`, ``layout`` ``None``, or
    a layout's row blocks) are sample ``l`` of a single ``(1, C, M)`` batch, so that a tile of
    rows is evenly spaced in memory and read without an offset table."""
    if t.dim() == 3:
        return layout.num_rows, t.shape[2], t.stride()
    return t.shape[0], t.shape[0], (0, t.stride(1), t.stride(0))


def new_gradient(layout, z: Tensor, dtype: torch.dtype) -> tuple[Tensor, tuple[int, int, int]]:
    """The kernels' gradient buffer for logits ``z`` (see :func:`kernel_view`) and its strides.
    ``(M, C)`` logits with few classes are read as ``(1, C, M)`` but their gradient is written as
    ``(M, C)`` rows: returned as it is, it needs no transposing copy in autograd (see
    :func:`to_input_layout`)."""
    if layout is None:
        grad = torch.empty(z.shape, dtype=dtype)
    elif layout.transposed:
        grad = torch.empty(layout.shape, dtype=dtype)
    else:
        grad = layout.new_out(dtype)
    return grad, grad.stride() if grad.dim() == 3 else (0, 1, grad.shape[1])


def rows_major(layout, grad: Tensor) -> bool:
    """Whether a gradient buffer is ``(M, C)`` rows: those of :func:`direct_rows` (``layout`` is
    ``None``), or a layout walking columns with a row-major gradient."""
    return layout is None or (layout.columns and grad.dim() == 2)


def to_input_layout(layout, grad: Tensor) -> Tensor:
    """A gradient buffer (block layout, or rows from :func:`new_gradient`) shaped like the logits;
    ``layout`` is ``None`` for the ``(M, C)`` rows of :func:`direct_rows`."""
    if rows_major(layout, grad):
        return grad
    return layout.to_input_layout(grad)


def scale_by_rows(
    v: Tensor, neg: int, pos: int, grad_loss: Tensor | float, out: Tensor
) -> Tensor:
    """``out = grad_loss * v * (pos if v < 0 else neg)`` per row in one C pass (``out`` may be
    ``v``); ``v`` is a kernel's contiguous ``(rows, C)`` or ``(B, C, L)`` gradient buffer, and
    ``neg`` and ``pos`` are addresses of per-row factor arrays. ``grad_loss`` is one value per row,
    or a number for every row. Entries with ``v = 0`` get exactly 0, whatever ``grad_loss`` is."""
    lib = _state["lib"]  # loaded: the forward pass that made v ran a kernel
    kernel = lib.ml_scale_f64 if v.dtype == torch.float64 else lib.ml_scale_f32
    num_classes = v.shape[1]
    length = v.shape[2] if v.dim() == 3 else 1
    num_rows = v.shape[0] * length
    if isinstance(grad_loss, Tensor):
        grad_loss = grad_loss.reshape(-1).contiguous()  # e.g. the expanded gradient of a sum
        per_row, value = pointer(grad_loss), 0.0
    else:
        per_row, value = None, grad_loss
    head = (pointer(v), pointer(out), neg, pos, per_row, value, num_classes, length)

    def call(r0: int, r1: int) -> int:
        kernel(*head, r0, r1)
        return 0

    run_rows(call, num_rows, num_classes)
    return out


def count_not_binary(t: Tensor) -> int | None:
    """How many entries of a contiguous CPU float32/float64 tensor are neither 0 nor 1 (NaN
    included), or ``None`` where the kernels do not apply."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    if not t.is_contiguous():
        return None
    lib = native_library()
    if lib is None:
        return None
    fn = lib.not_binary_f64 if t.dtype == torch.float64 else lib.not_binary_f32
    return fn(pointer(t), t.numel())


def pointer(t: Tensor | None) -> int | None:
    """The address of a tensor's first element for a ``c_void_p`` argument (``None``: NULL)."""
    return t.data_ptr() if t is not None else None
