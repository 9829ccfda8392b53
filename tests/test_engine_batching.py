"""Continuous batching and merged adapters on the tiny model with redrawn (random) weights.

What must hold: a question that arrives while others decode joins them at the next step and
leaves when it is done, and every greedy answer equals the answer the same question gets alone;
an adapter merged into the weights answers like PEFT's unmerged adapter, comes out again exactly
enough, and a swap never lands inside an answer.
"""

from __future__ import annotations

import threading

import pytest
import torch

from bot.engine.decoding import DecodeBatch
from bot.engine.loading import base_weight_reader, load_base_model
from bot.engine.merging import MergedWeights, read_adapter
from bot.engine.prompt import encode_prompt
from bot.engine.types import AnswerRequest, EngineError
from tests.support.kernel import build_avx2, record_layer_steps
from tests.test_engine_worker import (
    QUESTIONS,
    WAIT,
    Gate,
    load_tiny,
    make_adapter,
    make_engine,
)


@pytest.fixture
def loaded(tiny_model_dir, tmp_path):
    return load_tiny(tiny_model_dir, tmp_path / "cache")


@pytest.fixture
def adapters(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    return {
        "v0001": make_adapter(tiny_model_dir, cache, tmp_path / "adapters" / "v0001", seed=11),
        "v0002": make_adapter(tiny_model_dir, cache, tmp_path / "adapters" / "v0002", seed=22),
    }


def singles(loaded, requests, **options) -> list[str]:
    with make_engine(loaded, batch_size=1, **options) as engine:
        return [engine.answer(request, timeout=WAIT).text for request in requests]


def prompt_ids(loaded, question: str) -> list[int]:
    return encode_prompt(
        loaded.tokenizer, AnswerRequest(question), system_prompt="Be brief.", max_input_tokens=256
    ).input_ids


# the decode loop itself


def test_the_lean_step_gives_the_logits_of_the_transformers_forward(loaded, adapters):
    """Staggered joins (padding), a row leaving, rows of two versions corrected, bf16: each
    step of the lean path against the transformers forward on a twin batch."""
    from bot.engine.decoding import LeanStep

    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    assert LeanStep.build(model) is not None  # the tiny model is a Llama, GQA included
    assert model.config.num_key_value_heads != model.config.num_attention_heads
    read = {v: read_adapter(adapters[v], version=v, base_model=model) for v in ("v0001",)}
    weights = MergedWeights(model=model)
    weights.apply(read["v0001"])
    batches = {}
    for lean in (True, False):
        batch = DecodeBatch(model, pad_id=pad, device=loaded.device, lean=lean)
        batch.weights_for = lambda keys: weights.mixed(keys, read)
        batches[lean] = batch
    assert batches[True].lean is not None and batches[False].lean is None
    compared = 0
    with torch.inference_mode():
        tokens = {}
        for step in range(10):
            for lean, batch in batches.items():
                if step in (0, 3):  # a long prompt joins later: the first row is padded
                    question = QUESTIONS[0] if step == 0 else QUESTIONS[4] * 2
                    keys = ["v0001"] if step == 0 else [None]  # the base: corrected rows
                    new = batch.join([prompt_ids(loaded, question)], [step], keys=keys)
                    previous = tokens.get(lean, torch.zeros(0, dtype=torch.long))
                    tokens[lean] = torch.cat([previous, new.argmax(-1)])
                if step == 7:
                    batch.keep([1])
                    tokens[lean] = tokens[lean][[1]]
            steps = {lean: batch.step(tokens[lean]) for lean, batch in batches.items()}
            torch.testing.assert_close(steps[True], steps[False], atol=1e-5, rtol=1e-5)
            for lean in batches:
                tokens[lean] = steps[False].argmax(-1)  # both follow the same tokens
            compared += 1
    weights.apply(None)
    assert compared == 10
    # bf16: the norms go through the modules (their float32 round trip), on a bf16 copy
    low = type(model)(model.config).to(torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    low.eval()
    outs = {}
    with torch.inference_mode():
        for lean in (True, False):
            batch = DecodeBatch(low, pad_id=pad, device=loaded.device, lean=lean)
            first = batch.join([prompt_ids(loaded, q) for q in QUESTIONS[:2]], [0, 1])
            outs[lean] = batch.step(first.argmax(-1)).float()
    torch.testing.assert_close(outs[True], outs[False], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("flags", ["native", "avx2"])
def test_the_kernel_layer_step_gives_the_logits_of_the_transformers_forward(
    loaded, adapters, library, monkeypatch, tmp_path, flags
):
    """With the engine's kernel installed, each layer of a step is one kernel call
    (`skinny.layer_step`): staggered joins (padding), rows leaving, caches regrown, rows of
    another version corrected, one row and several; each step against the transformers
    forward on a twin batch, and the tokens they choose the same. On this CPU's vector path
    and on AVX2's."""
    from bot.engine import kernels
    from bot.engine.decoding import GrowingLayer

    if flags == "avx2":
        library = build_avx2(tmp_path / "avx2")
        assert library.skinny_vector_width() == 8
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    kernels.install(model, library=library)
    calls = record_layer_steps(
        monkeypatch, lambda x, rest, where: (x.shape[0], rest[-1] is not None, where is not None)
    )
    monkeypatch.setattr(GrowingLayer, "spare", 3)  # regrown every few steps
    read = {v: read_adapter(adapters[v], version=v, base_model=model) for v in adapters}
    weights = MergedWeights(model=model)
    weights.apply(read["v0002"])
    batches = {
        lean: DecodeBatch(model, pad_id=pad, device=loaded.device, lean=lean)
        for lean in (True, False)
    }
    for batch in batches.values():
        batch.weights_for = lambda keys: weights.mixed(keys, read)
    # two questions of different lengths prefilled together (padding), whole; then one on the
    # prefix cache; then two of two other versions, corrected in their prefill as in steps
    joins = {
        0: ([QUESTIONS[0], QUESTIONS[2] * 3], ["v0002", "v0002"]),
        2: ([QUESTIONS[4] * 2], ["v0002"]),
        5: ([QUESTIONS[1], QUESTIONS[3] * 2], [None, "v0001"]),
    }
    prefilled = []
    monkeypatch.setattr(
        DecodeBatch, "_join_group", counting(DecodeBatch._join_group, prefilled, batches[True])
    )
    tokens: dict[bool, torch.Tensor] = {}
    try:
        with torch.inference_mode():
            for step in range(16):
                if step == 2:  # from now on prompts start with a shared prefix
                    for batch in batches.values():
                        batch.set_prefix(prompt_ids(loaded, QUESTIONS[4])[:5])
                joined = {}
                for lean, batch in batches.items():
                    if step in joins:
                        questions, versions = joins[step]
                        ids = [prompt_ids(loaded, question) for question in questions]
                        rows = list(range(len(ids)))
                        joined[lean] = batch.join(ids, rows, keys=versions)
                        previous = tokens.get(lean, torch.zeros(0, dtype=torch.long))
                        tokens[lean] = torch.cat([previous, joined[lean].argmax(-1)])
                    if step in (9, 12):  # the first row leaves, then the second
                        batch.keep(list(range(1, len(batch))))
                        tokens[lean] = tokens[lean][1:]
                if joined:
                    torch.testing.assert_close(joined[True], joined[False], atol=1e-4, rtol=1e-4)
                steps = {lean: batch.step(tokens[lean]) for lean, batch in batches.items()}
                torch.testing.assert_close(steps[True], steps[False], atol=1e-4, rtol=1e-4)
                assert torch.equal(steps[True].argmax(-1), steps[False].argmax(-1))
                for lean in batches:
                    tokens[lean] = steps[False].argmax(-1)
    finally:
        weights.apply(None)
        kernels.uninstall(model)
    layers = len(model.model.layers)
    steps = [call for call in calls if not call[2]]
    assert len(steps) == 16 * layers  # every step of the lean batch went through the kernel
    assert {rows for rows, _, _ in steps} == {2, 3, 4, 5}
    assert any(corrected for _, corrected, _ in steps)  # rows of other versions corrected
    assert not all(corrected for _, corrected, _ in steps)  # and none before they came
    # every prefill through the kernel, only their real tokens (no padding rows): the first
    # whole, the others after the 5 tokens of the prefix; the last one's rows corrected
    skipped = {0: 0, 2: 5, 5: 5}
    tokens_of = [
        sum(len(prompt_ids(loaded, q)) - skipped[step] for q in joins[step][0]) for step in joins
    ]
    prefills = [(rows, corrected) for rows, corrected, where in calls if where]
    assert prefills == [
        (tokens, step == 5) for tokens, step in zip(tokens_of, joins, strict=True)
        for _ in range(layers)
    ]  # fmt: skip
    assert prefilled == [True, True, True]


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim",
    [(6, 2, 24), (8, 8, 32), (4, 1, 64), (9, 3, 64)],  # 24: no whole vector; 9/3: SmolLM2's
)
def test_the_kernel_layer_step_takes_any_head_shape(
    library, kernel_shape, heads, kv_heads, head_dim
):
    """Head groups of 1-4 heads and head sizes a vector does or does not divide (the kernel's
    grouped attention or its general loop), in each of the kernel's product shapes: prefill
    and steps through the kernel against the transformers forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bot.engine import kernels

    config = LlamaConfig(
        vocab_size=300, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(heads * head_dim)
    model = LlamaForCausalLM(config).eval()
    kernels.install(model, library=library)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (7, 19, 12)]
    logits = {}
    with torch.inference_mode():
        for lean in (True, False):
            batch = DecodeBatch(model, pad_id=0, device="cpu", lean=lean)
            out = [batch.join(prompts[:2], [0, 1])]
            for step in range(6):
                if step == 2:
                    out.append(batch.join(prompts[2:], [2]))
                out.append(batch.step(torch.cat(out[-2:] if step == 2 else out[-1:]).argmax(-1)))
            logits[lean] = out
    for got, expected in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def counting(join_group, prefilled: list, batch):
    """`DecodeBatch._join_group` noting, for `batch`, whether its prefill ran the kernel."""

    def counted(self, *args, **kwargs):
        if self is not batch:
            return join_group(self, *args, **kwargs)
        original = self.lean.prefill

        def prefill(*a):
            logits = original(*a)
            prefilled.append(logits is not None)
            return logits

        self.lean.prefill = prefill
        try:
            return join_group(self, *args, **kwargs)
        finally:
            del self.lean.prefill

    return counted


def test_a_kernel_layer_step_refuses_what_it_cannot_take(loaded, library):
    """Shapes the kernel would read or write out of bounds are refused before the call."""
    from bot.engine import skinny

    layer = loaded.model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    projections = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                   mlp.gate_proj, mlp.up_proj, mlp.down_proj]  # fmt: skip
    weights = tuple(m.weight.detach() for m in projections)
    norms = (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
    config = loaded.model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    options = dict(eps=1e-5, heads=heads, kv_heads=kv_heads, scale=0.25)
    with pytest.raises(ValueError, match="not a Llama layer"):
        skinny.layer_step(library, weights[::-1], norms, **options)
    with pytest.raises(ValueError, match="not a Llama layer"):
        skinny.layer_step(library, tuple(w.double() for w in weights), norms, **options)
    step = skinny.layer_step(library, weights, norms, **options)
    hidden, dim = weights[0].shape[1], weights[0].shape[0] // heads
    x, cos = torch.randn(2, hidden), torch.ones(2, dim)
    keys = torch.zeros(2, kv_heads, 4, dim)
    mask = torch.ones(2, 4, dtype=torch.long)
    before = keys.clone()
    for bad in (
        dict(length=4),  # no room for the column
        dict(mask=torch.ones(2, 3, dtype=torch.long)),  # a mask of the wrong width
        dict(keys=torch.zeros(2, kv_heads, 4, dim + 1)),
        dict(x=torch.zeros(3, hidden)),
    ):
        args = dict(x=x, cos=cos, sin=cos, keys=keys, values=keys.clone(), length=3, mask=mask)
        args.update(bad)
        with pytest.raises(ValueError, match="not what this layer's step takes"):
            step(**args)
    assert torch.equal(keys, before)
    step(x, cos, cos, keys, keys.clone(), 3, mask)  # what fits runs
    assert not torch.equal(keys, before)


def test_rows_that_join_and_leave_decode_like_rows_alone(loaded):
    """Drive DecodeBatch by hand: staggered joins, rows leaving, padding columns trimmed."""
    model, pad = loaded.model, loaded.tokenizer.pad_token_id

    def alone(question: str, steps: int) -> list[int]:
        batch = DecodeBatch(model, pad_id=pad, device=loaded.device)
        with torch.inference_mode():
            tokens = batch.join([prompt_ids(loaded, question)], ["x"]).argmax(-1)
            out = [int(tokens[0])]
            for _ in range(steps - 1):
                tokens = batch.step(tokens).argmax(-1)
                out.append(int(tokens[0]))
        return out

    long_q = QUESTIONS[4]  # the longest prompt: when it leaves, padding columns go with it
    expected = {q: alone(q, 12) for q in (QUESTIONS[0], long_q, QUESTIONS[3])}
    batch = DecodeBatch(model, pad_id=pad, device=loaded.device)
    produced: dict[str, list[int]] = {}
    joins = {0: QUESTIONS[0], 2: long_q, 4: QUESTIONS[3]}  # step -> newcomer
    widths = []
    tokens = torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        for step in range(40):
            if step in joins:  # the long prompt joins later: the running row gets padded
                question = joins[step]
                new = batch.join([prompt_ids(loaded, question)], [question]).argmax(-1)
                produced[question] = [int(new[0])]
                tokens = torch.cat([tokens, new])
            tokens = batch.step(tokens).argmax(-1)
            keep = []
            for index, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
                produced[row].append(token)
                if len(produced[row]) < 12:
                    keep.append(index)
            batch.keep(keep)
            tokens = tokens[keep]
            widths.append(batch.width)
            if not batch.rows:
                break
    assert produced == expected
    padded = len(prompt_ids(loaded, long_q))
    assert max(widths) > padded  # the long row widened the batch...
    assert 0 < widths[-2] < max(widths)  # ...and its columns left with it


def test_a_question_arriving_mid_answer_joins_and_finishes_first(loaded):
    long_request = AnswerRequest(QUESTIONS[0], max_new_tokens=40)
    short_request = AnswerRequest(QUESTIONS[1], max_new_tokens=3)
    options = {"generate_options": {"min_new_tokens": 40}}  # no early stop: the long one is long
    expected = singles(loaded, [long_request, short_request], **options)
    with make_engine(loaded, **options) as engine:
        seen_short_done: list[bool] = []
        arrived = threading.Event()
        holder: dict = {}

        def on_partial(text: str) -> None:
            if "short" not in holder:  # the short question arrives at the long one's first token
                holder["short"] = engine.submit(short_request)
                arrived.set()
            seen_short_done.append(holder["short"].done())

        long_future = engine.submit(long_request, on_partial=on_partial)
        assert arrived.wait(WAIT)
        long_result = long_future.result(timeout=WAIT)
        short_result = holder["short"].result(timeout=WAIT)
        stats = engine.stats()
    assert [long_result.text, short_result.text] == expected
    assert any(seen_short_done) and not all(seen_short_done)  # done while the long one decoded
    assert stats["batches"] == 2 and stats["answered"] == 2
    assert short_result.timings.total_s < long_result.timings.total_s


def test_staggered_arrivals_with_mixed_limits_equal_single_answers(loaded):
    """Questions join at different steps (each at the next partial of a driver answer)."""
    requests = [AnswerRequest(q, max_new_tokens=3 + (5 * i) % 11) for i, q in enumerate(QUESTIONS)]
    driver = AnswerRequest("Tell me everything about the deploys.", max_new_tokens=30)
    options = {"generate_options": {"min_new_tokens": 30}}
    expected = singles(loaded, [driver, *requests], **options)
    with make_engine(loaded, batch_size=4, **options) as engine:
        futures: list = []

        def on_partial(text: str) -> None:
            if len(futures) < len(requests):
                futures.append(engine.submit(requests[len(futures)]))

        first = engine.submit(driver, on_partial=on_partial)
        results = [first.result(timeout=WAIT)]
        while len(futures) < len(requests):  # the driver may finish before all were sent
            futures.append(engine.submit(requests[len(futures)]))
        results += [future.result(timeout=WAIT) for future in futures]
        stats = engine.stats()
    assert [result.text for result in results] == expected
    assert stats["batches"] > 2  # they really joined at different steps


def test_unsupported_generate_options_are_refused(loaded):
    with pytest.raises(EngineError, match="decodes greedily"):
        make_engine(loaded, generate_options={"temperature": 0.7, "do_sample": True})


# merged adapters


@pytest.mark.parametrize("before", [None, "v0002"], ids=["onto-base", "replacing-v0002"])
def test_a_merged_adapter_answers_like_the_unmerged_peft_adapter(
    loaded, adapters, tiny_model_dir, tmp_path, before
):
    """Merged onto the base weights, or in one pass in place of another merged version."""
    from peft import PeftModel

    reference = load_tiny(tiny_model_dir, tmp_path / "cache-ref").model
    peft_model = PeftModel.from_pretrained(reference, str(adapters["v0001"])).eval()
    ids = torch.tensor([prompt_ids(loaded, QUESTIONS[0])])
    weights = MergedWeights(model=loaded.model)
    if before:
        weights.apply(read_adapter(adapters[before], version=before, base_model=loaded.model))
    weights.apply(read_adapter(adapters["v0001"], version="v0001", base_model=loaded.model))
    with torch.inference_mode():
        merged = loaded.model(input_ids=ids).logits
        unmerged = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():  # the adapter really changes the logits
            base = peft_model(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (merged - unmerged).abs().max() < (unmerged - base).abs().max() / 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerging_gives_the_base_weights_back(loaded, adapters, dtype):
    model = loaded.model.to(dtype)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    weights = MergedWeights(model=model)
    for version in ("v0001", "v0002", "v0001", None):
        adapter = (
            None
            if version is None
            else read_adapter(adapters[version], version=version, base_model=model)
        )
        weights.apply(adapter)
    changed = max((p - original[name]).abs().max().item() for name, p in model.named_parameters())
    if dtype == torch.float32:
        assert changed < 1e-5  # subtracting the delta again: a few ulp
    else:
        assert changed == 0  # low precision: the originals are copied back


@pytest.fixture
def bf16(loaded, tmp_path):
    """The redrawn tiny model saved and loaded again in bfloat16 (its file is its base)."""
    folder = tmp_path / "redrawn"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return load_base_model(str(folder), device="cpu", cache_dir=tmp_path / "c", dtype="bfloat16")


@pytest.mark.parametrize("flags", ["native", "avx2"])
def test_the_kernel_layer_step_runs_bf16_weights_over_a_bf16_cache(
    bf16, library, monkeypatch, tmp_path, flags
):
    """A bf16 model with the kernel installed: every layer of its prefills and steps one call
    of the kernel, reading bf16 weights and a bf16 cache (rows padded, a prefix, a row
    leaving, the buffers regrown). Its sums and stream stay float32, so its logits are those
    of the same bf16 weights computed in float32 (a twin float32 model on the same cache
    values) within the rounding of what the cache keeps, and within bf16's noise of the
    transformers forward in bf16 (which rounds after every op, and strays further from them)."""
    from bot.engine import kernels
    from bot.engine.decoding import GrowingLayer

    if flags == "avx2":
        library = build_avx2(tmp_path / "avx2")
        assert library.skinny_vector_width() == 8
    model, pad = bf16.model, bf16.tokenizer.pad_token_id
    wide = type(model)(model.config)  # the same bf16 values, computed in float32
    wide.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    wide.eval()
    calls = record_layer_steps(
        monkeypatch, lambda x, rest, where: (x.shape[0], where is not None, rest[2].dtype)
    )
    monkeypatch.setattr(GrowingLayer, "spare", 3)
    kernels.install(model, library=library)
    batches = {
        name: DecodeBatch(twin, pad_id=pad, device="cpu", lean=lean)
        for name, twin, lean in (("kernel", model, True), ("bf16", model, False),
                                 ("float32", wide, False))
    }  # fmt: skip
    joins = {0: [QUESTIONS[0], QUESTIONS[2] * 3], 2: [QUESTIONS[4] * 2], 4: [QUESTIONS[1]]}
    prefills: dict[str, list] = {name: [] for name in batches}
    steps: dict[str, list] = {name: [] for name in batches}
    tokens = torch.zeros(0, dtype=torch.long)  # all three follow the kernel's tokens
    try:
        with torch.inference_mode():
            for step in range(10):
                for name, batch in batches.items():
                    if step == 2:
                        batch.set_prefix(prompt_ids(bf16, QUESTIONS[4])[:5])
                    if step in joins:
                        ids = [prompt_ids(bf16, q) for q in joins[step]]
                        prefills[name].append(batch.join(ids, list(range(len(ids)))).float())
                    if step == 7:
                        batch.keep(list(range(1, len(batch))))
                if step in joins:
                    tokens = torch.cat([tokens, prefills["kernel"][-1].argmax(-1)])
                if step == 7:
                    tokens = tokens[1:]
                # the float32 twin steps on the bf16 cache's values: only this step's own
                # keys and values (rounded as the kernel stores them) and the stream's final
                # rounding set it apart
                twin, own = batches["float32"].cache.layers, batches["kernel"].cache.layers
                for layer, kept in zip(twin, own, strict=True):
                    layer.keys.copy_(kept.keys)
                    layer.values.copy_(kept.values)
                for name, batch in batches.items():
                    steps[name].append(batch.step(tokens).float())
                tokens = steps["kernel"][-1].argmax(-1)
    finally:
        kernels.uninstall(model)
    layers = len(model.model.layers)
    assert len(calls) == (10 + len(joins)) * layers  # every prefill and step: the kernel's
    assert {dtype for _, _, dtype in calls} == {torch.bfloat16}  # over the bf16 cache
    assert sum(where for _, where, _ in calls) == len(joins) * layers
    for kind, logits in (("prefill", prefills), ("step", steps)):
        for got, low, wide_logits in zip(*logits.values(), strict=True):
            scale = low.abs().max()
            # measured (AVX-512 Xeon): within 0.3-1.0 % of the largest logit of the float32
            # computation, where the transformers forward in bf16 strays 1.4-4.7 % from it;
            # the bounds leave room for another CPU's sums and torch's bf16 products
            assert (got - wide_logits).abs().max() < scale * (2**-5 if kind == "prefill" else 2**-6)
            assert (got - low).abs().max() < scale * 2**-3, kind  # bf16's own noise


def test_bf16_merges_are_computed_from_the_base_file_and_keep_nothing_resident(bf16, adapters):
    from safetensors.torch import load_file

    model = bf16.model
    assert bf16.dtype == torch.bfloat16 and bf16.source is not None
    on_disk = load_file(bf16.source / "model.safetensors")  # float32, the source of truth
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    weights = MergedWeights(model=model, base_weights=base_weight_reader(bf16))
    for version in ("v0001", "v0002", "v0001", "v0002", None):
        adapter = (
            None
            if version is None
            else read_adapter(adapters[version], version=version, base_model=model)
        )
        weights.apply(adapter)
        assert not weights._originals  # read from the file, not kept
        for path, part in (adapter.parts if adapter else {}).items():
            expected = on_disk[f"{path}.weight"] + part.delta(device="cpu")
            assert torch.equal(model.get_submodule(path).weight, expected.to(torch.bfloat16))
    # after any number of swaps the base is exactly the base: no drift
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())


def test_bf16_rows_of_another_version_stay_within_bf16_noise(bf16, adapters):
    """The per-row correction in bfloat16: as close to the version alone as bf16 rounding lets
    two computations of one version be, far closer than the versions are to each other."""
    model, pad = bf16.model, bf16.tokenizer.pad_token_id
    read = {v: read_adapter(adapters[v], version=v, base_model=model) for v in adapters}
    prompts = [prompt_ids(bf16, q) for q in QUESTIONS[:2]]
    weights = MergedWeights(model=model, base_weights=base_weight_reader(bf16))
    with torch.inference_mode():
        alone = []
        for version, prompt in zip(("v0001", "v0002"), prompts, strict=True):
            weights.apply(read[version])
            batch = DecodeBatch(model, pad_id=pad, device=bf16.device)
            first = batch.join([prompt], [version])
            alone.append(batch.step(first.argmax(-1)).float())
        batch = DecodeBatch(model, pad_id=pad, device=bf16.device)
        firsts = []
        for version, prompt in zip(("v0001", "v0002"), prompts, strict=True):
            weights.apply(read[version])
            firsts.append(batch.join([prompt], [version]))
        with weights.mixed(["v0001", "v0002"], read):
            together = batch.step(torch.cat(firsts).argmax(-1)).float()
    apart = (alone[0] - alone[1]).abs().max()
    assert (together[0] - alone[0]).abs().max() < apart / 10  # v0001 corrected
    assert (together[1] - alone[1]).abs().max() < 1e-6  # v0002 is merged: the same computation


def test_a_bf16_engine_swaps_and_comes_back_to_the_same_answers(bf16, adapters):
    with make_engine(bf16) as engine:
        base = [engine.answer(q, timeout=WAIT).text for q in QUESTIONS[:3]]
        for version in ("v0001", "v0002", None):
            engine.set_adapter(version, adapters.get(version)).result(timeout=WAIT)
            answers = [engine.answer(q, timeout=WAIT) for q in QUESTIONS[:3]]
            assert {a.adapter_version for a in answers} == {version}
            assert ([a.text for a in answers] == base) == (version is None)


def test_a_bf16_engine_decodes_through_the_skinny_kernel(bf16, adapters, library):
    from bot.engine import kernels, skinny

    model, pad = bf16.model, bf16.tokenizer.pad_token_id
    prompts = [prompt_ids(bf16, q) for q in QUESTIONS[:3]]

    def logits():
        with torch.inference_mode():
            batch = DecodeBatch(model, pad_id=pad, device=bf16.device)
            first = batch.join(prompts, [None] * len(prompts))
            return batch.step(first.argmax(-1)).float()

    plain = logits()
    calls, original = [], skinny.product

    def counted(library, weight):  # each layer's product, bound at install
        multiply = original(library, weight)

        def counting(x):
            calls.append(weight.dtype)
            return multiply(x)

        return counting

    skinny.product = counted
    try:
        kernels.install(model, library=library)
        through = logits()
    finally:
        skinny.product = original
        kernels.uninstall(model)
    assert calls and set(calls) == {torch.bfloat16}  # the products ran through it
    # bf16's own noise: through torch's ops a bf16 step rounds after every op, the kernel's
    # layer step only what the cache keeps (see the layer step's bf16 test above)
    noise = plain.abs().max() * 2**-4
    assert (through - plain).abs().max() < noise
    with make_engine(bf16, row_kernels=True) as engine:
        base = [engine.answer(q, timeout=WAIT).text for q in QUESTIONS[:3]]
        stats = engine.stats()
        assert stats["row_kernel"] == "skinny" and stats["row_kernel_widen"]
        engine.set_adapter("v0002", adapters["v0002"]).result(timeout=WAIT)
        assert engine.answer(QUESTIONS[0], timeout=WAIT).adapter_version == "v0002"
        engine.set_adapter(None, None).result(timeout=WAIT)
        assert [engine.answer(q, timeout=WAIT).text for q in QUESTIONS[:3]] == base


def test_the_engine_hands_back_the_base_weights_when_it_stops(loaded, adapters):
    original = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    with make_engine(loaded) as engine:
        engine.set_adapter("v0002", adapters["v0002"]).result(timeout=WAIT)
        assert engine.answer("hello", timeout=WAIT).adapter_version == "v0002"
        touched = max(
            (p - original[name]).abs().max().item() for name, p in loaded.model.named_parameters()
        )
        assert touched > 1e-3  # merged into the weights while serving
    after = max(
        (p - original[name]).abs().max().item() for name, p in loaded.model.named_parameters()
    )
    assert after < 1e-5


@pytest.mark.parametrize("through", ["torch", "skinny"])
def test_rows_of_other_versions_decode_as_if_their_own_adapter_were_merged(
    loaded, adapters, through, request
):
    """One batch, three versions: v0002 merged, rows on v0001 and on the base corrected; with
    torch's products, or in one pass of the skinny kernel (the factors an extension of its dot
    products) through the transformers forward (the kernel's whole-layer step, which the lean
    step takes, is tested against it above)."""
    from bot.engine import kernels, skinny

    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    passes, kernel_corrector = [], skinny.corrector
    if through == "skinny":
        kernels.install(model, library=request.getfixturevalue("library"))

        def counted_corrector(*args):
            correct = kernel_corrector(*args)

            def counted(x, mask):
                passes.append(x.shape)
                return correct(x, mask)

            return counted

        skinny.corrector = counted_corrector
        request.addfinalizer(lambda: setattr(skinny, "corrector", kernel_corrector))
        request.addfinalizer(lambda: kernels.uninstall(model))
    read = {v: read_adapter(adapters[v], version=v, base_model=model) for v in ("v0001", "v0002")}
    prompts = [prompt_ids(loaded, q) for q in QUESTIONS[:3]]
    versions = ["v0001", None, "v0002"]
    weights = MergedWeights(model=model)
    lean = through == "torch"  # with the kernel, the lean step would bypass the modules

    alone = []
    with torch.inference_mode():
        for version, prompt in zip(versions, prompts, strict=True):
            weights.apply(read.get(version))
            batch = DecodeBatch(model, pad_id=pad, device=loaded.device, lean=lean)
            logits = [batch.join([prompt], [version])]
            for _ in range(6):
                logits.append(batch.step(logits[-1].argmax(-1)))
            alone.append(torch.cat(logits))
        # the three prefilled on their own versions, then decoding together on merged v0002
        batch = DecodeBatch(model, pad_id=pad, device=loaded.device, lean=lean)
        first = []
        for version, prompt in zip(versions, prompts, strict=True):
            weights.apply(read.get(version))
            first.append(batch.join([prompt], [version]))
        assert weights.version == "v0002"
        together = [torch.cat(first)]
        for _ in range(6):
            with weights.mixed(versions, read):
                together.append(batch.step(together[-1].argmax(-1)))
        assert weights.mixing
        assert any("forward" in vars(module) for module in model.modules())
        corrected = sum("forward" in vars(module) for module in model.modules())
        assert len(passes) == (6 * corrected if through == "skinny" else 0)
        weights.unmix()  # the layers get their own forwards back
        assert not weights.mixing
        assert not any("forward" in vars(module) for module in model.modules())
    for row, expected in enumerate(alone):
        got = torch.stack([step[row] for step in together])
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    # and the versions really differ, so the correction is what made them equal
    assert (alone[0] - alone[1]).abs().max() > 1e-2 and (alone[0] - alone[2]).abs().max() > 1e-2


def test_bf16_rows_of_other_versions_are_corrected_inside_the_kernel_layer_step(
    bf16, adapters, library, monkeypatch
):
    """A bf16 model with the kernel: v0002 merged, rows on v0001 and on the base corrected in
    the layer step itself (the factors and masks in float32 beside the bf16 weights), so a
    swap does not send a bf16 step back to torch's ops. Each row decodes as it does alone on
    its own merged version, within what rounding the merged weights to bf16 moves (the
    versions themselves stand far further apart)."""
    from bot.engine import kernels

    model, pad = bf16.model, bf16.tokenizer.pad_token_id
    calls = record_layer_steps(  # whether a step's layer was corrected
        monkeypatch,
        lambda x, rest, where: rest[-1] is not None and any(c is not None for c in rest[-1]),
    )
    kernels.install(model, library=library)
    read = {v: read_adapter(adapters[v], version=v, base_model=model) for v in ("v0001", "v0002")}
    prompts = [prompt_ids(bf16, q) for q in QUESTIONS[:3]]
    versions = ["v0001", None, "v0002"]
    weights = MergedWeights(model=model, base_weights=base_weight_reader(bf16))
    try:
        with torch.inference_mode():
            alone = []
            for version, prompt in zip(versions, prompts, strict=True):
                weights.apply(read.get(version))
                batch = DecodeBatch(model, pad_id=pad, device="cpu")
                logits = [batch.join([prompt], [version])]
                for _ in range(6):
                    logits.append(batch.step(logits[-1].argmax(-1)))
                alone.append(torch.cat(logits).float())
            batch = DecodeBatch(model, pad_id=pad, device="cpu")
            first = []
            for version, prompt in zip(versions, prompts, strict=True):
                weights.apply(read.get(version))
                first.append(batch.join([prompt], [version]))
            calls.clear()
            together = [torch.cat(first)]
            for step in range(6):  # each row fed the tokens it chose alone: bf16's rounding
                # may tip a near tie the other way, and the rows must not drift apart on it
                tokens = torch.stack([logits[step].argmax(-1) for logits in alone])
                with weights.mixed(versions, read):
                    together.append(batch.step(tokens))
    finally:
        weights.apply(None)
        kernels.uninstall(model)
    layers = len(model.model.layers)
    assert calls == [True] * (6 * layers)  # every step's every layer corrected in the kernel
    apart = min((alone[0] - alone[i]).abs().max() for i in (1, 2))
    for row, expected in enumerate(alone):
        got = torch.stack([step[row] for step in together]).float()
        assert (got - expected).abs().max() < apart / 8


def test_a_mix_taken_out_is_put_back_for_the_same_versions_until_a_merge(loaded, adapters):
    """Between two admissions of the same versions the batch can empty (every row finishing
    at once): the correcting forwards taken out then are put back as they were, not rebuilt
    (here without the adapters, which a rebuild needs), the last two sets of versions kept;
    once another adapter is merged they are dropped."""
    model = loaded.model
    read = {v: read_adapter(adapters[v], version=v, base_model=model) for v in ("v0001", "v0002")}
    ids = torch.tensor([prompt_ids(loaded, q) for q in QUESTIONS[:1]] * 2)
    versions = ["v0001", None]
    weights = MergedWeights(model=model)

    def replaced() -> dict:  # the layers' per-instance (correcting) forwards, by name
        return {name: vars(m)["forward"] for name, m in model.named_modules()
                if "forward" in vars(m)}  # fmt: skip

    weights.apply(read["v0002"])
    with torch.inference_mode():
        with weights.mixed(versions, read):
            first = model(input_ids=ids).logits
        forwards = replaced()
        weights.unmix()
        assert not weights.mixing and not replaced()
        with weights.mixed(versions, {}):  # no adapter at hand: a rebuild would fail
            again = model(input_ids=ids).logits
        assert forwards and replaced() == forwards
        assert torch.equal(again, first)
        # the rows really were corrected: v0001's row and the base's differ from v0002's
        plain = model(input_ids=ids).logits  # outside a block: v0002, merged, for every row
        assert (first - plain).abs().amax(dim=(1, 2)).min() > 1e-2
        weights.unmix()
        # two sets of versions taking turns (swaps every few questions): both kept
        both = ["v0001", "v0001"]
        with weights.mixed(both, read):
            model(input_ids=ids)
        weights.unmix()
        for _ in range(2):
            with weights.mixed(versions, {}):
                assert torch.equal(model(input_ids=ids).logits, first)
            weights.unmix()
            with weights.mixed(both, {}):
                model(input_ids=ids)
            weights.unmix()
        with weights.mixed([None, None], read):  # a third set: the least recent is dropped
            model(input_ids=ids)
        weights.unmix()
        with pytest.raises(EngineError, match="not in memory"), weights.mixed(versions, {}):
            pass
        with weights.mixed(both, {}):
            model(input_ids=ids)
        weights.unmix()
        weights.apply(None)
        weights.apply(read["v0002"])  # the same version merged again: kept mixes dropped
        with pytest.raises(EngineError, match="not in memory"), weights.mixed(versions, {}):
            pass
        with weights.mixed(versions, read):
            assert torch.allclose(model(input_ids=ids).logits, first, atol=1e-4, rtol=1e-4)
        weights.unmix()
        weights.apply(None)


def test_questions_on_both_sides_of_a_swap_are_prefilled_together(loaded, adapters):
    """Three questions, a swap, three more, queued while the worker is busy: one prefill
    admits all six, each row on the version its place in the queue gives."""
    questions = QUESTIONS[:3]
    reference = {}
    for version in (None, "v0001"):
        with make_engine(loaded) as engine:
            engine.set_adapter(version, adapters.get(version)).result(timeout=WAIT)
            reference[version] = [engine.answer(q, timeout=WAIT).text for q in questions]
    with make_engine(loaded) as engine:
        gate = Gate()
        first = engine.submit(AnswerRequest(QUESTIONS[4], max_new_tokens=4), on_partial=gate)
        assert gate.entered.wait(WAIT)  # the worker waits inside the first answer's step
        before = [engine.submit(q) for q in questions]
        swap = engine.set_adapter("v0001", adapters["v0001"])
        after = [engine.submit(q) for q in questions]
        gate.release.set()
        first.result(timeout=WAIT)
        swap.result(timeout=WAIT)
        answered = [f.result(timeout=WAIT) for f in before + after]
        stats = engine.stats()
    assert stats["batches"] == 2  # the first question's prefill, then one for the six
    assert [(a.adapter_version, a.text) for a in answered] == [
        *((None, text) for text in reference[None]),
        *(("v0001", text) for text in reference["v0001"]),
    ]


def test_questions_queued_across_swaps_are_batched_by_version(loaded, adapters):
    """Two questions on each of v0001, v0002 and v0001 again, queued behind a busy worker: the
    first admission takes the oldest and the other two on its version, the next the two on
    v0002. Each batch is one version, merged for it as it is admitted: no step is corrected,
    every partial of an answer decodes on its own merged version, and each answer is that
    version's own. (In queue order, v0001 and v0002 would share the first batch.)"""
    questions = QUESTIONS[:2]
    request = {q: AnswerRequest(q, max_new_tokens=6) for q in questions}
    options = {"min_new_tokens": 6}  # every row decodes 6 steps, a stop token or not
    reference = {}
    for version in ("v0001", "v0002"):  # under the same options: a stop token is kept out of both
        with make_engine(loaded, generate_options=options) as engine:
            engine.set_adapter(version, adapters[version]).result(timeout=WAIT)
            reference[version] = [engine.answer(request[q], timeout=WAIT).text for q in questions]
    with make_engine(loaded, batch_size=4, generate_options=options) as engine:
        gate = Gate()
        first = engine.submit(AnswerRequest(QUESTIONS[4], max_new_tokens=1), on_partial=gate)
        assert gate.entered.wait(WAIT)  # the worker waits inside the first answer's prefill
        queued = []  # (version, question, future, the merged version at each partial)
        for version in ("v0001", "v0002", "v0001"):
            engine.set_adapter(version, adapters[version])
            for q in questions:
                merged = []
                partial = lambda text, merged=merged: merged.append(  # noqa: E731
                    engine.stats()["merged_version"]
                )
                queued.append((version, q, engine.submit(request[q], on_partial=partial), merged))
        gate.release.set()
        first.result(timeout=WAIT)
        answers = [(v, q, future.result(timeout=WAIT), merged) for v, q, future, merged in queued]
        stats = engine.stats()
    for version, q, answer, merged in answers:
        assert answer.adapter_version == version
        assert answer.text == reference[version][questions.index(q)]
        assert merged and set(merged) == {version}
    assert stats["corrected_steps"] == 0 and stats["batches"] == 3  # the first, v0001, v0002


@pytest.mark.parametrize("mixing", [True, False], ids=["mixed", "drained"])
def test_an_admission_takes_the_oldest_then_its_versions_then_any(mixing):
    from bot.engine.worker import choose_admissions

    def choose(waiting, room, decoding=()):
        return choose_admissions(waiting, room=room, decoding=list(decoding), mixing=mixing)

    assert choose([], room=4) == [] and choose(["v1"], room=0) == []
    waiting = ["v1", "v2", "v1", None, "v2", "v1"]
    if mixing:
        assert choose(waiting, room=3) == [0, 2, 5]  # the oldest, then on its version
        assert choose(waiting, room=4) == [0, 1, 2, 5]  # then the oldest of any
        assert choose(waiting, room=4, decoding=["v2"]) == [0, 1, 2, 4]  # v1 and v2 decode
        assert choose(waiting, room=2, decoding=[None]) == [0, 2]  # the oldest goes first
        assert choose(waiting, room=9) == list(range(6))
        assert choose(["v1"] * 5, room=3, decoding=["v2"]) == [0, 1, 2]  # one version: in order
    else:  # one version a batch: the oldest's, in order, stopping at another
        assert choose(waiting, room=3) == [0]
        assert choose(["v1", "v1", "v2", "v1"], room=4) == [0, 1]
        assert choose(["v1", "v1", "v1"], room=2) == [0, 1]
        assert choose(["v1", "v1"], room=4, decoding=["v1"]) == [0, 1]


def test_a_swap_is_merged_once_every_row_decodes_on_it(loaded, adapters):
    """Idle, a swap is merged at once. Busy, the new version is answered at once but merged
    only when the last row of the version before has finished: while both share the batch,
    the rows of the new one are the corrected ones."""
    import time

    with make_engine(loaded, generate_options={"min_new_tokens": 16}) as engine:
        engine.set_adapter("v0001", adapters["v0001"]).result(timeout=WAIT)
        assert engine.stats()["merged_version"] == "v0001"  # idle: merged at once
        gate, merged_beside = Gate(), []
        first = engine.submit(AnswerRequest(QUESTIONS[0], max_new_tokens=12), on_partial=gate)
        assert gate.entered.wait(WAIT)
        engine.set_adapter("v0002", adapters["v0002"])
        second = engine.submit(
            AnswerRequest(QUESTIONS[1], max_new_tokens=3),
            on_partial=lambda text: merged_beside.append(engine.stats()["merged_version"]),
        )
        gate.release.set()
        assert second.result(timeout=WAIT).adapter_version == "v0002"
        assert first.result(timeout=WAIT).adapter_version == "v0001"
        assert merged_beside and set(merged_beside) == {"v0001"}  # merged while its row ran
        deadline = time.monotonic() + WAIT
        while engine.stats()["merged_version"] != "v0002" and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
    assert stats["merged_version"] == "v0002" and stats["active_version"] == "v0002"
    assert stats["merges"] == 2 and stats["swaps"] == 2


@pytest.mark.parametrize("share", [0.0, 1e9], ids=["corrections-free", "corrections-dear"])
def test_rows_left_on_an_unmerged_version_are_merged_once_their_corrections_cost_a_merge(
    loaded, adapters, share
):
    """A merge stalls every row decoding, so rows left alone on the new version stay corrected
    until their corrections have cost as much as the last merge (timed at the idle swap
    before): corrections that cost nothing wait for the engine to empty; corrections dearer
    than any merge get it at the next step. The answer is that version's either way."""
    import time

    with make_engine(loaded, generate_options={"min_new_tokens": 12}) as engine:
        engine.set_adapter("v0001", adapters["v0001"]).result(timeout=WAIT)  # idle: merged
        engine.corrected_share = share
        merges = []  # (the version merged, whether the second answer was still decoding)
        apply = engine._weights.apply

        def apply_and_note(adapter):
            merges.append((adapter and adapter.version, not second.done()))
            apply(adapter)

        engine._weights.apply = apply_and_note
        gate = Gate()
        first = engine.submit(AnswerRequest(QUESTIONS[0], max_new_tokens=4), on_partial=gate)
        assert gate.entered.wait(WAIT)
        engine.set_adapter("v0002", adapters["v0002"])
        question = AnswerRequest(QUESTIONS[1], max_new_tokens=16)
        second = engine.submit(question)  # decodes beside the first, then alone
        gate.release.set()
        assert first.result(timeout=WAIT).adapter_version == "v0001"
        answer = second.result(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while engine.stats()["merged_version"] != "v0002" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["merged_version"] == "v0002"  # no row left: merged at once
        alone = engine.answer(question, timeout=WAIT)  # on the merged weights
        assert engine.stats()["merges"] == 2
        noted = list(merges)  # (the worker's exit takes the adapter out: not a swap's merge)
    assert answer.adapter_version == "v0002" and answer.text == alone.text
    # dear: merged while the row still decoded; free: corrected to its last token
    assert noted == [("v0002", bool(share))]


@pytest.mark.parametrize("mix_versions", [True, False], ids=["mixed", "drained"])
def test_swaps_under_load_never_split_or_lose_an_answer(loaded, adapters, mix_versions):
    """Forty questions with ten swaps among them: each answered once, by the version queued
    before it, with exactly the text that version gives alone (the rows of an old version
    decoding beside the new one, or the batch drained at each swap)."""
    versions = [None, "v0001", "v0002"]
    questions = QUESTIONS[:4]
    reference: dict = {}
    for version in versions:  # each version in an engine of its own: no swap behind the text
        with make_engine(loaded) as engine:
            engine.set_adapter(version, adapters.get(version)).result(timeout=WAIT)
            for q in questions:
                reference[version, q] = engine.answer(q, timeout=WAIT).text
    with make_engine(loaded, batch_size=4, mix_versions=mix_versions) as engine:
        futures, expected, swaps, version = [], [], [], None
        for index in range(40):
            if index % 4 == 3:
                version = versions[(index // 4) % 3]
                swaps.append(engine.set_adapter(version, adapters.get(version)))
            question = questions[index % len(questions)]
            futures.append(engine.submit(question))
            expected.append((version, question))
        results = [future.result(timeout=WAIT) for future in futures]
        for swap in swaps:
            swap.result(timeout=WAIT)
        stats = engine.stats()
    assert [(r.adapter_version, r.text) for r in results] == [
        (v, reference[v, q]) for v, q in expected
    ]
    assert stats["answered"] == 40 and stats["failed"] == 0 and stats["swaps"] == 10


def test_the_shared_prefix_cache_gives_the_logits_of_a_whole_prefill(loaded):
    prompts = [prompt_ids(loaded, q) for q in QUESTIONS[:4]]
    common = 0
    while all(p[common] == prompts[0][common] for p in prompts):
        common += 1
    pad = loaded.tokenizer.pad_token_id
    whole = DecodeBatch(loaded.model, pad_id=pad, device=loaded.device)
    cached = DecodeBatch(loaded.model, pad_id=pad, device=loaded.device)
    cached.set_prefix(prompts[0][: common - 1])
    odd = prompt_ids(loaded, QUESTIONS[4])[::-1]  # does not start with the prefix: prefilled whole
    with torch.inference_mode():
        expected = whole.join([*prompts, odd], list(range(5)))
        got = cached.join([*prompts, odd], list(range(5)))
        assert cached.rows == whole.rows == list(range(5))
        assert torch.allclose(got, expected, atol=1e-4)
        tokens = expected.argmax(-1)
        assert torch.allclose(cached.step(tokens), whole.step(tokens), atol=1e-4)
    assert cached._prefix_states is not None  # the four shared the cached prefix
