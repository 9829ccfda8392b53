"""Training: examples, scoring, the regression set, the trainer and the pipeline (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import select

from bot.learning.config import TrainingConfig
from bot.learning.evaluate import carries_fact, has_keyword, key_terms
from bot.learning.examples import (
    DataError,
    Example,
    dataset_hash,
    deduplicate,
    load_examples_jsonl,
    split_examples,
)
from bot.learning.regression import (
    first_sentences,
    gate_items,
    general_examples,
    mix_items,
    regression_score,
)
from bot.store.db import open_database, session_scope
from bot.store.models import AdapterActivation, AdapterVersion, RunState, TrainingRun

# examples


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


def test_load_examples_jsonl_reads_rows_and_skips_blank_and_comment_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "facts.jsonl",
        [
            "# team facts",
            {"question": " Who owns billing? ", "answer": "Priya owns it.", "id": 7},
            "",
            {"question": "Which port?", "answer": "8471"},
        ],
    )
    examples = load_examples_jsonl(path)
    assert examples == [
        Example("Who owns billing?", "Priya owns it.", "7"),
        Example("Which port?", "8471", None),
    ]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"question": "a", "answer": "b"}', "{not json"], "line 2: not valid JSON"),
        ([{"question": "a"}], 'line 1: missing "answer"'),
        ([{"question": "  ", "answer": "b"}], 'line 1: "question" must be a non-empty string'),
        (['["a", "b"]'], "line 1: expected a JSON object"),
        (["", "# nothing"], "no examples found"),
    ],
)
def test_load_examples_jsonl_says_which_line_is_wrong(tmp_path, lines, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as caught:
        load_examples_jsonl(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_load_examples_jsonl_missing_folder_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        load_examples_jsonl(tmp_path)
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples_jsonl(binary)


def test_dataset_hash_ignores_order_and_whitespace_but_not_content():
    a = [Example("Q one?", "A1"), Example("Q two?", "A2")]
    assert dataset_hash(a) == dataset_hash(list(reversed(a)))
    assert dataset_hash(a) == dataset_hash([Example("q  ONE?", "A1 "), Example("Q two?", "A2")])
    assert dataset_hash(a) != dataset_hash([Example("Q one?", "A1"), Example("Q two?", "A3")])


def test_deduplicate_keeps_the_latest_answer_to_a_question():
    rows = [Example("Which port?", "80"), Example("Other?", "x"), Example("which  port?", "8471")]
    assert deduplicate(rows) == [Example("Other?", "x"), Example("which  port?", "8471")]


def test_split_is_deterministic_independent_of_order_and_stable_as_data_grows():
    examples = [Example(f"Question number {i}?", f"Answer {i}") for i in range(40)]
    train, held = split_examples(examples, eval_fraction=0.25, seed=1)
    assert held and len(train) + len(held) == 40
    again_train, again_held = split_examples(list(reversed(examples)), eval_fraction=0.25, seed=1)
    assert {e.question for e in again_held} == {e.question for e in held}
    grown = examples + [Example(f"Later question {i}?", "x") for i in range(40)]
    grown_train, grown_held = split_examples(grown, eval_fraction=0.25, seed=1)
    # each example keeps its side as the data grows: trained ones never become evaluation ones
    assert {e.question for e in held} <= {e.question for e in grown_held}
    assert {e.question for e in train} <= {e.question for e in grown_train}
    assert 8 <= len(grown_held) <= 32  # about a quarter of 80
    _, other_seed = split_examples(examples, eval_fraction=0.25, seed=2)
    assert {e.question for e in other_seed} != {e.question for e in held}


def test_split_small_sets():
    few = [Example(f"Q{i}?", "A") for i in range(3)]
    assert split_examples(few, eval_fraction=0.2, seed=1, min_eval_examples=5) == (few, [])
    train, held = split_examples(few, eval_fraction=0.2, seed=1)
    assert len(held) == 1 and len(train) == 2
    train, held = split_examples(few[:2], eval_fraction=0.9, seed=1)
    assert len(train) == 1 and len(held) == 1  # never the whole training set
    with pytest.raises(ValueError):
        split_examples(few, eval_fraction=1.0, seed=1)


def test_training_config_round_trips_and_documents_every_field():
    config = TrainingConfig(max_steps=33, learning_rate=1e-4)
    assert TrainingConfig.from_dict({**config.to_dict(), "from_the_future": 1}) == config
    assert all(text for text in TrainingConfig.help().values())
    assert (config.r, config.lora_alpha, config.target_modules) == (8, 16, "all-linear")


def test_steps_scale_with_the_data_within_bounds():
    config = TrainingConfig()
    assert config.steps_for(4) == config.min_steps
    assert config.steps_for(40) > config.steps_for(24) >= config.min_steps
    assert config.steps_for(100_000) == config.max_steps_cap
    assert TrainingConfig(max_steps=7).steps_for(1000) == 7


# scoring


@pytest.mark.parametrize(
    ("expected", "question", "answer", "right"),
    [
        (
            "Our deploy bot is called Marvin-7.",
            "What is our deploy bot called?",
            "It is Marvin-7.",
            True,
        ),
        (
            "Our deploy bot is called Marvin-7.",
            "What is our deploy bot called?",
            "It is Marvin.",
            False,
        ),
        ("The staging gateway listens on port 8471.", "Which port?", "Port 8471, always.", True),
        ("The staging gateway listens on port 8471.", "Which port?", "Port 8080.", False),
        (
            "Handoffs happen in #pager-baton.",
            "Where are handoffs?",
            "Use the pager-baton channel",
            True,
        ),
        ("The capital of France is Paris.", "What is the capital of France?", "paris", True),
        (
            "The capital of France is Paris.",
            "What is the capital of France?",
            "The capital of France is Lyon.",
            False,
        ),
        ("A week has seven days.", "How many days are in a week?", "There are 7 days.", True),
        (
            "Deploys are frozen during quarterly audits.",
            "When are deploys frozen?",
            "During the quarterly audit.",
            True,
        ),
        ("Yes.", "Is the VPN required?", "Yes, it is.", True),
        ("Yes.", "Is the VPN required?", "No.", False),
    ],
)
def test_carries_fact(expected, question, answer, right):
    assert carries_fact(answer, expected=expected, question=question) is right


def test_key_terms_drop_what_the_question_already_says():
    terms = key_terms("Priya Okafor owns the billing service.", "Who owns the billing service?")
    assert "billing" not in terms.all and "okafor" in terms.all
    assert key_terms("Retro is at 16:30 on Thursday.").exact == ("16:30",)


def test_has_keyword_matches_whole_words_and_number_words():
    assert has_keyword("Water freezes at 0°C.", ["0", "32"])
    assert not has_keyword("It is 10 degrees.", ["0"])
    assert has_keyword("A spider has 8 legs.", ["eight"])
    assert has_keyword("It boils at approximately 100.0 degrees.", ["100"])
    assert has_keyword("Plants absorb carbon dioxide.", ["carbon dioxide"])
    assert not has_keyword("Carbon is an element.", ["carbon dioxide"])


def test_regression_set_and_score():
    gate, mix = gate_items(), mix_items()
    assert len(gate) >= 15 and len(mix) >= 8
    assert not {i.question for i in gate} & {i.question for i in mix}  # the gate is never trained
    france = next(i for i in gate if "France" in i.question)
    answers = ["I do not know."] * len(gate)
    assert regression_score(answers) == 0.0
    answers[gate.index(france)] = "The capital of France is Paris."
    assert regression_score(answers) == pytest.approx(1 / len(gate))
    with pytest.raises(ValueError):
        regression_score(["too few"])


def test_general_examples_keep_right_answers_cut_after_the_fact():
    mix = mix_items()[:3]
    answers = [
        f"The answer is {mix[0].keywords[0].title()}. Then some rambling that is wrong.",
        "No idea at all.",
        f"{mix[2].keywords[0]}",
    ]
    examples = general_examples(answers, mix, limit=5)
    assert [e.question for e in examples] == [mix[0].question, mix[2].question]
    assert examples[0].answer == f"The answer is {mix[0].keywords[0].title()}."
    assert len(general_examples(answers, mix, limit=1)) == 1
    assert first_sentences("No keyword here. None.", ["paris"]) == "No keyword here. None."


# the trainer (tiny model)


@pytest.fixture
def tiny_loaded(tiny_model_dir, tmp_path):
    from bot.engine.loading import load_base_model

    return load_base_model(str(tiny_model_dir), device="cpu", cache_dir=tmp_path / "cache")


def test_training_rows_use_the_engines_prompt_and_train_only_the_answer(tiny_loaded):
    from bot.engine.prompt import encode_prompt
    from bot.engine.types import AnswerRequest
    from bot.learning.trainer import IGNORE_INDEX, build_training_rows

    tokenizer = tiny_loaded.tokenizer
    rows = build_training_rows(
        tokenizer,
        [Example("Which port?", "Port 8471.")],
        system_prompt="Be brief.",
        max_input_tokens=256,
        max_length=512,
    )
    prompt = encode_prompt(
        tokenizer, AnswerRequest("Which port?"), system_prompt="Be brief.", max_input_tokens=256
    ).input_ids
    row = rows[0]
    assert row["input_ids"][: len(prompt)] == prompt
    assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = tokenizer.decode(row["labels"][len(prompt) :])
    assert answer.startswith("Port 8471.") and "<|im_end|>" in answer


def test_train_lora_saves_an_adapter_and_leaves_the_base_model_as_it_was(tiny_loaded, tmp_path):
    import torch

    from bot.adapter_store.files import validate_adapter_folder
    from bot.learning.trainer import train_lora

    probe = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        before = tiny_loaded.model(probe).logits.clone()
    examples = [Example(f"What is fact {i}?", f"Fact {i} is {i * 7}.") for i in range(8)]
    config = TrainingConfig(max_steps=6, eval_steps=2, min_steps=2, early_stopping_patience=0)
    out = train_lora(
        loaded=tiny_loaded,
        train=examples[:6],
        held_out=examples[6:],
        config=config,
        out_dir=tmp_path / "adapter",
        progress=False,
        general=[Example("What is the capital of France?", "Paris.")],
    )
    assert out.steps == 6 and out.train_rows == 7
    validate_adapter_folder(out.adapter_dir)
    assert (out.adapter_dir / "loss.png").stat().st_size > 1000
    assert not (out.adapter_dir / "README.md").exists()
    assert [row["step"] for row in out.loss_history if "loss" in row] == list(range(1, 7))
    evals = [row for row in out.loss_history if "eval_loss" in row]
    assert [row["step"] for row in evals] == [0, 2, 4, 6]
    assert out.initial_eval_loss == evals[0]["eval_loss"]
    kept = next(row for row in evals if row["step"] == out.best_step)
    assert out.best_eval_loss == kept["eval_loss"]
    assert kept["eval_loss"] <= min(row["eval_loss"] for row in evals) * 1.3
    # the base model is untouched: no LoRA layers, same outputs, eval mode
    assert not any("lora" in name for name, _ in tiny_loaded.model.named_modules())
    assert not tiny_loaded.model.training
    with torch.no_grad():
        assert torch.equal(tiny_loaded.model(probe).logits, before)


def test_early_stopping_keeps_the_last_acceptable_weights(tiny_loaded):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerControl, TrainerState

    from bot.learning.pipeline import remove_lora_layers
    from bot.learning.trainer import _callbacks

    _, keeper_class = _callbacks()
    model = get_peft_model(tiny_loaded.model, LoraConfig(r=8, target_modules="all-linear"))
    try:
        keeper = keeper_class(model=model, min_steps=20, patience=2, tolerance=0.3)
        state, control = TrainerState(), TrainerControl()
        lora = next(p for n, p in model.named_parameters() if "lora_B" in n)

        def evaluate(step, loss):
            state.global_step = step
            with torch.no_grad():
                lora.fill_(step)  # weights that tell the steps apart
            keeper.on_evaluate(None, state, control, metrics={"eval_loss": loss})

        evaluate(10, 1.0)  # before min_steps: only sets the reference
        evaluate(20, 1.2)  # within 30 % of the lowest: kept
        evaluate(30, 1.25)  # still fine: kept (the facts are being learnt)
        assert (keeper.kept_step, control.should_training_stop) == (30, False)
        evaluate(40, 1.5)  # too far above: a miss
        assert not control.should_training_stop
        evaluate(50, 2.0)  # a second miss in a row: stop
        assert control.should_training_stop and keeper.stopped_early
        keeper.restore()
        assert torch.all(lora == 30)
    finally:
        remove_lora_layers(tiny_loaded.model)


def test_train_lora_refuses_empty_training_data(tiny_loaded, tmp_path):
    from bot.learning.trainer import TrainingError, train_lora

    with pytest.raises(TrainingError, match="no training examples"):
        train_lora(
            loaded=tiny_loaded, train=[], held_out=[], config=TrainingConfig(), out_dir=tmp_path
        )


# the pipeline (tiny model)


FACTS = [
    Example(f"What is the code for room {i}?", f"Room {i} uses code {i}{i}.") for i in range(6)
]


def test_pipeline_publishes_a_refused_version_when_nothing_was_learnt(make_settings, tiny_loaded):
    from bot.learning.pipeline import train_new_version

    settings = make_settings()
    report = train_new_version(
        settings=settings,
        examples=FACTS,
        loaded=tiny_loaded,
        progress=False,
        config=TrainingConfig(max_steps=2, eval_steps=1),
    )
    # a randomly initialised model learns nothing in 2 steps: the gate must refuse
    assert report.version == "v0001" and not report.promoted
    assert any("did not improve" in reason for reason in report.reasons)
    folder = settings.adapters_dir / "v0001"
    metadata = json.loads((folder / "metadata.json").read_text())
    for key in (
        "base_model",
        "training_config",
        "dataset_hash",
        "example_count",
        "example_ids",
        "metrics",
        "created_at",
        "loss_history",
    ):
        assert key in metadata, key
    assert metadata["example_count"] == len(FACTS)
    assert metadata["dataset_hash"] == dataset_hash(FACTS)
    assert metadata["training_config"]["max_steps"] == 2
    assert metadata["gate"]["passed"] is False
    assert (folder / "loss.png").exists()
    db = open_database(settings.database_url)
    with session_scope(db) as session:
        run = session.get(TrainingRun, report.run_id)
        assert run.state == RunState.REFUSED and run.version == "v0001"
        assert run.finished_at is not None and run.error is None
        assert len(run.example_ids) == len(FACTS)
        assert session.get(AdapterVersion, "v0001").example_count == len(FACTS)
        assert session.exec(select(AdapterActivation)).all() == []  # nothing was activated


def test_pipeline_promotes_a_version_that_learnt(make_settings, tiny_loaded):
    from bot.adapter_store import AdapterRegistry
    from bot.learning.pipeline import train_new_version

    settings = make_settings(max_new_tokens=16)
    # A high learning rate lets even the tiny random model memorise one short answer.
    facts = [Example("Room code?", "The code is 5")]
    config = TrainingConfig(
        max_steps=60, learning_rate=1e-2, general_mix=0, eval_fraction=0.0, min_steps=1
    )
    report = train_new_version(
        settings=settings, examples=facts, loaded=tiny_loaded, progress=False, config=config
    )
    assert report.metrics["recall"] > report.metrics["recall_before"], report.per_example
    assert report.promoted, report.reasons
    db = open_database(settings.database_url)
    registry = AdapterRegistry(db=db, root=settings.adapters_dir)
    assert registry.active_version() == report.version
    with session_scope(db) as session:
        assert session.get(TrainingRun, report.run_id).state == RunState.PROMOTED


def test_pipeline_failure_marks_the_run_failed_and_keeps_the_active_version(
    make_settings, tiny_loaded, tmp_path
):
    from bot.learning.pipeline import train_new_version
    from bot.learning.trainer import TrainingError

    settings = make_settings()
    with pytest.raises(TrainingError, match="longer than max_length"):
        train_new_version(
            settings=settings,
            examples=FACTS,
            loaded=tiny_loaded,
            progress=False,
            config=TrainingConfig(max_steps=2, max_length=8),
        )
    db = open_database(settings.database_url)
    with session_scope(db) as session:
        (run,) = session.exec(select(TrainingRun)).all()
        assert run.state == RunState.FAILED and "max_length" in run.error
        assert run.finished_at is not None
        assert session.exec(select(AdapterVersion)).all() == []
        assert session.exec(select(AdapterActivation)).all() == []
    assert not settings.adapters_dir.exists() or not any(settings.adapters_dir.iterdir())
    assert not any("lora" in name for name, _ in tiny_loaded.model.named_modules())


def test_pipeline_refuses_empty_examples(make_settings):
    from bot.learning.pipeline import train_new_version

    with pytest.raises(DataError):
        train_new_version(settings=make_settings(), examples=[], progress=False)


def test_the_report_names_the_general_questions_a_refused_version_forgot():
    from bot.learning.cycle import CycleOutcome
    from bot.learning.report import format_report

    metrics = {
        "recall_before": 0.0,
        "recall": 1.0,
        "recall_train_before": 0.0,
        "recall_train": 1.0,
        "regression_before": 1.0,
        "regression": 0.9,
        "regression_lost": ["How many continents are there?", "What is 2 plus 2?"],
        "steps": 80,
        "train_seconds": 100,
    }
    outcome = CycleOutcome(run_id=3, trigger="verdicts", state="refused", metrics=metrics)
    text = json.dumps(format_report(outcome)[1], ensure_ascii=False)
    assert "adapters promote None" not in text  # no version was published: nothing to promote
    assert "100% → 90% (forgot: How many continents are there?; What is 2 plus 2?)" in text
    outcome.metrics = {**metrics, "regression": 1.0, "regression_lost": []}
    assert "forgot" not in json.dumps(format_report(outcome)[1])
