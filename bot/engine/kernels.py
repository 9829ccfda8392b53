"""Faster CPU matmuls for the few rows of a decoding step, chosen by measuring them here.

A linear layer computes `x W^T` (x: rows x in, W: out x in). With a handful of rows (a decoding
step feeds one token a row) that is memory-bound: reading the weights is the cost, whatever the
row count. `F.linear` does not behave so: it hands the BLAS a product whose small operand comes
first, and MKL repacks the weight or runs below memory speed. Two other products:

- the skinny product (`bot/engine/skinny.py`, a small C++ kernel built on this machine) reads
  each weight row once for every 8 rows and prefetches ahead: at 8 rows it costs ~1.4x one
  row (AVX-512 Xeon) or ~1.1x (AVX2 EPYC).
- the weight on the left, `(W x^T)^T`, which streams the weight as the BLAS's left operand
  without repacking it; the fallback where the kernel cannot be built.

Which wins depends on the CPU, the BLAS build, the thread count and the row count. Measured
over SmolLM2-135M's 211 weights (fp32, ms for all of them, F.linear / weight on the left /
skinny; 29 Nov 2026, 2 cores):

    rows                       1            2            4            8
    AVX2 EPYC, two threads     72/63/-      129/61/-     143/66/-     139/96/-
    another AVX2 EPYC, two     58/-/27      89/-/28      101/-/28     97/-/29
    AVX-512 EPYC, two threads  46/26/-      77/29/-      71/40/-      76/69/-
    AVX-512 Xeon, two threads  19/56/19     21/50/19     34/62/21     45/51/26
    AVX-512 Xeon, one thread   38/93/35     42/92/38     71/93/39     99/96/51

So nothing is assumed: at the worker's start the engine measures (`measure`) at each row count
of `COUNTS` whether the product (skinny where built, else the weight on the left) beats
`F.linear`, for one thread and for all (the thread tuner's two choices), and each `RowLinear`
uses it at exactly the counts where it won (a row count between two counts goes with the
larger). At a decoding step's counts a tie goes to the kernel: with it the whole layer is one
call (bot/engine/skinny.py's layer step). A long prefill (more than `MOST_ROWS` rows) always
keeps `F.linear`, as does a GPU. Prefills of up to `MOST_ROWS` rows are measured too: on the
AVX-512 EPYC the kernel ran a 96-row prefill's products at 1.3x the speed of MKL's (see
`COUNTS`). Before that, the skinny kernel's own shape (how many weight rows and rows of x a
pass sums in registers) is measured at each count past the batch size (a prefill's;
`measure_shapes`; ~2 s at a start): on an AVX-512 EPYC 4 x 6 or 5 x 5 ran a prefill in
~0.75-0.85 of the default 3 x 8's time.
bf16 weights go through the skinny kernel only (widened to float32 as it reads them; a
decoding step's layers too, over a bf16 cache); without it, `F.linear`.

Results differ from `F.linear` in float rounding only (the sums run in another order: < 2e-4
absolute on the model's layers). The layers keep their weights and their state dict: only the
class of each `nn.Linear` changes (to `RowLinear`, a subclass), which `install` does and
`uninstall` undoes; a per-instance forward (the engine's per-row LoRA correction) still wins
over the class's, and uses the layer's `corrector` for the product and its correction in one
pass of the kernel, or the class's forward for its base product where the kernel does not take
the rows.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bot.engine import skinny

MOST_ROWS = 256  # never above: a longer prefill keeps F.linear (at 512 rows they were even)
# the row counts `measure` times. Up to 32 they are a decoding step's; 64-256 a prefill's, where
# the kernel won on one machine and tied on another (AVX-512 EPYC, 6 Dec 2026, ms over the
# layers' weights, kernel / F.linear: 64 rows 77/108, 96 111/148, 128 148/233, 256 314/392,
# 512 625/594; an AVX-512 Xeon had 64 rows at 0.92-1.03x). Measuring them adds ~2 s to a start.
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WIDEN_ABOVE = 32  # bf16 products of more rows than this may be widened (a prefill's)
MEASURED_BYTES = 160 * 2**20  # measure over about this much of the weights (well past any cache)
SHAPE_SECONDS = 0.2  # `measure_shapes` times a row count's shapes for at least about this
_MEASURED: dict[tuple, tuple] = {}  # measure's results in this process, by weights and counts


def _dtypes(library) -> tuple[torch.dtype, ...]:
    """The weights' dtypes the few-row products take: the kernel's, or the weight on the
    left's (float32 only)."""
    return skinny.DTYPES if library is not None else (torch.float32,)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    most_rows: int = MOST_ROWS,
    library=None,
    multiply=None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for at most `most_rows` CPU rows computed with the skinny
    kernel (`library`, from `skinny.load()`: float32 or bfloat16) or, without one, the weight
    on the left (float32 only). `multiply`: the kernel's product of `weight` already bound
    (`bound_product`, as `install` gives each layer), else it is bound for this call."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        not 0 < rows <= min(most_rows, MOST_ROWS)
        or x.device.type != "cpu"
        or weight.dtype not in _dtypes(library)
        or x.dtype != weight.dtype
    ):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if multiply is not None:
        out = multiply(flat)
    elif library is not None:
        out = skinny.linear(library, flat, weight)
    else:
        if rows == 1:
            flat = torch.cat([flat, flat])  # a two-row product: faster than the one-row path
        out = torch.mm(weight, flat.t()).t()[:rows].contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def plan(wins: dict[int, list[int]], counts: tuple[int, ...] = COUNTS) -> dict[int, tuple]:
    """{threads: counts where the product won} -> {threads: uses}, `uses[rows]` saying whether
    `rows` rows go through it: a row count goes with the smallest measured count at or above
    it; past the largest, F.linear."""
    ordered = sorted(counts)
    uses = {}
    for threads, won in wins.items():
        row_uses = [False]
        for rows in range(1, min(ordered[-1], MOST_ROWS) + 1):
            row_uses.append(next(c for c in ordered if c >= rows) in won)
        uses[threads] = tuple(row_uses)
    return uses


def widened(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` of bfloat16 inputs computed in float32 and rounded back once.

    On a CPU without AVX512-BF16 or AMX, torch's bf16 products are emulated: a prefill of 100-
    300 rows over SmolLM2-135M took 2.3-4x longer in bf16 than widening each weight to float32
    and multiplying there (Xeon AVX-512, 29 Nov 2026). `measure_widening` decides per machine.
    """
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


class RowLinear(torch.nn.Linear):
    """An `nn.Linear` whose forward is `linear` above (same parameters, same state dict).

    `row_plan` (set by `install`): torch's thread count -> `uses` (see `plan`); a thread count
    it lacks uses F.linear. None: the product for up to `MOST_ROWS` rows at any count.
    `library`: the skinny kernel, or None for the weight on the left. `widen`: bf16 products
    that the row product does not take (a prefill's many rows) go through `widened`.
    """

    row_plan: dict[int, tuple] | None = None
    library = None
    widen = False
    multiply = None  # `bound_product` of this layer's weight, where the kernel reads it

    def _takes(self, rows: int) -> bool:
        if self.row_plan is None:
            return rows <= MOST_ROWS
        uses = self.row_plan.get(torch.get_num_threads(), ())
        return rows < len(uses) and uses[rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self._takes(rows):
            return linear(x, self.weight, self.bias, library=self.library, multiply=self.multiply)
        # widening converts the whole weight, worth it for a prefill's many rows only: a row
        # count the plan measured and gave to F.linear keeps it (at one row widening cost 5x
        # bf16 F.linear, AVX2 EPYC, 29 Nov 2026)
        if self.widen and rows > WIDEN_ABOVE and x.dtype == self.weight.dtype == torch.bfloat16:
            return widened(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def corrector(self, a_rows: torch.Tensor, b_cols: torch.Tensor):
        """`(x, mask) -> x W^T + b + ((x A^T) * mask) B^T` (the engine's per-row LoRA
        correction of a decoding step: x rows x in, a_rows rank x in, mask rows x rank, b_cols
        out x rank) in one pass of the skinny kernel, the factors streamed beside the weight
        (`skinny.corrector`, which binds them once). None where the kernel cannot take them;
        the function returns None for rows it does not take (then the caller corrects with
        torch's products)."""
        if (
            self.library is None
            or self.weight.dtype != torch.float32
            or a_rows.dtype != torch.float32
            or b_cols.shape[1] % skinny.EXTENSION_STEP
            or self.weight.device.type != "cpu"
        ):
            return None
        correct = skinny.corrector(self.library, self.weight, a_rows, b_cols)
        takes, bias = self._takes, self.bias

        def corrected(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
            if x.dtype != torch.float32 or not takes(x.shape[0]):
                return None
            out = correct(x, mask)
            if bias is not None:
                out += bias
            return out

        return corrected


def applies(model, library=None) -> bool:
    """Whether the path can apply at all: a CPU model in float32, or in bfloat16 with the
    skinny kernel `library`."""
    parameter = next(iter(model.parameters()), None)
    return (
        parameter is not None
        and parameter.device.type == "cpu"
        and parameter.dtype in _dtypes(library)
    )


def measured_weights(model) -> list[torch.Tensor]:
    """The weights `measure` times: every k-th linear weight, the k that leaves about
    `MEASURED_BYTES` (never so few that they would sit in a CPU cache; for SmolLM2-135M k is
    3, which takes every shape of its 7 weights a layer)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() * w.element_size() for w in weights)
    step = max(1, total // MEASURED_BYTES)
    return weights[::step]


def _best_times(
    passes, *, repeats: int, seconds: float = 0.0, alternate: bool = False
) -> list[float]:
    """The best time of each of `passes` (functions of no argument), taking turns: a warm-up
    round, then `repeats` rounds, and more (up to 4x `repeats` in all) while fewer than
    `seconds` have passed since the first. `alternate`: the order reversed every other
    round (the warm-up's reversed), so that none always goes first."""
    best = [float("inf")] * len(passes)
    round_, begun = 0, time.perf_counter()
    while round_ <= repeats or (round_ <= 4 * repeats and time.perf_counter() - begun < seconds):
        order = range(len(passes))
        if alternate and not round_ % 2:
            order = reversed(order)
        for index in order:
            started = time.perf_counter()
            passes[index]()
            if round_:
                best[index] = min(best[index], time.perf_counter() - started)
        round_ += 1
    return best


def _time_ratio(first, second, weights, inputs, *, repeats: int) -> float:
    """Time of `first` ÷ time of `second`, each a product `(x, weight)` passed over all
    `weights` (x: `inputs[weight.shape[1]]`), alternating, best of `repeats` after a warm-up."""

    def over_weights(product):
        def run() -> None:
            for weight in weights:
                product(inputs[weight.shape[1]], weight)

        return run

    best = _best_times([over_weights(first), over_weights(second)], repeats=repeats)
    return best[0] / best[1]


def measure(
    model,
    *,
    library=None,
    threads: tuple[int, ...] | None = None,
    counts: tuple[int, ...] = COUNTS,
    repeats: int = 2,
    margin: float = 0.95,
    ties_up_to: int = 0,
) -> tuple[dict[int, list[int]], dict[int, dict[int, float]]]:
    """For each torch thread count, at which row counts `linear` (with `library`) beats
    `F.linear` here.

    Measured over the model's own linear weights (`measured_weights`), not assumed: which
    product is faster depends on the CPU, the BLAS build, the thread count and the row count
    (see the module docstring). At each count of `counts`, in turn, both pass over the weights
    (a warm-up round, then the best of `repeats`); the product wins a count where it took at
    most `margin` of F.linear's time (a count it loses gets a second measurement: one noisy
    round must not decide). Every count is measured: at 1-2 rows both products are bound by
    memory and either may win by a hair, yet at 4-16 rows one may be twice as fast. Kept for
    the process: another engine over the same shapes measures nothing. `threads`: default 1
    and torch's current count, the two the engine's thread tuner chooses between.

    `ties_up_to`: at counts up to it (a decoding step's: the engine passes its batch size where
    the kernel is built) a tie goes to the product too: a count is won unless the product took
    over 1/`margin` of F.linear's time. There the kernel does more than the products: a step
    whose row count it takes runs each layer as one call (`skinny.layer_step`) instead of ~40
    torch ops, and on an AVX-512 Xeon whose products tied MKL's at 1-2 rows (ratios 0.95-1.0)
    batch-1 decoding ran at 42 tokens/s with the kernel against 28 without (6 Dec 2026).
    Returns ({threads: counts won}, {threads: {rows: time with `linear` ÷ with F.linear}}).
    """
    weights = measured_weights(model)
    if not weights or not applies(model, library):
        return {}, {}
    before = torch.get_num_threads()
    thread_counts = tuple(sorted(set(threads or (1, before))))
    key = (
        tuple(tuple(w.shape) for w in weights),
        thread_counts,
        tuple(counts),
        margin,
        ties_up_to,
        library is not None,
        weights[0].dtype,
    )
    if key in _MEASURED:  # another engine on the same shapes in this process
        return _MEASURED[key]

    products = {id(w): bound_product(library, w) for w in weights}  # as `install` binds them

    def ours(x, weight):
        return linear(x, weight, library=library, multiply=products[id(weight)])

    def ratio_at(rows: int) -> float:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
        return _time_ratio(ours, F.linear, weights, inputs, repeats=repeats)

    wins: dict[int, list[int]] = {}
    ratios: dict[int, dict[int, float]] = {}
    try:
        with torch.inference_mode():
            for count_of_threads in thread_counts:
                torch.set_num_threads(count_of_threads)
                wins[count_of_threads], ratios[count_of_threads] = [], {}
                for rows in sorted(counts):
                    ratio = ratio_at(rows)
                    if ratio >= margin:
                        ratio = min(ratio, ratio_at(rows))
                    ratios[count_of_threads][rows] = ratio
                    if ratio < margin or (rows <= ties_up_to and ratio * margin <= 1):
                        wins[count_of_threads].append(rows)
    finally:
        torch.set_num_threads(before)
    _MEASURED[key] = (wins, ratios)
    return wins, ratios


def measure_shapes(
    model,
    *,
    library,
    above: int = 0,
    counts: tuple[int, ...] = COUNTS,
    repeats: int = 2,
    margin: float = 0.97,
) -> dict[int, tuple[int, int]]:
    """For each row count of `counts` past `above`, the fastest of the kernel's shapes
    (`skinny.shapes`) here, set in the kernel's table for the rows it serves (those above the
    count before it, or `above`, as `plan` serves a count; the last count's also serves more);
    rows up to `above` get the default shape (the first). {count: (nw, mr)} chosen.

    Measured over the model's own weights (`measured_weights`) at torch's current thread
    count, each shape's pass taking turns (a warm-up round, then the best of `repeats`). A
    shape other than the default must take at most `margin` of the default's time: a tie
    keeps the default. These are products alone, as a prefill's are long enough to be: within
    the engine's whole-layer step (AVX-512 EPYC, 6 Dec 2026, ms a step or prefill, 3 x 8 /
    4 x 6 / 5 x 5), a prefill of 18 tokens took 25.5-25.9 / 18.6-18.9 / 27.5-28.6 and one of
    147 142-144 / 121-124 / 117-128, as the products alone ranked them, but an 8-row decoding
    step took 12.2-13.1 / 14.4-14.6 / 16.6-17.1 where the products alone had 4 x 6 at ~0.9 of
    3 x 8. So the engine passes its batch size as `above`: its decoding steps keep the
    default, its prefills get the shape measured here. Measure shapes before `measure`, whose
    figures then are those of the shapes chosen. Kept for the process (the table is the
    library's): another engine applies the same choice. {} (the table untouched) where the
    kernel has one shape or does not apply.
    """
    found = skinny.shapes(library) if library is not None else []
    weights = measured_weights(model)
    counts = tuple(sorted(rows for rows in counts if rows > above))
    if len(found) < 2 or not weights or not counts or not applies(model, library):
        return {}
    key = (
        "shapes",
        tuple(tuple(w.shape) for w in weights),
        above,
        counts,
        torch.get_num_threads(),
        weights[0].dtype,
        id(library),
    )
    if key not in _MEASURED:
        products = {id(w): bound_product(library, w) for w in weights}
        chosen: dict[int, int] = {}
        with torch.inference_mode():
            for rows in counts:
                inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}

                def in_shape(index: int, rows: int = rows, inputs: dict = inputs):
                    def run() -> None:
                        skinny.set_shape(library, min(rows, skinny.SHAPE_ROWS), index)
                        for weight in weights:
                            products[id(weight)](inputs[weight.shape[1]])

                    return run

                # short passes (few rows) get more rounds
                best = _best_times(
                    [in_shape(index) for index in range(len(found))],
                    repeats=repeats,
                    seconds=SHAPE_SECONDS,
                    alternate=True,
                )
                fastest = min(range(len(found)), key=best.__getitem__)
                chosen[rows] = fastest if best[fastest] <= margin * best[0] else 0
        _MEASURED[key] = chosen
    chosen = _MEASURED[key]
    for served in range(1, min(above, skinny.SHAPE_ROWS) + 1):
        skinny.set_shape(library, served, 0)
    below = above
    for rows in sorted(chosen):
        for served in range(below + 1, min(rows, skinny.SHAPE_ROWS) + 1):
            skinny.set_shape(library, served, chosen[rows])
        below = rows
    for served in range(below + 1, skinny.SHAPE_ROWS + 1):  # more rows than the last count
        skinny.set_shape(library, served, chosen[max(chosen)])
    return {rows: found[index] for rows, index in chosen.items()}


def measure_widening(model, *, rows: int = 128, repeats: int = 2) -> float | None:
    """For a bfloat16 CPU model: time of `widened` ÷ `F.linear` over `measured_weights` at
    `rows` rows (a prefill's size), best of `repeats` after a warm-up; None for any other model
    (nothing to widen)."""
    weights = measured_weights(model)
    if not weights or weights[0].dtype != torch.bfloat16 or weights[0].device.type != "cpu":
        return None
    key = ("widening", tuple(tuple(w.shape) for w in weights), rows, torch.get_num_threads())
    if key in _MEASURED:
        return _MEASURED[key]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    with torch.inference_mode():
        _MEASURED[key] = _time_ratio(widened, F.linear, weights, inputs, repeats=repeats)
    return _MEASURED[key]


def install(
    model, wins: dict[int, list[int]] | None = None, *, library=None, widen: bool = False
) -> int:
    """Make every plain `nn.Linear` of `model` a `RowLinear` using the product at the counts
    `wins` names (see `measure`; None: up to `MOST_ROWS` rows at any thread count), with the
    skinny kernel `library` or, without one, the weight on the left, and bf16 products it
    does not take `widened` if `widen`; return how many changed."""
    row_plan = None if wins is None else plan(wins)
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowLinear
            module.row_plan = row_plan
            module.library = library
            module.widen = widen
            module.multiply = bound_product(library, module.weight)
            changed += 1
    return changed


def bound_product(library, weight: torch.Tensor):
    """The kernel's product of `weight`, bound once (`skinny.product`), where `library` reads
    it: a CPU weight of its dtypes, contiguous; else None."""
    if (
        library is None
        or weight.dtype not in skinny.DTYPES
        or not weight.is_contiguous()
        or weight.device.type != "cpu"
    ):
        return None
    return skinny.product(library, weight)


def uninstall(model) -> None:
    """Give every `RowLinear` of `model` its plain `nn.Linear` class back."""
    for module in model.modules():
        if type(module) is RowLinear:
            module.__class__ = torch.nn.Linear
            for name in ("row_plan", "library", "widen", "multiply"):
                vars(module).pop(name, None)
