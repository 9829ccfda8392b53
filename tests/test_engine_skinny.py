"""The skinny kernel: built once a machine, the same sums as F.linear on every shape a model
has (odd widths, few rows, more rows than a pass holds), in float32 and bfloat16, on both vector
paths, and a clean refusal where it cannot be built."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from bot.engine import skinny
from tests.conftest import kernel_buildable

needs_kernel = pytest.mark.skipif(
    not kernel_buildable(), reason="the skinny kernel needs g++ and a CPU with AVX2 and FMA"
)


def _check(library, shapes):
    generator = torch.Generator().manual_seed(0)
    for rows, width, outputs in shapes:
        x = torch.randn(rows, width, generator=generator)
        weight = torch.randn(outputs, width, generator=generator)
        got = skinny.linear(library, x, weight)
        assert got.shape == (rows, outputs) and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-4)
        # bf16: the same sums over the widened values, rounded to bf16 once (the float32 sums
        # run in another order, so a value on a rounding boundary may land one bf16 step away)
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        got = skinny.linear(library, x, weight)
        assert got.dtype == torch.bfloat16
        exact = F.linear(x.float(), weight.float()).to(torch.bfloat16)
        torch.testing.assert_close(got, exact, atol=1e-4, rtol=2**-7)
        assert (got == exact).float().mean() > 0.95


SHAPES = [
    (1, 576, 576),
    (3, 576, 192),
    (8, 1536, 576),
    (5, 70, 300),  # a width no vector divides: the tail is summed on its own
    (7, 5, 3),  # narrower than one vector, fewer outputs than a group
    (16, 64, 9),
    (9, 33, 1),
    (2, 96, 40),  # every remainder after the full passes (AVX2 passes hold 8 rows, AVX-512 4)
    (4, 96, 40),
    (6, 96, 40),
    (12, 96, 40),
    (23, 96, 40),
]


@needs_kernel
def test_it_builds_once_and_matches_f_linear(tmp_path):
    library = skinny.load(folder=tmp_path)
    assert library is not None
    built = list(tmp_path.glob("skinny-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    skinny._LOADED.clear()  # as a new process would: it finds the file and builds nothing
    assert skinny.load(folder=tmp_path) is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert len(skinny._runtimes()) == 1  # torch's OpenMP runtime, not a second one
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _check(library, SHAPES)
        finally:
            torch.set_num_threads(previous)


def test_strided_inputs_are_copied_not_misread(library):
    x = torch.randn(40, 6)[::5, :]  # rows 5 apart: not contiguous
    weight = torch.randn(6, 12).t()  # transposed
    torch.testing.assert_close(skinny.linear(library, x, weight), F.linear(x, weight))


@needs_kernel
def test_the_avx2_path_matches_too(tmp_path):
    avx2 = tuple(f for f in skinny.FLAGS if f != "-march=native") + ("-march=haswell",)
    library = skinny.load(folder=tmp_path, flags=avx2)
    assert library is not None and library.skinny_vector_width() == 8
    _check(library, SHAPES)


def test_without_a_compiler_or_the_instructions_it_refuses_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert skinny.load(folder=tmp_path / "a") is None
    monkeypatch.delenv("CXX")
    if shutil.which("g++") is None:
        pytest.skip("no g++ here")
    plain = tuple(f for f in skinny.FLAGS if f != "-march=native") + ("-march=x86-64",)
    assert skinny.load(folder=tmp_path / "b", flags=plain) is None  # #error: no AVX2
    assert not os.path.exists(tmp_path / "b") or not list((tmp_path / "b").iterdir())
