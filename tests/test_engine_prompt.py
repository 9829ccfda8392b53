"""Prompt building and fitting the budget, on the tiny model's real ChatML tokenizer."""

from __future__ import annotations

import re

import pytest

from bot.engine.prompt import build_messages, encode_prompt
from bot.engine.types import AnswerRequest, EngineError, Note, Turn

SYSTEM = "You are a test assistant."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def decoded(tokenizer, prompt) -> str:
    return tokenizer.decode(prompt.input_ids)


def test_messages_put_notes_in_the_system_message_and_the_question_last():
    request = AnswerRequest(
        question="  When do we deploy?  ",
        history=(Turn("user", "hi"), Turn("assistant", "hello")),
        notes=(Note("Deploy day?", "Tuesday at noon.", source="approved by @alice"),),
    )
    messages = build_messages(request, system_prompt=SYSTEM)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith(SYSTEM)
    assert "Team notes" in system
    assert "Deploy day?" in system and "Tuesday at noon." in system and "@alice" in system
    assert messages[1]["content"] == "hi" and messages[2]["content"] == "hello"
    assert messages[-1]["content"] == "When do we deploy?"


def test_no_notes_means_no_notes_heading():
    messages = build_messages(AnswerRequest(question="q?"), system_prompt=SYSTEM)
    assert messages[0]["content"] == SYSTEM
    assert "Team notes" not in messages[0]["content"]


def test_a_prompt_within_budget_is_the_chat_template_untouched(tokenizer):
    request = AnswerRequest(
        question="When do we deploy?",
        history=(Turn("user", "hi"), Turn("assistant", "hello")),
        notes=(Note("Deploy day?", "Tuesday."),),
    )
    prompt = encode_prompt(tokenizer, request, system_prompt=SYSTEM, max_input_tokens=1024)
    expected = tokenizer.apply_chat_template(
        build_messages(request, system_prompt=SYSTEM), add_generation_prompt=True, tokenize=False
    )
    assert decoded(tokenizer, prompt) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert not prompt.truncated
    assert prompt.notes_used == request.notes
    assert prompt.history_used == 2


@pytest.mark.parametrize("question", ["", "   ", "\n\t "])
def test_an_empty_question_is_refused_with_what_to_do(tokenizer, question):
    with pytest.raises(EngineError, match="the question is empty: type a question after"):
        encode_prompt(
            tokenizer, AnswerRequest(question=question), system_prompt=SYSTEM, max_input_tokens=256
        )


def test_history_goes_first_oldest_turn_first(tokenizer):
    history = tuple(
        Turn("user" if i % 2 == 0 else "assistant", f"turn-{i} " + "words " * 20) for i in range(10)
    )
    note = Note("Deploy day?", "Tuesday.")
    request = AnswerRequest(question="And now?", history=history, notes=(note,))
    full = encode_prompt(tokenizer, request, system_prompt=SYSTEM, max_input_tokens=100_000)
    budget = len(full.input_ids) // 2
    prompt = encode_prompt(tokenizer, request, system_prompt=SYSTEM, max_input_tokens=budget)
    text = decoded(tokenizer, prompt)
    assert len(prompt.input_ids) <= budget
    assert prompt.truncated
    assert 0 < prompt.history_used < len(history)
    kept = [f"turn-{i} " in text for i in range(10)]
    # the newest turns survive, the oldest go: kept is False…False, True…True
    assert kept == [False] * (10 - prompt.history_used) + [True] * prompt.history_used
    assert prompt.notes_used == (note,) and "Tuesday." in text
    assert "And now?" in text


def test_notes_go_after_the_history_lowest_ranked_first(tokenizer):
    notes = tuple(Note(f"question {i}?", f"note-{i} " + "fact " * 30) for i in range(6))
    request = AnswerRequest(
        question="What is the fact?", history=(Turn("user", "old-turn"),), notes=notes
    )
    full = encode_prompt(tokenizer, request, system_prompt=SYSTEM, max_input_tokens=100_000)
    budget = len(full.input_ids) // 2
    prompt = encode_prompt(tokenizer, request, system_prompt=SYSTEM, max_input_tokens=budget)
    text = decoded(tokenizer, prompt)
    assert len(prompt.input_ids) <= budget
    assert prompt.truncated and prompt.history_used == 0 and "old-turn" not in text
    assert 0 < len(prompt.notes_used) < len(notes)
    assert prompt.notes_used == notes[: len(prompt.notes_used)]
    assert all((f"note-{i} " in text) == (i < len(prompt.notes_used)) for i in range(6))
    assert "What is the fact?" in text


def test_a_40000_character_question_is_cut_with_a_visible_note(tokenizer):
    head, tail = "HEAD-MARKER start of the paste. ", " END-MARKER what does it mean?"
    question = head + "log line 12345 ERROR something failed\n" * 1100 + tail
    question = question[: 40_000 - len(tail)] + tail
    assert len(question) == 40_000
    request = AnswerRequest(
        question=question, history=(Turn("user", "earlier"),), notes=(Note("q", "a"),)
    )
    prompt = encode_prompt(tokenizer, request, system_prompt=SYSTEM, max_input_tokens=300)
    text = decoded(tokenizer, prompt)
    assert len(prompt.input_ids) <= 300
    assert prompt.truncated and prompt.history_used == 0 and prompt.notes_used == ()
    match = re.search(r"\[question truncated to fit: (\d+) of (\d+) characters kept\]", text)
    assert match, text
    kept, total = int(match.group(1)), int(match.group(2))
    assert total == 40_000 and 0 < kept < total
    assert "HEAD-MARKER" in text and "END-MARKER what does it mean?" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("budget", [64, 97, 150, 333, 1000])
def test_the_budget_always_holds_for_unicode_and_odd_spacing(tokenizer, budget):
    question = ("Ünïcødé ✓ 日本語 " + "  \t spaced  out " * 3 + "emoji 🙂🙃 ") * 400
    request = AnswerRequest(
        question=question,
        history=(Turn("user", "x " * 500), Turn("assistant", "y " * 500)),
        notes=(Note("n?", "z " * 500),),
    )
    prompt = encode_prompt(tokenizer, request, system_prompt=SYSTEM, max_input_tokens=budget)
    text = decoded(tokenizer, prompt)
    assert len(prompt.input_ids) <= budget
    assert prompt.truncated
    assert "…" in text and text.split("user\n", 1)[1].startswith("Ün")
    # the tiny tokenizer spends ~1 token a character: under ~120 tokens the note itself won't fit
    assert ("[question truncated to fit:" in text) == (budget >= 150)


def test_a_system_prompt_that_fills_the_budget_is_a_configuration_error(tokenizer):
    with pytest.raises(EngineError, match="APPRENTICE_MAX_INPUT_TOKENS"):
        encode_prompt(
            tokenizer,
            AnswerRequest(question="hello " * 100),
            system_prompt="very long system prompt " * 50,
            max_input_tokens=40,
        )
