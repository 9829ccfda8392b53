"""The forgetting guards on the tiny model: the cached replay answers and the recall stop."""

from __future__ import annotations

import json

import pytest

from bot.learning.examples import Example
from bot.learning.regression import gate_items, general_examples, mix_items


@pytest.fixture
def tiny_loaded(tiny_model_dir, tmp_path):
    from bot.engine.loading import load_base_model

    return load_base_model(str(tiny_model_dir), device="cpu", cache_dir=tmp_path / "cache")


def test_replay_bank_is_checked_and_never_a_gate_question():
    mix = mix_items()
    assert len(mix) >= 60
    assert all(item.keywords for item in mix)  # only right base answers become targets
    assert len({item.question for item in mix}) == len(mix)
    assert not {i.question for i in mix} & {i.question for i in gate_items()}


def test_general_examples_drop_wrong_answers_and_keep_the_first_fact_sentence():
    mix = mix_items()[:2]
    answers = [f"It is {mix[0].keywords[0]}. More.", "I am not sure."]
    assert general_examples(answers, mix, limit=5) == [
        Example(mix[0].question, f"It is {mix[0].keywords[0]}.", id="general:0")
    ]


def test_replay_examples_ask_the_base_once_then_read_the_cache(tiny_loaded, tmp_path):
    from bot.engine.worker import AnswerEngine
    from bot.learning.regression import replay_cache_file, replay_examples

    engine = AnswerEngine(
        tiny_loaded, system_prompt="Be brief.", max_input_tokens=128, max_new_tokens=4, batch_size=4
    ).start()
    try:
        first = replay_examples(engine, limit=3, cache_dir=tmp_path)
        asked = engine.stats()["answered"]
        # the tiny model's answers are nonsense: every one is dropped, so it topped up to the end
        assert first == [] and asked == len(mix_items())
        cached = json.loads(replay_cache_file(engine, tmp_path).read_text())
        assert set(cached) == {item.question for item in mix_items()}
        assert replay_examples(engine, limit=3, cache_dir=tmp_path) == []
        assert engine.stats()["answered"] == asked  # all from the cache
        assert replay_examples(engine, limit=0, cache_dir=tmp_path / "other") == []
    finally:
        engine.stop()


def test_replay_examples_use_cached_right_answers(tiny_loaded, tmp_path):
    from bot.engine.worker import AnswerEngine
    from bot.learning.regression import replay_cache_file, replay_examples

    engine = AnswerEngine(
        tiny_loaded, system_prompt="Be brief.", max_input_tokens=128, max_new_tokens=4, batch_size=4
    )  # never started: answering anything would fail
    mix = mix_items()
    answers = {item.question: f"It is {item.keywords[0]}. Then noise." for item in mix}
    answers[mix[0].question] = "No idea."
    path = replay_cache_file(engine, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(answers))
    examples = replay_examples(engine, limit=2, cache_dir=tmp_path)
    assert [e.question for e in examples] == [mix[1].question, mix[2].question]
    assert examples[0].answer == f"It is {mix[1].keywords[0]}."


def test_greedy_recall_is_what_greedy_decoding_would_say(tiny_loaded):
    import torch

    from bot.learning.trainer import IGNORE_INDEX, _greedy_recall

    model = tiny_loaded.model
    prompt = [1, 5, 9, 20, 7]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):  # the model's own greedy continuation
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    right = {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]}
    changed = ids[:-1] + [(ids[-1] + 1) % model.config.vocab_size]
    wrong = {"input_ids": changed, "labels": [IGNORE_INDEX] * len(prompt) + changed[len(prompt) :]}
    short = {"input_ids": ids[:-2], "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt) : -2]}
    assert _greedy_recall(model, [right], pad_id=0) == 1.0
    assert _greedy_recall(model, [wrong], pad_id=0) == 0.0
    assert _greedy_recall(model, [right, wrong, short], pad_id=0) == pytest.approx(2 / 3)
    assert not model.training


def _anchor_rows(loaded, examples):
    from bot.learning.trainer import build_training_rows

    return build_training_rows(
        loaded.tokenizer, examples, system_prompt="Be brief.", max_input_tokens=256, max_length=256
    )


ANCHORS = [
    Example("What is the capital of France?", "The capital of France is Paris."),
    Example("How many days are in a week?", "There are seven days in a week."),
    Example("What colour is the sky?", "The sky is blue on a clear day."),
    Example("How many legs does a spider have?", "A spider has eight legs."),
]


def _kl_on(loaded, adapter_dir, rows) -> float:
    """KL(base || base + the saved adapter) on `rows`' answer tokens."""
    import torch
    from peft import PeftModel

    from bot.learning.pipeline import remove_lora_layers
    from bot.learning.trainer import _padded, anchor_kl

    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    try:
        model.eval()
        ids, mask, labels = _padded(rows, pad_id=0, device="cpu")
        with torch.no_grad():
            return float(anchor_kl(model, ids, mask, labels))
    finally:
        remove_lora_layers(loaded.model)


def test_anchor_kl_is_zero_for_an_untrained_adapter_and_positive_once_it_moves(tiny_loaded):
    import torch
    from peft import LoraConfig, get_peft_model

    from bot.learning.pipeline import remove_lora_layers
    from bot.learning.trainer import _padded, anchor_kl

    rows = _anchor_rows(tiny_loaded, ANCHORS)
    model = get_peft_model(tiny_loaded.model, LoraConfig(r=4, target_modules="all-linear"))
    try:
        model.eval()
        ids, mask, labels = _padded(rows, pad_id=0, device="cpu")
        with torch.no_grad():
            assert float(anchor_kl(model, ids, mask, labels)) == pytest.approx(0.0, abs=1e-6)
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.add_(0.05)  # LoRA's B starts at zero: move it
            assert float(anchor_kl(model, ids, mask, labels)) > 1e-3
    finally:
        remove_lora_layers(tiny_loaded.model)


def test_training_with_the_anchor_stays_closer_to_the_base_model(tiny_loaded, tmp_path):
    from bot.learning.config import TrainingConfig
    from bot.learning.trainer import train_lora

    facts = [Example(f"What is code {i}?", f"Code {i} is zeta-{i * 7}.") for i in range(6)]
    rows = _anchor_rows(tiny_loaded, ANCHORS)
    kl, outputs = {}, {}
    for weight in (0.0, 10.0):
        config = TrainingConfig(
            max_steps=20,
            learning_rate=5e-3,
            recall_check_steps=0,
            early_stopping_patience=0,
            general_mix=0,
            anchor_weight=weight,
            anchor_batch_size=2,
        )
        out = train_lora(
            loaded=tiny_loaded,
            train=facts,
            held_out=[],
            config=config,
            out_dir=tmp_path / f"w{weight}",
            progress=False,
            anchors=ANCHORS,
            system_prompt="Be brief.",
            max_input_tokens=256,
        )
        outputs[weight] = out
        kl[weight] = _kl_on(tiny_loaded, out.adapter_dir, rows)
    assert outputs[0.0].extras["anchor_kl"] == [] and outputs[0.0].extras["anchor_rows"] == 0
    history = outputs[10.0].extras["anchor_kl"]
    assert outputs[10.0].extras["anchor_rows"] == len(ANCHORS)
    assert [row["step"] for row in history] == list(range(1, 21))
    assert history[0]["anchor_kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero
    assert kl[10.0] < kl[0.0] / 2, kl
