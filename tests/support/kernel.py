"""The skinny kernel in tests: its AVX2 build, and a record of the layer steps it runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def build_avx2(folder: Path):
    """The kernel built for AVX2 with FMA (`-march=haswell`) in `folder`: the vector path of
    CPUs without AVX-512, run here whatever this CPU has (None where it cannot be built)."""
    from bot.engine import skinny

    flags = tuple(f for f in skinny.FLAGS if f != "-march=native") + ("-march=haswell",)
    return skinny.load(folder=folder, flags=flags)


def record_layer_steps(monkeypatch, record: Callable) -> list:
    """From now on (until `monkeypatch` undoes it), every call of a layer step bound by
    `skinny.layer_step` appends `record(x, rest, where)` to the list returned: `rest`, the
    step's other positional arguments (cos, sin, keys, values, length, mask, corrections)."""
    from bot.engine import skinny

    calls: list = []
    bind = skinny.layer_step

    def counted(*args, **kwargs):
        step = bind(*args, **kwargs)

        def stepping(x, *rest, where=None):
            calls.append(record(x, rest, where))
            return step(x, *rest, where=where)

        return stepping

    monkeypatch.setattr(skinny, "layer_step", counted)
    return calls
