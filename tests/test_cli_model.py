"""`apprentice ask | train | adapters …` through Typer's CliRunner, then the database rows."""

from __future__ import annotations

import json

import pytest
import typer
from sqlmodel import select
from typer.testing import CliRunner

from bot.cli import model_commands
from bot.store.db import open_database, session_scope
from bot.store.models import AdapterActivation, AdapterVersion, RunState, TrainingRun


@pytest.fixture
def cli(tmp_path, tiny_model_dir, sqlite_url):
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    model_commands.register(app)
    runner = CliRunner()
    env = {
        "APPRENTICE_DATABASE_URL": sqlite_url,
        "APPRENTICE_ADAPTERS_DIR": str(tmp_path / "adapters"),
        "APPRENTICE_MODEL_CACHE_DIR": str(tmp_path / "model-cache"),
        "APPRENTICE_BASE_MODEL": str(tiny_model_dir),
        "APPRENTICE_DEVICE": "cpu",
        "APPRENTICE_MAX_NEW_TOKENS": "6",
    }

    def invoke(*args, **extra_env):
        return runner.invoke(app, list(args), env={**env, **extra_env})

    invoke.db = lambda: open_database(sqlite_url)
    invoke.adapters = tmp_path / "adapters"
    return invoke


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [
        {"question": f"What is the code for room {i}?", "answer": f"Code {i}{i}."} for i in range(6)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_ask_answers_with_the_base_model(cli):
    result = cli("ask", "Which port does staging use?")
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("(base model)")


def test_ask_refuses_an_empty_question_and_an_unknown_model(cli, tmp_path):
    assert_user_error(cli("ask", "   "), "the question is empty")
    assert_user_error(
        cli("ask", "hello?", APPRENTICE_BASE_MODEL=str(tmp_path / "no-such-model")),
        "APPRENTICE_BASE_MODEL",
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "no such file"),
        ('{"question": "a"}\n', 'line 1: missing "answer"'),
        ('{"question": "a", "answer": "b"}\nnot json\n', "line 2: not valid JSON"),
        ("\n\n", "no examples found"),
    ],
)
def test_train_refuses_bad_data_files(cli, tmp_path, content, fragment):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    assert_user_error(cli("train", "--data", str(path)), fragment)
    with session_scope(cli.db()) as session:
        assert session.exec(select(TrainingRun)).all() == []


def test_train_adapters_and_ask_end_to_end(cli, facts_file):
    result = cli("train", "--data", str(facts_file), "--max-steps", "2")
    assert result.exit_code == 0, result.output
    # nonsense model, 2 steps: the gate refuses, but the version is kept as history
    assert "v0001 not promoted" in result.output
    assert "fact recall did not improve" in result.output
    with session_scope(cli.db()) as session:
        (run,) = session.exec(select(TrainingRun)).all()
        assert (run.trigger, run.state, run.version) == ("cli", RunState.REFUSED, "v0001")
        assert run.metrics["steps"] == 2
        assert session.get(AdapterVersion, "v0001").example_count == 6

    listing = cli("adapters", "list")
    assert listing.exit_code == 0 and "v0001" in listing.output
    assert "refused by the gate" in listing.output and "base model serves alone" in listing.output

    promoted = cli("adapters", "promote", "v0001", "--reason", "trying it")
    assert promoted.exit_code == 0, promoted.output
    asked = cli("ask", "What is the code for room 1?")
    assert asked.exit_code == 0, asked.output
    assert asked.output.rstrip().endswith("(adapter v0001)")
    assert "* v0001" in cli("adapters", "list").output

    rolled = cli("adapters", "rollback")
    assert rolled.exit_code == 0 and "base model" in rolled.output
    assert_user_error(cli("adapters", "rollback"), "nothing to roll back")
    with session_scope(cli.db()) as session:
        rows = session.exec(select(AdapterActivation)).all()
        assert [(r.action, r.version) for r in rows] == [("promote", "v0001"), ("rollback", None)]
        assert rows[0].reason == "trying it" and rows[0].actor.startswith("cli")


def test_no_promote_publishes_without_activating(cli, facts_file):
    result = cli("train", "--data", str(facts_file), "--max-steps", "1", "--no-promote")
    assert result.exit_code == 0, result.output
    with session_scope(cli.db()) as session:
        assert session.exec(select(AdapterActivation)).all() == []
        assert session.get(AdapterVersion, "v0001") is not None


def test_promoting_unknown_or_corrupt_versions_fails_and_keeps_the_active_one(cli, facts_file):
    assert cli("train", "--data", str(facts_file), "--max-steps", "1").exit_code == 0
    assert cli("train", "--data", str(facts_file), "--max-steps", "1").exit_code == 0
    assert cli("adapters", "promote", "v0001").exit_code == 0
    assert_user_error(cli("adapters", "promote", "v0099"), "no adapter version 'v0099'")
    (cli.adapters / "v0002" / "adapter_config.json").write_text("{ broken")
    assert_user_error(cli("adapters", "promote", "v0002"), "refusing to promote v0002")
    # a corrupt active version: ask says what to do instead of crashing
    (cli.adapters / "v0001" / "adapter_model.safetensors").write_bytes(b"garbage")
    assert_user_error(cli("ask", "hello?"), "v0001 does not load", "rollback")
    with session_scope(cli.db()) as session:
        rows = session.exec(select(AdapterActivation)).all()
        assert [(r.action, r.version) for r in rows] == [("promote", "v0001")]
