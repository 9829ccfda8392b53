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
keeps those. On one thread (the engine's thread tuner picks one when the cores are busy)
`F.linear` was as fast or faster (0.9-1.3x), so it keeps those steps too; in bf16 it is faster
too (so this is for float32 only), and on a GPU nothing changes. Another BLAS build or
instruction set may rank the two otherwise, so the engine measures them (`faster`, ~2 s over
the model's weights at the worker's start) before it installs this path.

Results differ from `F.linear` in float rounding only (the sums run in another order: < 2e-4
absolute on the model's layers). The layers keep their weights and their state dict: only the
class of each `nn.Linear` changes (to `RowLinear`, a subclass), which `install` does and
`uninstall` undoes; a per-instance forward (the engine's per-row LoRA correction) still wins
over the class's, and calls the class's forward for its base product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOST_ROWS = 96  # above this F.linear is as fast (measured: 96 rows 0.9x, 160 rows 1.07x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, with the weight as the left operand for a few CPU fp32 rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        not 0 < rows <= MOST_ROWS
        or x.device.type != "cpu"
        or weight.dtype != torch.float32
        or x.dtype != torch.float32
        or torch.get_num_threads() < 2  # on one thread F.linear was as fast or faster
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
    """An `nn.Linear` whose forward is `linear` above (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def applies(model) -> bool:
    """Whether the path can apply at all: a CPU model in float32."""
    parameter = next(iter(model.parameters()), None)
    return (
        parameter is not None
        and parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
    )


def faster(model, *, rows: tuple[int, ...] = (1, 8), repeats: int = 3, margin: float = 0.95):
    """Whether `linear` beats `F.linear` on this machine, over the model's own linear weights.

    Measured, not assumed: the figures above come from one CPU (AVX2); another BLAS build or
    instruction set may rank the two the other way. Both are timed in turn over every weight
    for each row count in `rows` (median of `repeats`); the path is wanted when it is faster by
    `margin` at the largest count and not slower (by more than 1/`margin`) at any.
    Returns (wanted, {rows: time with `linear` ÷ time with F.linear}).
    """
    import statistics
    import time

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not weights or not applies(model) or torch.get_num_threads() < 2:
        return False, {}  # `linear` would be F.linear itself: nothing to measure
    ratios = {}
    with torch.inference_mode():
        for count in rows:
            inputs = {w.shape[1]: torch.randn(count, w.shape[1]) for w in weights}
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeats + 1):  # the first round warms up
                for ours in (True, False):
                    product = linear if ours else F.linear
                    started = time.perf_counter()
                    for weight in weights:
                        product(inputs[weight.shape[1]], weight)
                    times[ours].append(time.perf_counter() - started)
            ratios[count] = statistics.median(times[True][1:]) / statistics.median(times[False][1:])
    wanted = ratios[max(rows)] < margin and all(r < 1 / margin for r in ratios.values())
    return wanted, ratios


def install(model) -> int:
    """Make every plain `nn.Linear` of `model` a `RowLinear`; return how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowLinear
            changed += 1
    return changed


def uninstall(model) -> None:
    """Give every `RowLinear` of `model` its plain `nn.Linear` class back."""
    for module in model.modules():
        if type(module) is RowLinear:
            module.__class__ = torch.nn.Linear
