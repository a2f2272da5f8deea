"""A faster bf16 matrix-vector product for decoding on CPUs, 1 to 16 input rows, used by the fast path
(``llama.engine.fast``) and the one-call C step (``llama.engine.cpu_decode``).

Decoding one token reads every weight once, so its speed is the speed at which the linear layers stream
their weights. torch's bf16 kernel for one input row reads them at about half the machine's memory
bandwidth on the CPUs we measured (benchmarks/RESULTS.md). ``csrc/gemv_bf16.c`` streams them at close to the full
bandwidth, with OpenMP splitting the weight rows across the cores. With several input rows (a batch of requests
decoding together) it still reads each weight once per call, and keeps the arithmetic from limiting it: each
vector of weights meets a tile of input rows while it is in a register, with bf16 dot-product instructions where
the CPU has them (AVX512_BF16), fp32 FMAs on other AVX-512 and on AVX2 CPUs (see the C file's header).

It is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a cache folder
(``$LLAMA_KERNEL_CACHE``, else ``~/.cache/llama/kernels``), keyed by the source, the compiler and the CPU,
and loaded with ctypes. It runs as the torch operator ``llama::linear_bf16``, which ``torch.compile`` treats
as one opaque call; it is for inference (it has no backward). Without a working compiler, loading the kernel
warns once and ``linear_bf16`` uses ``F.linear``.

Numerics: products of bf16 values are exact in fp32, the sums run in fp32 (in another order than torch's,
so they can differ in the last fp32 bits), and the result is rounded to bf16 to nearest-even, as torch does. Each
row of a call is bitwise the call with that row alone, so a batched step gives every row its own numbers.
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
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent.parent / "csrc" / "gemv_bf16.c"
SYMBOL = "llama_gemv_bf16"
LOOP_SYMBOL = "llama_gemv_bf16_loop"  # which inner loop the build compiled (a C string)
ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3  # of SYMBOL
# -fassociative-math (with the two flags it needs) lets the compiler split the dot product over vector lanes.
BASE_FLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
BASE_FLAGS += ["-shared", "-fPIC"]

_state: dict[str, object] = {}  # "fn": the loaded function, or None once loading has failed


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LLAMA_KERNEL_CACHE``, else ``~/.cache/llama/kernels``."""
    if "LLAMA_KERNEL_CACHE" in os.environ:
        return Path(os.environ["LLAMA_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags where the OS tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keep}))


def _compile(compiler: str, flags: list[str], out: Path, source: Path = SOURCE) -> Optional[str]:
    """Compile `source` into `out` atomically; None on success, else the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            return proc.stderr.strip()[-2000:] or f"{compiler} exited with {proc.returncode}"
        os.replace(tmp, out)  # a concurrent process writing the same file writes the same bytes
        return None
    except OSError as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_kernel(
    source: Path,
    symbols: dict[str, list],
    fallback: str,
    restype: Optional[type] = None,
    extra_flags: Sequence[str] = (),
) -> Optional[dict[str, ctypes._CFuncPtr]]:
    """Compile (or take from the cache) the C file `source` and load its functions `symbols` (name -> ctypes
    argument types; they return `restype`); None, after one warning ending in `fallback`, where that fails.

    extra_flags go after the usual ones (and into the cache key): ``["-mno-avx512f"]`` builds the AVX2 loops on an
    AVX-512 machine, for the tests and benchmarks of that path."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        logger.warning("no C compiler %r on PATH (set CC): %s", compiler, fallback)
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    problems = []
    # OpenMP first; a compiler without it (Apple clang) still gives a one-thread kernel, better than nothing.
    # The source and the headers next to it (it includes them) decide the build, with the compiler and the CPU.
    texts = [source.read_text()] + [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    for flags in (BASE_FLAGS + ["-fopenmp", *extra_flags], BASE_FLAGS + list(extra_flags)):
        key = hashlib.sha256(
            "\0".join([*texts, compiler, version, " ".join(flags), _cpu_signature()]).encode()
        ).hexdigest()[:20]
        path = cache_dir() / f"{source.stem}-{key}.so"
        if not path.exists():
            problem = _compile(compiler, flags, path, source)
            if problem is not None:
                problems.append(problem)
                continue
        try:
            library = ctypes.CDLL(str(path))
            fns = {name: getattr(library, name) for name in symbols}
        except (OSError, AttributeError) as e:
            problems.append(str(e))
            continue
        for name, fn in fns.items():
            fn.argtypes = symbols[name]
            fn.restype = restype
        if "-fopenmp" not in flags:
            logger.warning("%s has no OpenMP: the kernels of %s run on one thread", compiler, source.name)
        return fns
    logger.warning("could not build %s: %s:\n%s", source.name, fallback, problems[-1])
    return None


_build_lock = threading.Lock()  # guards the first build of each kernel (load_once)


def load_once(
    state: dict[str, object], source: Path, symbol: str, argtypes: list, fallback: str
) -> Optional[ctypes._CFuncPtr]:
    """The C function `symbol` of `source` (returning int), built and loaded on the first call and kept in
    state["fn"]; None, kept too, where that fails (load_kernel warns once). The lock only guards the first
    build: later calls (every product of a decode step) only read the dict."""
    if "fn" not in state:
        with _build_lock:
            if "fn" not in state:
                fns = load_kernel(source, {symbol: argtypes}, fallback, restype=ctypes.c_int)
                state["fn"] = None if fns is None else fns[symbol]
    return state["fn"]  # type: ignore[return-value]


def kernel() -> Optional[ctypes._CFuncPtr]:
    """The compiled kernel, building it on first call; None where it cannot be built (warned once)."""
    return load_once(_state, SOURCE, SYMBOL, ARGTYPES, "the fast path uses torch's bf16 GEMV")


def available() -> bool:
    """Whether the kernel is built (or can be built now) and loaded."""
    return kernel() is not None


def kernel_variant(extra_flags: Sequence[str] = ()) -> Optional[tuple[ctypes._CFuncPtr, str]]:
    """The kernel built with `extra_flags` after the usual flags, and the name of the inner loop that build compiled
    ("avx512bf16", "avx512", "avx2" or "plain"; see the C file); None where it cannot be built. For the tests and
    benchmarks of each loop: ``["-mno-avx512bf16"]`` gives the "avx512" loop on a CPU with AVX512_BF16,
    ``["-mno-avx512f"]`` the AVX2 one on an AVX-512 machine, ``["-march=x86-64"]`` the plain one on any x86-64; no
    flags, the loop ``kernel()`` runs."""
    fns = load_kernel(SOURCE, {SYMBOL: ARGTYPES, LOOP_SYMBOL: []}, "no such variant", ctypes.c_int, extra_flags)
    if fns is None:
        return None
    fns[LOOP_SYMBOL].restype = ctypes.c_char_p
    return fns[SYMBOL], fns[LOOP_SYMBOL]().decode()


# A plain operator definition rather than torch.library.custom_op: the decorator's wrappers cost about 10 us
# a call, and a decoded token makes over a hundred calls.
_library = torch.library.Library("llama", "FRAGMENT")
_library.define("linear_bf16(Tensor x, Tensor weight) -> Tensor")


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for bf16 CPU tensors, through the C kernel. x: (..., k), weight: (n, k).

    Also the torch operator ``torch.ops.llama.linear_bf16``, which ``torch.compile`` calls as one opaque step.
    """
    bf16_cpu = all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (x, weight))
    if not bf16_cpu:
        raise TypeError(
            f"linear_bf16 takes bf16 CPU tensors, got x {x.dtype} on {x.device}, weight {weight.dtype} on "
            f"{weight.device}"
        )
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_bf16: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    fn = kernel()
    if fn is None:
        return F.linear(x, weight)
    n, k = weight.shape
    x2 = x if x.is_contiguous() else x.contiguous()  # the kernel widens it to fp32 (exactly)
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)  # few aten calls: a decode step makes 100+ of these
    rows = y.numel() // n if n else 0
    if fn(x2.data_ptr(), w.data_ptr(), y.data_ptr(), rows, n, k):
        raise MemoryError(f"linear_bf16: out of memory for the kernel's scratch ({rows} rows of {k})")
    return y


_library.impl("linear_bf16", linear_bf16, "CompositeExplicitAutograd")


@torch.library.register_fake("llama::linear_bf16")
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# Input rows up to which each inner loop of the kernel is the faster choice (benchmarks/bench_batch_decode.py,
# RESULTS.md 2026-12-04): on a Zen 4 the bf16 dot-product loop beat torch's bf16 kernel (which has those instructions
# there) at 1 to 16 rows; the fp32 loops, built there for CPUs without them, beat it up to 8 rows and not at 16,
# which is as far as we know (torch has no bf16 instructions either on those CPUs); the plain loop was measured at
# one row only.
MAX_ROWS = {"avx512bf16": 16, "avx512": 8, "avx2": 8, "plain": 1}


def max_rows() -> int:
    """The most input rows for which the built kernel is the faster choice (``MAX_ROWS`` of its loop); 0 where it
    cannot be built."""
    if "max_rows" not in _state:
        variant = kernel_variant() if available() else None  # the same library kernel() loaded
        _state["max_rows"] = 0 if variant is None else MAX_ROWS.get(variant[1], 1)
    return _state["max_rows"]  # type: ignore[return-value]


def applies(x_rows: int, weight: torch.Tensor) -> bool:
    """Whether the kernel is the faster choice: bf16 weights on the CPU, 1 to ``max_rows()`` input rows (decoding a
    batch: it reads each weight once for all of them; 16 where the CPU has bf16 dot products), and a built kernel.
    With more rows (prefill), torch's GEMMs win."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and 1 <= x_rows <= max_rows()


FP32_CHUNK = 1 << 24  # fp32 elements (64 MB) of weight held at a time by linear_in_fp32_chunks
_scratch = threading.local()  # each thread's reused chunk buffer: fresh pages would cost a fault per 4 KB


def linear_in_fp32_chunks(
    x: torch.Tensor, n: int, rows: Callable[[int, int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``F.linear(x, weight)`` in fp32 for a weight (n, k) that ``rows(lo, hi, out)`` gives as fp32 rows lo..hi,
    written into the fp32 buffer `out`: torch's fp32 GEMM a chunk of rows at a time, so neither the whole fp32
    weight nor fresh memory is needed. The result is in x's dtype. For prefill on CPUs, where torch's fp32 GEMM
    is many times faster than its kernels for bf16 or quantized weights (without native bf16 instructions)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    step = max(1, min(n, FP32_CHUNK // k))
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < step * k:
        # a normal tensor even when made under inference mode, so that later calls outside it can write it
        with torch.inference_mode(False):
            buffer = _scratch.buffer = torch.empty(step * k, dtype=torch.float32)
    if step == n:  # the usual case: one chunk
        return F.linear(x2, rows(0, n, buffer)).to(x.dtype).view(*x.shape[:-1], n)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        y[:, lo:hi] = F.linear(x2, rows(lo, hi, buffer))
    return y.to(x.dtype).view(*x.shape[:-1], n)


def linear_upcast(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a half-precision CPU weight, by torch's fp32 GEMM over fp32 copies of its rows
    (a chunk at a time): the exact products summed in fp32, rounded once to x's dtype."""

    def rows(lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        return out[: (hi - lo) * weight.shape[1]].view(hi - lo, -1).copy_(weight[lo:hi])

    return linear_in_fp32_chunks(x, weight.shape[0], rows)
