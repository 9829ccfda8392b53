"""The decoding step's speed-ups: the few-row products (skinny kernel, weight on the left) and
the in-place KV cache.

What must hold: both compute what they replace (within float rounding for the products,
exactly for the cache), leave the model's parameters and state dict alone, and step aside where
they do not apply (bf16, many rows, row counts where they lost, special cache layers).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from bot.engine import kernels
from bot.engine.decoding import GrowingLayer, _growing
from tests.conftest import kernel_buildable
from tests.test_engine_worker import QUESTIONS, WAIT, load_tiny, make_engine

PRODUCT = "skinny" if kernel_buildable() else "weight on the left"  # what the engine uses here


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 40, kernels.MOST_ROWS, kernels.MOST_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("product", ["skinny", "left"])
def test_the_product_equals_f_linear_within_rounding(rows, bias, product, request):
    built = request.getfixturevalue("library") if product == "skinny" else None
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 70, generator=generator)  # 70: not a multiple of a vector
    b = torch.randn(300, generator=generator) if bias else None
    x = torch.randn(rows, 1, 70, generator=generator)  # (rows, tokens, features) as in a step
    got = kernels.linear(x, weight, b, library=built)
    expected = F.linear(x, weight, b)
    assert got.shape == expected.shape == (rows, 1, 300)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if rows > kernels.MOST_ROWS:  # a long prefill keeps F.linear itself
        assert torch.equal(got, expected)


def test_any_leading_shape_and_bf16_only_through_the_kernel(library):
    weight = torch.randn(64, 32)
    x = torch.randn(2, 5, 32)  # 10 rows: still the fast path, any leading shape
    low, x_low = weight.to(torch.bfloat16), x.to(torch.bfloat16)
    for built in (None, library):
        got = kernels.linear(x, weight, library=built)
        torch.testing.assert_close(got, F.linear(x, weight), atol=1e-5, rtol=0)
        got = kernels.linear(x_low, low, library=built)
        assert got.dtype == torch.bfloat16 and got.shape == (2, 5, 64)
        if built is None:  # the weight on the left is for float32 only
            assert torch.equal(got, F.linear(x_low, low))
        else:  # summed in float32 as torch's bf16 product does, rounded once at the end
            torch.testing.assert_close(got, F.linear(x_low, low), atol=2e-2, rtol=1e-2)
    with pytest.raises(RuntimeError):  # dtypes that differ: F.linear's error, not a wrong sum
        kernels.linear(x, low, library=library)


def test_install_changes_classes_only_and_uninstall_undoes_it(tiny_model_dir, tmp_path, library):
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    model = loaded.model
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        linears = sum(type(m) is torch.nn.Linear for m in model.modules())
        assert kernels.applies(model)
        assert kernels.install(model, library=library) == linears > 0
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert all(m.multiply is not None for m in model.modules() if type(m) is kernels.RowLinear)
        during = model(input_ids=ids).logits
        kernels.uninstall(model)
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == linears
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[name], state[name]) for name in state)
    assert all("library" not in vars(m) and "multiply" not in vars(m) for m in model.modules())
    torch.testing.assert_close(during, before, atol=1e-4, rtol=1e-4)


def test_the_engine_installs_the_product_while_it_runs_and_answers_alike(tiny_model_dir, tmp_path):
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    answers = {}
    for row_kernels in (False, True):
        with make_engine(loaded, row_kernels=row_kernels) as engine:
            answers[row_kernels] = [engine.answer(q, timeout=WAIT).text for q in QUESTIONS[:4]]
            running = {type(m) for m in loaded.model.modules()}
            assert (kernels.RowLinear in running) is row_kernels
            assert engine.stats()["row_kernel"] == (PRODUCT if row_kernels else None)
        assert kernels.RowLinear not in {type(m) for m in loaded.model.modules()}
    assert answers[True] == answers[False]


def test_the_engine_measures_at_which_row_counts_the_product_is_faster(
    tiny_model_dir, tmp_path, shape_table
):
    from bot.engine import skinny

    library = shape_table  # the engine measures the kernel's shapes too: put back after
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    counts = (1, 2, 4, 8)
    for built in (library, None):
        wins, ratios = kernels.measure(
            loaded.model, library=built, threads=(1, 2), counts=counts, repeats=1
        )
        assert set(wins) == set(ratios) == {1, 2}
        for threads, won in wins.items():
            measured = ratios[threads]
            assert list(measured) == list(counts) and all(r > 0 for r in measured.values())
            # a count is won where the product took under 0.95 of F.linear's time
            assert won == [rows for rows, ratio in measured.items() if ratio < 0.95]
    with make_engine(loaded) as engine:  # row_kernels=None: measured at the worker's start
        engine.answer(QUESTIONS[0], timeout=WAIT)
        stats = engine.stats()
        installed = kernels.RowLinear in {type(m) for m in loaded.model.modules()}
        assert stats["row_kernels"] == installed
        assert installed == bool(
            stats["row_kernel_rows"] and any(stats["row_kernel_rows"].values())
        )
        assert stats["row_kernel"] == (PRODUCT if installed else None)
        # the shape measured fastest at each count (one shape built: nothing measured)
        shapes = stats["row_kernel_shapes"]
        built = skinny.shapes(library)
        past_steps = [rows for rows in kernels.COUNTS if rows > engine.batch_size]  # prefills
        assert list(shapes) == (past_steps if len(built) > 1 else [])
        assert all(skinny.shape_for(library, rows) == 0 for rows in range(1, engine.batch_size + 1))
        assert set(shapes.values()) <= {f"{nw}x{mr}" for nw, mr in built}
    low = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert not kernels.applies(low) and kernels.applies(low, library)
    assert kernels.measure(low) == ({}, {})  # bf16 without the kernel: nothing to measure


def test_at_a_decoding_steps_counts_a_tie_goes_to_the_kernel(tiny_model_dir, tmp_path, monkeypatch):
    """Up to `ties_up_to` rows (the engine's batch size) a count is won unless the product is
    slower than F.linear beyond the margin: there the kernel also runs each layer as one call.
    Past it, and by default, only a win by the margin counts. Timed with fixed ratios."""
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    ratios = {1: 1.0, 2: 1.05, 4: 0.5, 8: 1.2, 16: 1.0, 32: 0.9}
    calls = []

    def fake_ratio(first, second, weights, inputs, *, repeats):
        rows = next(iter(inputs.values())).shape[0]
        calls.append(rows)
        return ratios[rows]

    monkeypatch.setattr(kernels, "_time_ratio", fake_ratio)
    monkeypatch.setattr(kernels, "_MEASURED", {})
    counts = tuple(ratios)
    wins, measured = kernels.measure(loaded.model, threads=(1,), counts=counts, ties_up_to=8)
    assert measured == {1: ratios}
    assert wins == {1: [1, 2, 4, 32]}  # 8 rows: slower beyond the margin; 16: past the steps
    # a count it did not win by the margin was measured twice (one noisy round must not decide)
    assert sorted(calls) == sorted([*counts, 1, 2, 8, 16])
    wins, _ = kernels.measure(loaded.model, threads=(1,), counts=counts)  # no ties: measured
    assert wins == {1: [4, 32]}


def test_the_kernels_shape_is_measured_at_each_count_and_serves_the_rows_up_to_it(
    tiny_model_dir, tmp_path, shape_table, monkeypatch
):
    """`measure_shapes` times each shape of the build at each count (past `above`) and sets the
    fastest in the kernel's table for the rows that count serves; a shape must beat the
    default by the margin. Timed here with a product whose cost depends on the shape in use
    (sleeps), so that which one wins is known."""
    import time

    from bot.engine import skinny

    library = shape_table
    found = skinny.shapes(library)
    if len(found) < 2:
        pytest.skip("this build of the kernel has one shape: nothing to choose")
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    first = kernels.measured_weights(loaded.model)[0]
    # milliseconds a pass takes in shape 0, 1, 2 at each count: 1-2 rows alike (the default
    # stays), 4 rows shape 1 fastest, 8 rows shape 2, 16 rows shape 1 by less than the margin
    costs = {1: (4, 4, 4), 2: (4, 4, 4), 4: (4, 1, 2), 8: (4, 2, 1), 16: (4, 3.95, 4)}

    def bound(built, weight):
        def multiply(x):
            if weight is first:
                time.sleep(costs[x.shape[0]][skinny.shape_for(built, x.shape[0])] / 1000)
            return x.new_zeros(x.shape[0], weight.shape[0])

        return multiply

    monkeypatch.setattr(kernels, "bound_product", bound)
    monkeypatch.setattr(kernels, "SHAPE_SECONDS", 0.0)
    monkeypatch.setattr(kernels, "_MEASURED", {})
    chosen = kernels.measure_shapes(loaded.model, library=library, counts=tuple(costs))
    assert chosen == {1: found[0], 2: found[0], 4: found[1], 8: found[2], 16: found[0]}
    served = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 8: 2, 9: 0, 16: 0, 17: 0, skinny.SHAPE_ROWS: 0}
    assert {rows: skinny.shape_for(library, rows) for rows in served} == served
    # kept for the process: applied again without timing anything
    monkeypatch.setattr(kernels, "bound_product", None)
    for rows in range(1, skinny.SHAPE_ROWS + 1):
        skinny.set_shape(library, rows, 0)
    assert kernels.measure_shapes(loaded.model, library=library, counts=tuple(costs)) == chosen
    assert skinny.shape_for(library, 8) == 2
    # past `above` only (the engine's batch size: its decoding steps keep the default shape)
    monkeypatch.setattr(kernels, "bound_product", bound)
    chosen = kernels.measure_shapes(loaded.model, library=library, above=4, counts=tuple(costs))
    assert chosen == {8: found[2], 16: found[0]}
    served = {1: 0, 3: 0, 4: 0, 5: 2, 8: 2, 9: 0, skinny.SHAPE_ROWS: 0}
    assert {rows: skinny.shape_for(library, rows) for rows in served} == served
    assert kernels.measure_shapes(loaded.model, library=library, above=16, counts=(4, 16)) == {}
    assert kernels.measure_shapes(loaded.model, library=None) == {}


def test_a_row_count_goes_with_the_next_measured_count():
    uses = kernels.plan({1: [], 2: [2, 8], 4: [1, 2, 4, 8, 16, 32]}, counts=(1, 2, 4, 8, 16, 32))
    assert uses[1] == (False,) * 33
    # 2 threads: 1 row goes with count 1 (lost), 2 with 2 (won), 3-4 with 4 (lost), 5-8 with
    # 8 (won), more with 16 and 32 (lost)
    assert [rows for rows, use in enumerate(uses[2]) if use] == [2, 5, 6, 7, 8]
    assert [rows for rows, use in enumerate(uses[4]) if use] == list(range(1, 33))


def test_each_layer_uses_the_product_only_at_the_counts_it_won_for_the_thread_count(library):
    layer = torch.nn.Linear(70, 300)
    kernels.install(layer, {1: [], 2: [1, 2, 4]}, library=library)
    calls = []
    original = kernels.F.linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    threads = torch.get_num_threads()
    try:
        kernels.F.linear = counting
        with torch.inference_mode():
            for count, rows in ((1, 2), (2, 4), (2, 3), (2, 5), (3, 1)):
                torch.set_num_threads(count)
                expected = original(torch.ones(rows, 1, 70), layer.weight, layer.bias)
                torch.testing.assert_close(layer(torch.ones(rows, 1, 70)), expected)
    finally:
        kernels.F.linear = original
        torch.set_num_threads(threads)
        kernels.uninstall(layer)
    # F.linear: 1 thread (won nothing), 2 threads past 4 rows, 3 threads (never measured)
    assert calls == [2, 5, 1]
    assert type(layer) is torch.nn.Linear and "row_plan" not in vars(layer)


def test_the_growing_layer_holds_what_concatenation_holds_and_steps_in_place():
    generator = torch.Generator().manual_seed(0)

    def states(rows, columns):
        return (
            torch.randn(rows, 2, columns, 4, generator=generator),
            torch.randn(rows, 2, columns, 4, generator=generator),
        )

    plain, growing = DynamicLayer(), GrowingLayer()
    first = states(3, 7)
    for layer in (plain, growing):
        layer.update(*first)
    pointers, rows = set(), 3
    for step in range(70):  # past the spare columns: the buffers grow and keep their contents
        new = states(rows, 1)
        expected = plain.update(*new)
        got = growing.update(*new)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
        pointers.add(growing._buffers[0].data_ptr())
        if step == 30:  # rows leave, as DecodeBatch.keep does: contents replaced from outside
            index, rows = torch.tensor([2, 0]), 2
            for layer in (plain, growing):
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            new = states(2, 1)
            assert all(
                torch.equal(g, e)
                for g, e in zip(growing.update(*new), plain.update(*new), strict=True)
            )
    # a new buffer only every `spare` steps (and once after the rows left), not every step
    assert len(pointers) <= 70 // GrowingLayer.spare + 3
    assert growing.get_seq_length() == plain.get_seq_length() == 7 + 70 + 1


def test_only_plain_dynamic_layers_grow_in_place():
    class Special(DynamicLayer):
        pass

    cache = DynamicCache()
    cache.layers = [DynamicLayer(), Special()]
    _growing(cache)
    assert [type(layer) for layer in cache.layers] == [GrowingLayer, Special]


def test_bf16_products_past_the_row_plan_are_widened_to_float32(library, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(70, 300).to(torch.bfloat16)
    x = torch.randn(100, 1, 70, generator=generator).to(torch.bfloat16)  # a prefill's rows
    widened = kernels.widened(x, layer.weight, layer.bias)
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert widened.dtype == torch.bfloat16 and torch.equal(widened, exact.to(torch.bfloat16))
    torch.testing.assert_close(widened, F.linear(x, layer.weight, layer.bias), atol=2e-2, rtol=1e-2)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for widen in (True, False):
                kernels.install(layer, {threads: [1, 2, 4, 8]}, library=library, widen=widen)
                expected = widened if widen else F.linear(x, layer.weight, layer.bias)
                assert torch.equal(layer(x), expected)
                few = x[:8]  # within the plan: the skinny kernel either way
                assert torch.equal(
                    layer(few), kernels.linear(few, layer.weight, layer.bias, library=library)
                )
                kernels.uninstall(layer)
            # a row count the plan gave to F.linear stays there: widening converts the whole
            # weight, which a step's few rows do not repay
            kernels.install(layer, {threads: [2, 4, 8]}, library=library, widen=True)
            calls = []
            monkeypatch.setattr(kernels, "widened", lambda *args: calls.append(args))
            one = x[:1]
            assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))
            assert calls == []
            layer(x)
            assert len(calls) == 1  # the prefill's rows are
    finally:
        kernels.uninstall(layer)
    assert "widen" not in vars(layer)


def test_widening_is_measured_for_bf16_cpu_models_only(tiny_model_dir, tmp_path):
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    assert kernels.measure_widening(loaded.model) is None  # float32: nothing to widen
    low = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    ratio = kernels.measure_widening(low.to(torch.bfloat16), rows=16, repeats=1)
    assert ratio is not None and ratio > 0
