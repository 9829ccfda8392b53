"""The decoding step's two speed-ups: the weight-on-the-left product and the in-place KV cache.

What must hold: both compute what they replace (within float rounding for the product, exactly
for the cache), leave the model's parameters and state dict alone, and step aside where they do
not apply (bf16, many rows, special cache layers).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from bot.engine import kernels
from bot.engine.decoding import GrowingLayer, _growing
from tests.test_engine_worker import QUESTIONS, WAIT, load_tiny, make_engine


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 40, kernels.MOST_ROWS, kernels.MOST_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_the_product_equals_f_linear_within_rounding(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 70, generator=generator)
    b = torch.randn(300, generator=generator) if bias else None
    x = torch.randn(rows, 1, 70, generator=generator)  # (rows, tokens, features) as in a step
    got = kernels.linear(x, weight, b)
    expected = F.linear(x, weight, b)
    assert got.shape == expected.shape == (rows, 1, 300)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if rows > kernels.MOST_ROWS:  # a long prefill keeps F.linear itself
        assert torch.equal(got, expected)


def test_a_prefill_shaped_input_and_bf16_keep_f_linear():
    weight = torch.randn(64, 32)
    x = torch.randn(2, 5, 32)  # 10 rows: still the fast path, any leading shape
    torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=0)
    low = weight.to(torch.bfloat16)
    assert torch.equal(kernels.linear(x.to(low.dtype), low), F.linear(x.to(low.dtype), low))


def test_install_changes_classes_only_and_uninstall_undoes_it(tiny_model_dir, tmp_path):
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    model = loaded.model
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        linears = sum(type(m) is torch.nn.Linear for m in model.modules())
        assert kernels.applies(model)
        assert kernels.install(model) == linears > 0
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        during = model(input_ids=ids).logits
        kernels.uninstall(model)
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == linears
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[name], state[name]) for name in state)
    torch.testing.assert_close(during, before, atol=1e-4, rtol=1e-4)


def test_the_engine_installs_the_product_while_it_runs_and_answers_alike(tiny_model_dir, tmp_path):
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    answers = {}
    for row_kernels in (False, True):
        with make_engine(loaded, row_kernels=row_kernels) as engine:
            answers[row_kernels] = [engine.answer(q, timeout=WAIT).text for q in QUESTIONS[:4]]
            running = {type(m) for m in loaded.model.modules()}
            assert (kernels.RowLinear in running) is row_kernels
        assert kernels.RowLinear not in {type(m) for m in loaded.model.modules()}
    assert answers[True] == answers[False]


def test_the_engine_measures_up_to_how_many_rows_the_product_is_faster(tiny_model_dir, tmp_path):
    loaded = load_tiny(tiny_model_dir, tmp_path / "cache")
    limits, ratios = kernels.measure(loaded.model, threads=(1, 2), counts=(1, 2, 4), repeats=1)
    assert set(limits) == set(ratios) == {1, 2}
    for threads, limit in limits.items():
        measured = ratios[threads]
        assert list(measured) == [1, 2, 4][: len(measured)] and all(
            r > 0 for r in measured.values()
        )
        # the limit: the last count of an unbroken run of wins; the first loss ends the run
        wins = [rows for rows, ratio in measured.items() if ratio < 0.95]
        assert limit == (max(wins) if wins else 0)
        assert wins == [1, 2, 4][: len(wins)]
        assert len(measured) == min(3, len(wins) + 1)
    with make_engine(loaded) as engine:  # row_kernels=None: measured at the worker's start
        engine.answer(QUESTIONS[0], timeout=WAIT)
        stats = engine.stats()
        installed = kernels.RowLinear in {type(m) for m in loaded.model.modules()}
        assert stats["row_kernels"] == installed
        assert installed == bool(
            stats["row_kernel_rows"] and any(stats["row_kernel_rows"].values())
        )
    low = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert not kernels.applies(low)
    assert kernels.measure(low) == ({}, {})


def test_each_layer_uses_the_product_only_up_to_the_limit_of_the_thread_count():
    layer = torch.nn.Linear(70, 300)
    kernels.install(layer, {1: 0, 2: 4})
    calls = []
    original = kernels.F.linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    threads = torch.get_num_threads()
    try:
        kernels.F.linear = counting
        with torch.inference_mode():
            for count, rows in ((1, 2), (2, 4), (2, 5), (3, 1)):
                torch.set_num_threads(count)
                expected = original(torch.ones(rows, 1, 70), layer.weight, layer.bias)
                torch.testing.assert_close(layer(torch.ones(rows, 1, 70)), expected)
    finally:
        kernels.F.linear = original
        torch.set_num_threads(threads)
        kernels.uninstall(layer)
    # F.linear: 1 thread (limit 0), 2 threads past 4 rows, 3 threads (never measured)
    assert calls == [2, 5, 1]
    assert type(layer) is torch.nn.Linear and "row_limits" not in vars(layer)


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
