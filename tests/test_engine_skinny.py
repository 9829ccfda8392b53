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
from tests.support.kernel import build_avx2

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
    library = build_avx2(tmp_path)
    assert library is not None and library.skinny_vector_width() == 8
    assert skinny.shapes(library) == [(2, 8)]  # one shape: 16 registers hold no other
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


def test_a_bound_product_reads_the_weight_as_it_is_at_each_call(library):
    """`product` binds what is fixed once (the engine binds one per layer) but reads the
    weight's storage at every call: a merge changes it in place, and a weight given new storage
    must not be read at its old address."""
    weight = torch.randn(40, 96)
    multiply = skinny.product(library, weight)
    x = torch.randn(5, 96)
    torch.testing.assert_close(multiply(x), F.linear(x, weight))
    weight.add_(torch.randn(40, 96))  # in place, as a merge does
    torch.testing.assert_close(multiply(x), F.linear(x, weight))
    weight.data = torch.randn(40, 96)  # new storage
    torch.testing.assert_close(multiply(x), F.linear(x, weight))
    torch.testing.assert_close(multiply(x[::2]), F.linear(x[::2], weight))  # strided rows
    for wrong in (torch.randn(5, 95), torch.randn(5, 96, dtype=torch.float64), torch.randn(96)):
        with pytest.raises(ValueError):
            multiply(wrong)
    with pytest.raises(ValueError):  # a transposed weight is refused, not misread
        skinny.product(library, torch.randn(96, 40).t())


def test_every_shape_gives_f_linears_sums(library, kernel_shape):
    """Each shape of the build (weight rows x rows of x a pass, chosen by row count at run
    time): F.linear's sums on the model's widths and on every remainder of its groups and
    passes, in float32 and bfloat16, the corrected product too."""
    nw, mr = skinny.shapes(library)[kernel_shape]
    assert skinny.shape_for(library, 8) == kernel_shape
    assert skinny.shape_for(library, 10_000) == kernel_shape  # more rows: the last entry
    remainders = [(rows, width, outputs) for rows in (mr - 1, mr, mr + 1, 2 * mr + 3)
                  for width, outputs in ((96, 4 * nw + 1), (33, nw - 1 or 1))]  # fmt: skip
    _check(library, SHAPES + remainders)
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(4 * nw + 2, 70, generator=generator)
    a_rows = torch.randn(16, 70, generator=generator)
    b_cols = torch.randn(weight.shape[0], 16, generator=generator) * 0.1
    correct = skinny.corrector(library, weight, a_rows, b_cols)
    for rows in (1, mr, 2 * mr + 1):
        x = torch.randn(rows, 70, generator=generator)
        mask = (torch.rand(rows, 16, generator=generator) > 0.5).float()
        expected = F.linear(x, weight) + ((x @ a_rows.T) * mask) @ b_cols.T
        torch.testing.assert_close(correct(x, mask), expected, atol=1e-4, rtol=1e-4)


def test_the_shape_table_takes_only_what_it_has(library):
    """Shapes by index, the default first; the table refuses rows and indices it lacks and
    changes nothing then."""
    found = skinny.shapes(library)
    assert found and len(set(found)) == len(found)
    if library.skinny_vector_width() == 16:
        assert found[0] == (3, 8) and len(found) == 3
    before = skinny.shape_for(library, 5)
    for rows, index in ((0, 0), (skinny.SHAPE_ROWS + 1, 0), (5, len(found)), (5, -1)):
        with pytest.raises(ValueError):
            skinny.set_shape(library, rows, index)
    assert skinny.shape_for(library, 5) == before


@pytest.mark.parametrize("rank", [16, 32])
def test_the_corrected_product_adds_each_rows_own_low_rank_term(library, rank):
    """`corrector`: x W^T + ((x A^T) * mask) B^T in one call, for every row count a step has
    and masks that switch columns off per row; shapes that do not fit are refused."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 70, generator=generator)
    a_rows = torch.randn(rank, 70, generator=generator)
    b_cols = torch.randn(300, rank, generator=generator) * 0.1
    correct = skinny.corrector(library, weight, a_rows, b_cols)

    def check(x, mask):
        expected = F.linear(x, weight) + ((x @ a_rows.T) * mask) @ b_cols.T
        torch.testing.assert_close(correct(x, mask), expected, atol=1e-4, rtol=1e-4)

    for rows in (1, 3, 8, 11):
        x = torch.randn(rows, 70, generator=generator)
        mask = (torch.rand(rows, rank, generator=generator) > 0.5).float()
        check(x, mask)
    weight.mul_(0.5)  # read as it is now
    check(x, mask)
    with pytest.raises(ValueError):
        correct(x, mask[:, :-1])
    with pytest.raises(ValueError):
        correct(x[:, :-1], mask)
    with pytest.raises(ValueError):  # a rank that is no multiple of the kernel's step
        skinny.corrector(library, weight, a_rows[:-1], b_cols[:, :-1])
    with pytest.raises(ValueError):
        skinny.corrector(library, weight, a_rows, b_cols[:-1])
    with pytest.raises(ValueError):  # float32 only
        skinny.corrector(library, weight.to(torch.bfloat16), a_rows, b_cols)


@needs_kernel
@pytest.mark.parametrize("flags", ["native", "avx2"])
def test_the_vector_exp_is_within_a_few_ulp_of_torchs(tmp_path, flags):
    """The kernel's exp (softmax and SiLU of its layer step) on both vector paths: within 4
    ulp over the whole float range it takes; beyond it, clamped (0 below, finite above)."""
    import ctypes

    chosen = skinny.FLAGS
    if flags == "avx2":
        chosen = tuple(f for f in skinny.FLAGS if f != "-march=native") + ("-march=haswell",)
    library = skinny.load(folder=tmp_path, flags=chosen)
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_003), torch.randn(10_001) * 10])
    out = torch.empty_like(x)
    library.skinny_exp(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), x.numel())
    exact = torch.exp(x.double())
    assert ((out.double() - exact).abs() / exact).max() < 4 * 2**-23
    edges = torch.tensor([-1000.0, -100.0, 100.0, 1000.0] + [0.0] * 16)  # past the clamp
    out = torch.empty_like(edges)
    library.skinny_exp(ctypes.c_void_p(edges.data_ptr()), ctypes.c_void_p(out.data_ptr()), 20)
    assert out[0] < 1e-37 and out[1] < 1e-37 and out[4:].eq(1.0).all()
    assert torch.isfinite(out[2:4]).all() and out[2] > 1e38
