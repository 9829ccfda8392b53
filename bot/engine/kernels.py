"""A faster CPU matmul for the few rows of a decoding step: the weight on the left.

A linear layer computes `x W^T` (x: rows x in, W: out x in). `F.linear` hands that to the BLAS
as a product whose *small* operand comes first; with a handful of rows (a decoding step feeds one
token a row) MKL then repacks the whole weight on every call and a step of 8 rows costs about
twice a step of one, far from the memory-bound cost of reading the weights once. Computing the
same product the other way round, `(W x^T)^T`, streams the weight as the left operand without
repacking it: measured on this project's 2-core CPU (AVX2) over SmolLM2-135M's 211 weights
(fp32, two threads, median of 3, each figure ms for all of them, F.linear / weight on the left):

    rows   1      2       4       8       16      32      64      96      160
           72/63  129/61  143/66  139/96  168/117 207/157 341/257 342/307 502/535

One row goes through a two-row product (the row twice): the BLAS's one-row path (gemv) is the
slower one here. From about 128 rows on (a long prefill) `F.linear` is as fast or faster, so it
keeps those. Another CPU ranks them otherwise: on an AVX-512 EPYC (same 2 cores, 29 Nov 2026;
ms, F.linear / weight on the left, best of 3)

    rows          1      2      4      8      16
    two threads   46/26  77/29  71/40  76/69  87/69
    one thread    45/33  75/33  64/47  75/83  103/112

and there the 8-row ratio swings between 0.8 and 1.15 from one measurement to the next. So
nothing is assumed: at the worker's start the engine measures (`measure`, 1-4 s over the
model's weights) up to how many rows the weight on the left is faster, for one thread and for
all (the thread tuner's two choices), and each `RowLinear` uses it only up to that count for
the thread count of the moment. In bf16 `F.linear` is faster (so this is for float32 only),
and on a GPU nothing changes.

Results differ from `F.linear` in float rounding only (the sums run in another order: < 2e-4
absolute on the model's layers). The layers keep their weights and their state dict: only the
class of each `nn.Linear` changes (to `RowLinear`, a subclass), which `install` does and
`uninstall` undoes; a per-instance forward (the engine's per-row LoRA correction) still wins
over the class's, and calls the class's forward for its base product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOST_ROWS = 96  # never above: a prefill's many rows keep F.linear
COUNTS = (1, 2, 4, 8, 16, 32)  # the row counts `measure` times (64: 0.92-1.03x, not worth it)
_MEASURED: dict[tuple, tuple] = {}  # measure's results in this process, by weights and counts


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    most_rows: int = MOST_ROWS,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, with the weight as the left operand for at most
    `most_rows` CPU fp32 rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        not 0 < rows <= min(most_rows, MOST_ROWS)
        or x.device.type != "cpu"
        or weight.dtype != torch.float32
        or x.dtype != torch.float32
    ):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = torch.cat([flat, flat])  # a two-row product: faster than the one-row path
    out = torch.mm(weight, flat.t()).t()[:rows].contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


class RowLinear(torch.nn.Linear):
    """An `nn.Linear` whose forward is `linear` above (same parameters, same state dict).

    `row_limits` (set by `install`): torch's thread count -> the most rows computed with the
    weight on the left at that count (0: never); None: up to `MOST_ROWS` at any count.
    """

    row_limits: dict[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        limits = self.row_limits
        most = MOST_ROWS if limits is None else limits.get(torch.get_num_threads(), 0)
        return linear(x, self.weight, self.bias, most_rows=most)


def applies(model) -> bool:
    """Whether the path can apply at all: a CPU model in float32."""
    parameter = next(iter(model.parameters()), None)
    return (
        parameter is not None
        and parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
    )


def measure(
    model,
    *,
    threads: tuple[int, ...] | None = None,
    counts: tuple[int, ...] = COUNTS,
    repeats: int = 2,
    margin: float = 0.95,
) -> tuple[dict[int, int], dict[int, dict[int, float]]]:
    """For each torch thread count, up to how many rows `linear` beats `F.linear` here.

    Measured over the model's own linear weights, not assumed: which product is faster
    depends on the CPU, the BLAS build, the thread count and the row count (see the module
    docstring). At each count of `counts`, in turn, both pass over every weight (a warm-up
    round, then the best of `repeats`; a count that fails is measured once more); the limit
    is the largest count up to which `linear` took at most `margin` of F.linear's time at
    every count measured (counts past the first that fails are not measured). Kept for the
    process: another engine over the same shapes measures nothing. `threads`: default 1 and
    torch's current count, the two the engine's thread tuner chooses between. Returns
    ({threads: most rows, 0 = never}, {threads: {rows: time with `linear` ÷ with F.linear}}).
    """
    import time

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not weights or not applies(model):
        return {}, {}
    before = torch.get_num_threads()
    thread_counts = tuple(sorted(set(threads or (1, before))))
    key = (tuple(tuple(w.shape) for w in weights), thread_counts, tuple(counts), margin)
    if key in _MEASURED:  # another engine on the same shapes in this process
        return _MEASURED[key]

    def ratio_at(rows: int) -> float:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        best = {True: float("inf"), False: float("inf")}
        for round_ in range(repeats + 1):  # the first round warms up
            for ours in (True, False):
                product = linear if ours else F.linear
                started = time.perf_counter()
                for weight in weights:
                    product(inputs[weight.shape[1]], weight)
                if round_:
                    best[ours] = min(best[ours], time.perf_counter() - started)
        return best[True] / best[False]

    limits: dict[int, int] = {}
    ratios: dict[int, dict[int, float]] = {}
    try:
        with torch.inference_mode():
            for count_of_threads in thread_counts:
                torch.set_num_threads(count_of_threads)
                limits[count_of_threads], ratios[count_of_threads] = 0, {}
                for rows in counts:
                    ratio = ratio_at(rows)
                    if ratio >= margin:  # a second chance: one noisy round must not decide
                        ratio = min(ratio, ratio_at(rows))
                    ratios[count_of_threads][rows] = ratio
                    if ratio >= margin:
                        break
                    limits[count_of_threads] = rows
    finally:
        torch.set_num_threads(before)
    _MEASURED[key] = (limits, ratios)
    return limits, ratios


def install(model, limits: dict[int, int] | None = None) -> int:
    """Make every plain `nn.Linear` of `model` a `RowLinear` (with `limits`, see RowLinear);
    return how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowLinear
            module.row_limits = limits
            changed += 1
    return changed


def uninstall(model) -> None:
    """Give every `RowLinear` of `model` its plain `nn.Linear` class back."""
    for module in model.modules():
        if type(module) is RowLinear:
            module.__class__ = torch.nn.Linear
            vars(module).pop("row_limits", None)
