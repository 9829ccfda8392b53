"""A product that streams the weight once for a few rows, built on this machine at first use.

`x W^T` for the handful of rows of a decoding step is memory-bound: every row needs the same
weights, so a step of 8 rows could cost what a step of one costs. Torch's CPU BLAS does not get
there: at 8 rows MKL's products ran at ~12 GB/s on an AVX-512 CPU where one row ran at 20-34,
so 8 questions at once cost about twice one. `skinny.cpp` keeps the sums of a block of x's rows
for a group of weight rows in registers and reads the group once per block (AVX-512: 3 weight
rows x 8 rows of x; AVX2: 2 x 8; blocks of 4 rows read a group twice for 8 and cost 1.4-1.6x
one row there) and prefetches the next group while summing. Which shape is fastest depends on
the CPU: AVX-512 builds have three (3 x 8, 4 x 6, 5 x 5; `shapes`), and a table in the library
names the one each row count uses (`set_shape`), which the engine measures at its start for
a prefill's row counts (`kernels.measure_shapes`): on an AVX-512 EPYC 4 x 6 and 5 x 5 ran a
prefill in 0.75-0.85 of 3 x 8's time, while its 8-row decoding steps stayed fastest in 3 x 8.
Measured over SmolLM2-135M's 211 weights (fp32, ms for all of them, 2 cores, F.linear / this;
the rows of one date side by side, the dates on different machines):

    rows                             1          2          4          8
    Xeon AVX-512, 2 threads, 29 Nov  19.1/19.0  20.8/19.4  34.3/21.3  44.6/25.8  (4 x 4)
    Xeon AVX-512, 2 threads, 5 Dec   40.0/27.3  34.6/27.8  56.7/29.4  71.5/37.7  (3 x 8)
    Xeon AVX-512, 1 thread, 5 Dec    58.2/49.3  61.7/54.3  103/55.7   142/64.2   (3 x 8)
    EPYC AVX2, 2 threads, 29 Nov     58.0/26.7  88.9/28.2  101/28.1   97.0/29.2  (lm_head apart)

On 5 Dec, 4 x 4 took 26.0 / 28.1 / 29.7 / 53.0 ms in the same run as the 3 x 8 row (1 thread:
50.0 / 53.7 / 55.7 / 75.9): 8 rows cost 2.0x one row there, 1.4x with 3 x 8.

It also reads bfloat16 weights, widened to float32 as they are read and summed in float32 (as
torch's bf16 products sum): a step then reads half the bytes, where torch's own bf16 products on
a CPU without AVX512-BF16 or AMX are emulated (two threads, 8 rows: 87 ms F.linear in bf16, 28
ms this in bf16, 37 this in float32; 1 row: 25 / 18 / 26).

It also runs a whole Llama layer for a decoding step's rows, or a prefill's tokens, in one
call (`layer_step`, used by `bot/engine/decoding.py`): the products above, and between them the
norms, RoPE, the cache write, attention and SiLU that through torch took ~40 small ops a layer.

It is compiled with the machine's C++ compiler (`-O3 -march=native -fopenmp`: AVX-512, or AVX2
with FMA) into a cache folder keyed by the source, the compiler and the CPU, so a machine builds
it once (~7 s with three shapes); where there is no compiler or the CPU has neither, `load`
returns None and the engine keeps torch's products. Its OpenMP is torch's own runtime (the
same `libgomp.so.1`, already loaded), so the kernel's threads are the engine thread's team, not
a second set that would fight torch's for the two cores; a process where two runtimes end up
loaded refuses it.
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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
CACHE_ENV = "APPRENTICE_KERNEL_DIR"  # where built kernels are kept (default ~/.cache/...)
_LOADED: dict[tuple, object] = {}  # (folder, flags) -> the library, or None when it failed


def cache_dir() -> Path:
    folder = os.environ.get(CACHE_ENV)
    return Path(folder) if folder else Path.home() / ".cache" / "apprentice" / "kernels"


def _cpu_signature() -> str:
    """The CPU model and flags: a kernel built with -march=native runs only where they match."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            lines = [line for line in info if line.startswith(("flags", "model name", "Features"))]
    except OSError:
        lines = []
    return platform.machine() + "".join(sorted(set(lines)))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(target: Path, compiler: str, flags: tuple[str, ...]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, target)  # atomic: another process building too finds one whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _runtimes() -> set[str]:
    """The OpenMP runtimes (GNU's, LLVM's or Intel's library files) mapped into this process."""
    names = ("libgomp", "libomp", "libiomp")
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return {line.split()[-1] for line in maps if line.rsplit("/", 1)[-1].startswith(names)}
    except OSError:
        return set()


def load(*, folder: Path | None = None, flags: tuple[str, ...] = FLAGS):
    """The built kernel (a ctypes library), building it first if needed; None where it cannot
    be built or loaded here (the reason is logged once)."""
    folder = Path(folder) if folder else cache_dir()
    key = (str(folder), flags)
    if key in _LOADED:
        return _LOADED[key]
    library = None
    compiler = _compiler()
    if compiler is None:
        log.info("no C++ compiler found: the skinny product is not built, torch's are used")
    else:
        try:
            version = subprocess.run(
                [compiler, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
            digest = hashlib.sha256(
                "\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_signature()]).encode()
            ).hexdigest()[:16]
            target = folder / f"skinny-{digest}.so"
            if not target.exists():
                _build(target, compiler, flags)
            before = _runtimes()
            library = ctypes.CDLL(str(target))  # CDLL releases the GIL during each call
            if len(_runtimes() | before) > 1:
                log.warning(
                    "the skinny product brought a second OpenMP runtime (%s): not used",
                    sorted(_runtimes()),
                )
                library = None
            else:
                # x, w, y, M, K, N, threads; the corrected product then a, mask, bt, E
                product = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
                corrected = product + [ctypes.c_void_p] * 3 + [ctypes.c_long]
                # x, M, H, heads, kv_heads, D, I, norm1, norm2, eps, w, ext_a, ext_mask,
                # ext_bt, ext_e, cos, sin, kcache, vcache, capacity, length, seqs, cols, mask,
                # mask_width, scale, threads
                layer = [ctypes.c_void_p] + [ctypes.c_long] * 6 + [ctypes.c_void_p] * 2
                layer += [ctypes.c_float] + [ctypes.c_void_p] * 9 + [ctypes.c_long] * 2
                layer += [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_float, ctypes.c_int]
                for function, argtypes in (
                    (library.skinny_linear, product),
                    (library.skinny_linear_bf16, product),
                    (library.skinny_linear_corrected, corrected),
                    (library.skinny_decode_layer, layer),
                    (library.skinny_decode_layer_bf16, layer),
                ):
                    function.argtypes = argtypes
                    function.restype = None
                library.skinny_vector_width.restype = ctypes.c_int
                library.skinny_shape_count.restype = ctypes.c_int
                number = ctypes.POINTER(ctypes.c_int)
                library.skinny_shape.argtypes = [ctypes.c_int, number, number]
                library.skinny_shape.restype = ctypes.c_int
                library.skinny_set_shape.argtypes = [ctypes.c_long, ctypes.c_int]
                library.skinny_set_shape.restype = ctypes.c_int
                library.skinny_shape_for.argtypes = [ctypes.c_long]
                library.skinny_shape_for.restype = ctypes.c_int
                library.skinny_exp.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long]
                library.skinny_exp.restype = None
        except (OSError, AttributeError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            log.info("the skinny product could not be built here (%s): torch's are used", detail)
            library = None
    _LOADED[key] = library
    return library


DTYPES = (torch.float32, torch.bfloat16)  # the weights' dtypes the kernel reads
EXTENSION_STEP = 16  # an extension's width must be a multiple of this (both vector widths)
SHAPE_ROWS = 256  # the row counts the kernel's shape table names (its last entry serves more)


def shapes(library) -> list[tuple[int, int]]:
    """The product shapes this build has, by index (the first the default): (weight rows, rows
    of x) summed together in registers, one pass over a group of weight rows serving a block
    of x's rows. Which is fastest depends on the CPU and the row count (see skinny.cpp)."""
    found = []
    for index in range(library.skinny_shape_count()):
        nw, mr = ctypes.c_int(), ctypes.c_int()
        if library.skinny_shape(index, ctypes.byref(nw), ctypes.byref(mr)) == 0:
            found.append((nw.value, mr.value))
    return found


def set_shape(library, rows: int, index: int) -> None:
    """Products of `rows` rows (1..SHAPE_ROWS; the last also serves more) use shape `index`
    from now on, in every call of this library in the process (each call reads it once)."""
    if library.skinny_set_shape(rows, index) != 0:
        raise ValueError(f"no shape {index} for {rows} rows (shapes: {shapes(library)})")


def shape_for(library, rows: int) -> int:
    """The index of the shape products of `rows` rows use."""
    return library.skinny_shape_for(rows)


def linear(library, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x W^T` with the kernel: x (rows x in) and weight (out x in), both float32 or both
    bfloat16, on the CPU; the result in their dtype (see `product`). Inputs that are not
    contiguous are copied (x is small; a weight never is in practice)."""
    return product(library, weight.contiguous())(x)


def product(library, weight: torch.Tensor):
    """`x -> x W^T` with the kernel, for x of rows x in on the CPU in the weight's dtype
    (float32 or bfloat16; weight contiguous, out x in): the result in that dtype.

    bfloat16 inputs are widened to float32 for the sums (x is small; the weight is widened as
    it is read, so a step still reads half the bytes), as torch's bf16 products sum in
    float32 too. What is fixed is checked and looked up once, here (the engine binds one per
    layer: a step calls 211 of them, and each check, lookup and conversion costs at every
    call); the weight's address is read at each call, so a weight changed in place (a merge)
    or given new storage of its shape is still read right.
    """
    if weight.dtype not in DTYPES or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"a {weight.dtype} weight {tuple(weight.shape)}: not one the kernel reads")
    low = weight.dtype == torch.bfloat16
    function = library.skinny_linear_bf16 if low else library.skinny_linear
    out_features, width = weight.shape

    def multiply(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.shape != (rows, width) or x.dtype != weight.dtype or not x.is_cpu:
            raise ValueError(f"{x.dtype} rows {tuple(x.shape)} do not fit {tuple(weight.shape)}")
        x = x.to(torch.float32).contiguous() if low else x.contiguous()
        out = torch.empty(rows, out_features, dtype=torch.float32)
        function(
            x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, out_features,
            torch.get_num_threads(),
        )  # fmt: skip
        return out.to(torch.bfloat16) if low else out

    return multiply


def corrector(library, weight: torch.Tensor, a_rows: torch.Tensor, b_cols: torch.Tensor):
    """`x W^T + ((x A^T) * mask) B^T` as a function of `(x, mask)`, in one call of the kernel,
    float32 only: the engine's per-row LoRA correction of a decoding step (bot/engine/
    merging.py). a_rows: rank x in, b_cols: out x rank, the rank a multiple of
    `EXTENSION_STEP`; then x: rows x in, mask: rows x rank.

    The low-rank product is a small product of its own; then each of the weight's dot products
    goes on over the rank's columns, so the factors stream with the weight instead of being
    read cold by three separate small products (those cost ~33 us a layer, measured).

    Everything fixed is checked and bound once, here: what a call checks and converts costs
    per layer per step, and with the checks, copies and argument list rebuilt at every call
    the Python of a corrected step cost ~5 us a layer more than a plain one's (1.1 ms of a
    41 ms step at 8 rows; AVX-512 EPYC, 6 Dec 2026). The factors' addresses are bound (the
    function keeps them); the weight's is read at each call, as `product` does.
    """
    _check_factors(weight, a_rows, b_cols)
    rank, width = a_rows.shape
    out_features = weight.shape[0]
    function = library.skinny_linear_corrected
    a, b = a_rows.data_ptr(), b_cols.data_ptr()

    def correct(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.shape != (rows, width) or mask.shape != (rows, rank) or x.dtype != torch.float32:
            raise ValueError(f"{x.dtype} rows {tuple(x.shape)}, mask {tuple(mask.shape)}: no fit")
        x, mask = x.contiguous(), mask.contiguous()  # no copy when they already are
        out = torch.empty(rows, out_features, dtype=torch.float32)
        function(
            x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, out_features,
            torch.get_num_threads(), a, mask.data_ptr(), b, rank,
        )  # fmt: skip
        return out

    correct.factors = (a_rows, b_cols)  # their storage outlives the function holding its address
    return correct


def _check_factors(
    weight: torch.Tensor,
    a_rows: torch.Tensor,
    b_cols: torch.Tensor,
    *,
    weight_dtypes: tuple = (torch.float32,),
) -> None:
    """Refuse LoRA factors the kernel would misread beside `weight`: a_rows rank x in, b_cols
    out x rank, the rank a multiple of `EXTENSION_STEP`, the factors float32, the weight of
    `weight_dtypes` (the layer step's: bf16 too), all contiguous."""
    rank = a_rows.shape[0]
    if (
        rank % EXTENSION_STEP
        or a_rows.shape != (rank, weight.shape[1])
        or b_cols.shape != (weight.shape[0], rank)
        or weight.dtype not in weight_dtypes
        or any(t.dtype != torch.float32 for t in (a_rows, b_cols))
        or any(not t.is_contiguous() for t in (weight, a_rows, b_cols))
    ):
        raise ValueError(
            f"factors {tuple(a_rows.shape)}, {tuple(b_cols.shape)} do not fit the weight "
            f"{tuple(weight.shape)} (float32, contiguous, the rank a multiple of "
            f"{EXTENSION_STEP})"
        )


PROJECTIONS = 7  # a layer's, in the kernel's order: q, k, v, o, gate, up, down


def layer_step(
    library,
    weights: tuple[torch.Tensor, ...],
    norms: tuple[torch.Tensor, torch.Tensor],
    *,
    eps: float,
    heads: int,
    kv_heads: int,
    scale: float,
):
    """A Llama-family layer over one token a row in one call of the kernel, bound once: a
    function `step(x, cos, sin, keys, values, length, mask, extensions=None, *, where=None)`.

    `weights`: the layer's 7 projection weights (q, k, v, o, gate, up, down; float32 or all
    bfloat16, out x in, contiguous, no biases); `norms`: the input and post-attention RMSNorm
    weights (float32). A step then takes x (rows x hidden, float32, the residual stream:
    updated in place), cos and sin (rows x head_dim, float32, the rotary embedding of each
    row's position), the cache buffers `keys` and `values` (sequences x kv_heads x capacity x
    head_dim, contiguous, the weights' dtype), the padding `mask` (sequences x columns, int64,
    0 = padding; None: every column) and, per projection, None or the per-row LoRA correction
    `(a_rows, b_cols, mask)` as `corrector` takes it (float32, whatever the weights' dtype).

    With bfloat16 weights the cache is bfloat16 too, as the transformers forward keeps it:
    weights and cached keys and values are widened as they are read, a new key or value is
    rounded once as it is written, and everything between (the residual stream, norms, RoPE,
    attention, SiLU) is float32; through torch's ops a bf16 model rounds after every op.

    A decoding step (`where` None): row i is sequence i, its keys and values written into
    column `length`, the mask `length + 1` wide. A prefill: `where = (seqs, cols)` (int64,
    one a row) puts row i's token in sequence seqs[i] at column cols[i]; every row's keys are
    written before any attends, so a sequence's tokens see each other (causally: row i
    attends to columns 0..cols[i]). Attention is softmax(q k^T * scale) v over the allowed
    columns, head i on kv head i // (heads // kv_heads), as transformers computes it (equal
    within float rounding; tested).

    What is fixed is checked once here; a step checks its inputs' shapes (a wrong one would
    read or write out of bounds) and reads the weights' addresses at each call, as `product`.
    """
    if len(weights) != PROJECTIONS or len(norms) != 2:
        raise ValueError(f"a layer has {PROJECTIONS} projections and 2 norms")
    q, k, v, o, gate, up, down = weights
    hidden, inner = q.shape[1], gate.shape[0]
    head_dim = q.shape[0] // heads if heads else 0
    shapes = (
        (heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
        (hidden, heads * head_dim), (inner, hidden), (inner, hidden), (hidden, inner),
    )  # fmt: skip
    tensors = (*weights, *norms)
    if (
        not heads
        or not kv_heads
        or heads % kv_heads
        or head_dim % 2
        or tuple(tuple(w.shape) for w in weights) != shapes
        or any(n.shape != (hidden,) or n.dtype != torch.float32 for n in norms)
        or q.dtype not in DTYPES
        or any(w.dtype != q.dtype for w in weights)
        or any(not t.is_contiguous() or not t.is_cpu for t in tensors)
    ):
        raise ValueError(
            f"weights {[tuple(w.shape) for w in weights]} with {heads} heads over {kv_heads}: "
            "not a Llama layer the kernel steps (float32 or bfloat16 weights, float32 norms, "
            "contiguous, CPU)"
        )
    stored = q.dtype  # the weights' and the cache's
    if stored == torch.bfloat16:
        function = library.skinny_decode_layer_bf16
    else:
        function = library.skinny_decode_layer
    pointers = ctypes.c_void_p * PROJECTIONS
    bound: dict = {}  # the corrections' factors, checked once (`_Factors`)
    recent: list = [None]  # the last call's corrections and arrays (`_extensions`)

    def step(x, cos, sin, keys, values, length: int, mask=None, extensions=None, *, where=None):
        rows = x.shape[0]
        sequences = rows if where is None else keys.shape[0]
        cache = (sequences, kv_heads, keys.shape[2] if keys.dim() == 4 else 0, head_dim)
        width = length + 1 if where is None else _placed(where, rows, sequences, cache[2])
        if (
            x.shape != (rows, hidden)
            or cos.shape != (rows, head_dim)
            or sin.shape != (rows, head_dim)
            or keys.shape != cache
            or values.shape != cache
            or not 0 <= length < cache[2]
            or not 0 < width <= cache[2]
            or (
                mask is not None
                and (
                    mask.dim() != 2
                    or mask.shape[0] != sequences
                    or mask.shape[1] < width
                    or (where is None and mask.shape[1] != width)
                    or mask.dtype != torch.int64
                    or not mask.is_contiguous()
                )
            )
            or any(
                t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu
                for t in (x, cos, sin)
            )
            or any(
                t.dtype != stored or not t.is_contiguous() or not t.is_cpu for t in (keys, values)
            )
        ):
            raise ValueError(
                f"rows {tuple(x.shape)}, cos {tuple(cos.shape)}, cache {tuple(keys.shape)} at "
                f"column {length}: not what this layer's step takes"
            )
        ext = (None,) * 4
        if extensions is not None and any(e is not None for e in extensions):
            ext = _extensions(extensions, weights, rows, bound, recent)
        function(
            x.data_ptr(), rows, hidden, heads, kv_heads, head_dim, inner,
            norms[0].data_ptr(), norms[1].data_ptr(), eps,
            pointers(*(w.data_ptr() for w in weights)), *ext,
            cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), cache[2],
            length, *(None, None) if where is None else (t.data_ptr() for t in where),
            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.shape[1],
            scale, torch.get_num_threads(),
        )  # fmt: skip

    return step


def _placed(where, rows: int, sequences: int, capacity: int) -> int:
    """The columns a prefill's rows reach (the largest column + 1), after checking `where`
    (seqs, cols: int64, one a row, within the cache); 0 where it does not fit."""
    seqs, cols = where
    if any(t.shape != (rows,) or t.dtype != torch.int64 or not t.is_contiguous() for t in where):
        return 0
    if rows == 0 or int(seqs.min()) < 0 or int(seqs.max()) >= sequences or int(cols.min()) < 0:
        return 0
    most = int(cols.max()) + 1
    return most if most <= capacity else 0


class _Factors:
    """A layer's correction factors checked and their pointer arrays built once (a mix keeps
    the same factors over many steps; checking 7 of them at every layer of every step cost
    ~2 ms a step). Only the masks, new at each step, are checked and set per call."""

    kept = 4  # factor sets kept per layer (a swap's mix, and the few before it)

    def __init__(self, factors, weights) -> None:
        pointers = ctypes.c_void_p * PROJECTIONS
        self.factors = factors  # held: their ids key the cache, their storage the kernel reads
        self.ranks = [0] * PROJECTIONS
        a, bt = [None] * PROJECTIONS, [None] * PROJECTIONS
        for index, (pair, weight) in enumerate(zip(factors, weights, strict=True)):
            if pair is None:
                continue
            a_rows, b_cols = pair
            _check_factors(weight, a_rows, b_cols, weight_dtypes=DTYPES)
            a[index], bt[index] = a_rows.data_ptr(), b_cols.data_ptr()
            self.ranks[index] = a_rows.shape[0]
        self.a, self.bt = pointers(*a), pointers(*bt)
        self.e = (ctypes.c_long * PROJECTIONS)(*self.ranks)

    def arrays(self, masks, rows: int) -> tuple:
        pointers = []
        for mask, rank in zip(masks, self.ranks, strict=True):
            if not rank:
                pointers.append(None)
                continue
            if (
                mask.shape != (rows, rank)
                or mask.dtype != torch.float32
                or not mask.is_contiguous()
            ):
                raise ValueError(f"a mask {tuple(mask.shape)} for {rows} rows of rank {rank}")
            pointers.append(mask.data_ptr())
        return self.a, (ctypes.c_void_p * PROJECTIONS)(*pointers), self.bt, self.e


def _extensions(extensions, weights, rows: int, bound: dict, recent: list) -> tuple:
    """The per-projection correction arrays `skinny_decode_layer` takes, checked: (a, mask, bt,
    E) pointer arrays with a null and 0 for a projection that has none. `bound`: the step's
    `_Factors` by the factors' ids; `recent`: the last call's corrections and arrays, given
    again for the same factor and mask tensors (a mix hands the same ones while its rows stay:
    rebuilding and checking them cost ~0.15 ms of a ~11 ms 8-row step)."""
    if len(extensions) != PROJECTIONS:
        raise ValueError(f"{len(extensions)} corrections for {PROJECTIONS} projections")
    last = recent[0]  # the same tensors as the last call: its arrays
    if (
        last is not None
        and last[1] == rows
        and all(_same(e, held) for e, held in zip(extensions, last[0], strict=True))
    ):
        return last[2]
    key = tuple(None if e is None else (id(e[0]), id(e[1])) for e in extensions)
    factors = bound.get(key)
    if factors is None:
        factors = _Factors([None if e is None else e[:2] for e in extensions], weights)
        while len(bound) >= _Factors.kept:
            bound.pop(next(iter(bound)))
        bound[key] = factors
    arrays = factors.arrays([None if e is None else e[2] for e in extensions], rows)
    recent[0] = (tuple(extensions), rows, arrays)  # held: their ids cannot be reused
    return arrays


def _same(correction, held) -> bool:
    """Whether two corrections (None, or (A, B, mask)) are the same tensors."""
    if correction is None or held is None:
        return correction is held
    return all(a is b for a, b in zip(correction, held, strict=True))
