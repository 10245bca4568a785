"""The banded sliding-window kernel fused per block of queries: C compiled on first use, the torch path as fallback.

``_BandedCore`` (``attention_sliding_kernels.py``) runs every op over a chunk of ~1 MiB of scores, so that Python's
per-op cost is paid once per chunk. That working set spills a core's L2 and every op streams it again: its forward
reaches about 40-45% of the machine's matmul rate on the band's useful work, its forward + backward about 30-35%.
The C kernel (``attention_sliding_native.c``, beside this file) runs each op on one block of queries, with MKL's
``sgemm`` (from the torch library already loaded) for the matmuls, so that a block's scores stay in cache from the
matmul that writes them to the ones that read them, and no Python runs per block.

- ``native_kernel()``: the compiled library, or None where it cannot be had (no C compiler, no ``sgemm_`` in torch's
  library, ``HF_XARCH_NATIVE_KERNEL=0``, no C source); ``native_kernel_error()`` says which. Compiled once per
  machine and source into ``~/.cache/hf_xarch/kernels`` (or ``$HF_XARCH_KERNEL_CACHE``): plain C without torch
  headers, well under a second.
- ``native_supported(query)``: whether a call can take it (CPU, float32; dropout included, its mask a hash of
  (seed, head, query, key), drawn again identically by the backward).
- ``Head``: one head's pointers and sizes, as the C functions take them; ``run_heads`` runs a function of (batch
  row, head, workspace) over all heads, on ``torch.get_num_threads()`` threads (the C calls release the GIL).

The custom op ``hf_xarch::sliding_window_attention`` (``attention_sliding_kernels.py``) is built on these.

A saved model carries the C source beside its Python files, so that a model loaded with ``trust_remote_code=True``
compiles and uses the same kernel (see ``KERNEL_FILE``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers.utils import cached_file, logging

logger = logging.get_logger(__name__)

# Compiled with -O3 -march=native (the library is built on, and cached for, the machine that runs it) and
# -fopenmp-simd for the reductions' `#pragma omp simd` (no OpenMP runtime is linked). On x86, 512-bit vectors where
# the CPU has them: GCC's default of 256 bits costs ~10% of the forward (the exp and max passes).
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared") + (
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())
DISABLE_ENV = "HF_XARCH_NATIVE_KERNEL"
CACHE_ENV = "HF_XARCH_KERNEL_CACHE"

# The C source, beside this file. A saved model carries it too: ``XArchPreTrainedModel.save_pretrained`` writes it next
# to the Python files (transformers copies only those), and ``from_pretrained`` fetches it for code loaded with
# ``trust_remote_code=True`` (whose module folder holds only the Python files) and hands it to ``use_kernel_source``.
KERNEL_FILE = "attention_sliding_native.c"
_BESIDE = Path(__file__).with_name(KERNEL_FILE)
_SOURCE = [_BESIDE]
# the C source's text as it was when this module was imported (or handed over): the kernel is compiled lazily, and a
# file updated on disk meanwhile (a reinstall, a checkout) must not pair a new kernel with this module's Python side
_SOURCE_TEXT: dict[Path, str] = {_BESIDE: _BESIDE.read_text()} if _BESIDE.is_file() else {}


class Head(ctypes.Structure):
    """The C ``Head``: one head's sizes and pointers (see ``attention_sliding_native.c`` for each field)."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("n", "dim", "block", "span", "left", "extra", "n_strips")],
        ("scale", ctypes.c_double), ("dropout", ctypes.c_double),
        ("seed", ctypes.c_int64), ("stream", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("q", "k", "v")],
        *[(name, ctypes.c_int64) for name in ("q_stride", "k_stride", "v_stride")],
        ("kt", ctypes.c_void_p), ("vt", ctypes.c_void_p), ("t_stride", ctypes.c_int64),
        ("ek", ctypes.c_void_p), ("ev", ctypes.c_void_p),
        *[(name, ctypes.c_void_p) for name in ("band_bias", "strips", "key_bias", "clean", "extra_bias")],
        ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("row_max", "row_inv_sum", "scores", "grad_scores")],
        ("grad_out", ctypes.c_void_p), ("grad_out_stride", ctypes.c_int64),
        ("grad_q", ctypes.c_void_p), ("grad_q_stride", ctypes.c_int64),
        ("grad_k", ctypes.c_void_p), ("grad_v", ctypes.c_void_p),
        ("grad_k_stride", ctypes.c_int64), ("grad_v_stride", ctypes.c_int64),
        ("grad_ek", ctypes.c_void_p), ("grad_ev", ctypes.c_void_p),
        ("grad_out_col_stride", ctypes.c_int64), ("grad_out_block", ctypes.c_void_p),
        ("grad_band_bias", ctypes.c_void_p), ("grad_extra_bias", ctypes.c_void_p),
    ]


_LOCK = threading.Lock()
_KERNEL: list = []  # [library or None], filled on first use


def _torch_blas() -> tuple[int, int]:
    """Addresses of ``sgemm_`` and ``MKL_Set_Num_Threads_Local`` in the torch library already loaded (the latter 0 if
    absent). Torch builds without MKL (macOS, ARM) have no ``sgemm_`` there: the torch path runs instead. (MKL's
    lower-case ``mkl_set_num_threads_local`` is the Fortran entry, which takes a pointer.)"""
    library = Path(torch.__file__).parent / "lib" / ("libtorch_cpu" + (".dylib" if sys.platform == "darwin" else ".so"))
    handle = ctypes.CDLL(str(library))
    sgemm = ctypes.cast(handle.sgemm_, ctypes.c_void_p).value
    try:
        threads = ctypes.cast(handle.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value
    except AttributeError:
        threads = 0
    return sgemm, threads or 0


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_xarch", "kernels")
    return Path(root)


def kernel_source() -> Path:
    """The C source the kernel is built from: ``KERNEL_FILE`` beside this file, or the one ``use_kernel_source``
    handed over."""
    return _SOURCE[0]


def use_kernel_source(path: str | os.PathLike) -> None:
    """Build the kernel from ``path`` (a saved model's copy of ``KERNEL_FILE``): for code loaded with
    ``trust_remote_code=True``, which has no C source beside it. A kernel already loaded stays; a failed load is
    tried again."""
    with _LOCK:
        _SOURCE[0] = Path(path)
        if _SOURCE[0].is_file():
            _SOURCE_TEXT[_SOURCE[0]] = _SOURCE[0].read_text()
        if _KERNEL and _KERNEL[0][0] is None:
            _KERNEL.clear()


def save_kernel_source(folder: str | os.PathLike) -> None:
    """Write the C source into a folder that ``save_pretrained`` wrote (transformers copies only the Python files),
    where ``fetch_kernel_source`` finds it again; nothing where this process has no source either."""
    if kernel_source().is_file():
        shutil.copyfile(kernel_source(), Path(folder) / KERNEL_FILE)


# from_pretrained's arguments that say where its files come from, as transformers' cached_file takes them
_HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def fetch_kernel_source(pretrained_model_name_or_path, from_pretrained_kwargs: dict) -> None:
    """For code loaded with ``trust_remote_code=True``, whose folder holds only Python files: the saved model's
    ``KERNEL_FILE``, from its local folder or Hub repository (downloaded like its other files), handed to
    ``use_kernel_source``. A model saved without one runs the torch path, with a warning and the reason in
    ``native_kernel_error()``."""
    if pretrained_model_name_or_path is None or _BESIDE.is_file():
        return
    hub = {name: from_pretrained_kwargs[name] for name in _HUB_ARGUMENTS if name in from_pretrained_kwargs}
    try:
        path = cached_file(str(pretrained_model_name_or_path), KERNEL_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub)
    except OSError:  # a folder or repository that cannot be read: from_pretrained itself reports it
        return
    if path is None:
        logger.warning_once(f"{KERNEL_FILE} is not in {pretrained_model_name_or_path} (saved without it): "
                            "sliding-window attention runs its torch path, about 1.5-2x slower on CPU")
        return
    use_kernel_source(path)


def _build(compiler: str, source: str) -> Path:
    """The compiled library for this source text, compiler and machine: built once, then found in the cache. The key
    includes the CPU (``-march=native`` code must not run on another machine sharing the cache)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    cpu = platform.machine() + platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            cpu += next((line for line in info if line.startswith(("flags", "Features"))), "")
    key = hashlib.sha256("\0".join([source, version, cpu, *COMPILE_FLAGS]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"banded_kernel_{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError:  # a read-only home: a private folder in the temporary directory instead
        uid = getattr(os, "getuid", lambda: 0)()
        folder = Path(tempfile.gettempdir()) / f"hf_xarch_kernels_{uid}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_uid != uid or folder.stat().st_mode & 0o022:  # never load a library others could plant
            raise PermissionError(f"{folder} is not a private folder of this user")
        target = folder / target.name
        if target.exists():
            return target
    logger.info(f"hf_xarch: compiling the native banded kernel into {target} (once per machine)")
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built, code = Path(scratch) / target.name, Path(scratch) / KERNEL_FILE
        code.write_text(source)
        subprocess.run([compiler, *COMPILE_FLAGS, str(code), "-o", str(built)], capture_output=True, text=True,
                       check=True)
        os.replace(built, target)  # atomic: another process building the same key meanwhile is harmless
    return target


def native_kernel():
    """The compiled kernel library (a ``ctypes.CDLL``), or None where it cannot be had; the reason is kept in
    ``native_kernel_error()``. Built and loaded once per process."""
    with _LOCK:
        if not _KERNEL:
            _KERNEL.append(_load())
            if _KERNEL[0][0] is None:
                logger.info(f"hf_xarch: the native banded kernel is not available ({_KERNEL[0][1]}); sliding-window "
                            "attention runs its torch path, about 1.5-2x slower on CPU")
    return _KERNEL[0][0]


def native_kernel_error() -> str | None:
    """Why ``native_kernel()`` is None (None when it loaded)."""
    native_kernel()
    return _KERNEL[0][1]


def _load():
    if os.environ.get(DISABLE_ENV, "1").lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler found (set CC)"
    source = kernel_source()
    if not source.is_file():
        return None, (f"its C source {source} is missing (a model loaded with trust_remote_code fetches {KERNEL_FILE} "
                      "from the folder or repository it was loaded from; one saved without it runs the torch path)")
    try:
        sgemm, threads = _torch_blas()
    except (OSError, AttributeError) as error:
        return None, f"torch's library has no sgemm_ ({error})"
    try:
        text = _SOURCE_TEXT.get(source) or _SOURCE_TEXT.setdefault(source, source.read_text())
        library = ctypes.CDLL(str(_build(compiler, text)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        return None, f"compiling the kernel failed: {detail.strip()[-500:]}"
    library.xarch_set_blas(ctypes.c_void_p(sgemm), ctypes.c_void_p(threads))
    for name in ("xarch_banded_forward", "xarch_banded_backward"):
        getattr(library, name).argtypes = [ctypes.POINTER(Head)]
        getattr(library, name).restype = ctypes.c_int
    library.xarch_prefault.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    library.xarch_prefault.restype = ctypes.c_int
    return library, None


@torch.compiler.assume_constant_result
def native_available() -> bool:
    """Whether the kernel loaded here: a constant to ``torch.compile``, which cannot trace the loader (a lock, a
    compiler run)."""
    return native_kernel() is not None


def native_supported(query: torch.Tensor) -> bool:
    """Whether ``banded_attention`` can run the C kernel: CPU float32, and the library could be built here."""
    return query.device.type == "cpu" and query.dtype == torch.float32 and native_available()


def pointer(x: torch.Tensor | None) -> int | None:
    """The address of ``x``'s first element, or None (a NULL pointer) for a missing or empty tensor."""
    return x.data_ptr() if x is not None and x.numel() else None


# Outputs smaller than this are not pre-faulted: a call costs a system call, and a decoding step's few rows gain
# nothing from it.
PREFAULT_MIN_BYTES = 1 << 20


def prefault(*tensors: torch.Tensor) -> None:
    """Fault in the pages of fresh output tensors before the kernel writes them (``xarch_prefault``): cheaper at
    once than one page at a time mid-loop. Tensors below ``PREFAULT_MIN_BYTES`` are left alone."""
    library = native_kernel()
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() >= PREFAULT_MIN_BYTES:
            library.xarch_prefault(storage.data_ptr(), storage.nbytes())


_POOL: list = []  # [(pid, workers, ThreadPoolExecutor)]: grown when more threads are asked for, made anew after a
# fork (a forked child inherits the executor but not its threads, and would wait forever on it)


def run_heads(fn, batch: int, heads: int, like: torch.Tensor, workspace_type) -> None:
    """``fn(b, h, workspace)`` for every (batch row, head), on up to ``torch.get_num_threads()`` threads, each with
    its own workspace (``workspace_type(like)``), without autograd. Heads are independent: each writes only its own
    rows."""
    jobs = [(b, h) for b in range(batch) for h in range(heads)]
    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1:
        work = workspace_type(like)
        for b, h in jobs:
            fn(b, h, work)
        return
    with _LOCK:
        if not _POOL or _POOL[0][0] != os.getpid() or _POOL[0][1] < workers:
            if _POOL and _POOL[0][0] == os.getpid():
                _POOL[0][2].shutdown(wait=False)
            _POOL[:] = [(os.getpid(), workers, ThreadPoolExecutor(max_workers=workers,
                                                                 thread_name_prefix="xarch-banded"))]
        pool = _POOL[0][2]
    local = threading.local()

    def job(b, h):
        if not hasattr(local, "work"):
            local.work = workspace_type(like)
        with torch.no_grad():  # grad mode is per thread: the autograd function's forward turned it off only here
            fn(b, h, local.work)

    for future in [pool.submit(job, b, h) for b, h in jobs]:
        future.result()
