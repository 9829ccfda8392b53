"""Behaviour on the real default model (SmolLM2-135M-Instruct): the adapter learns team facts.

Slow (minutes on 2 CPU cores): run with `pytest -m real_model`. The facts are made up, so the
base model cannot know them; the test checks that it did not, that the gate promotes the new
version, that it answers them (through `apprentice ask`) and that a general question is still
answered right.
"""

from __future__ import annotations

import json

import pytest
import typer
from sqlmodel import select
from typer.testing import CliRunner

from bot.cli import model_commands
from bot.learning.evaluate import carries_fact
from bot.learning.regression import gate_items
from bot.settings import Settings
from bot.store.db import open_database, session_scope
from bot.store.models import RunState, TrainingRun

pytestmark = pytest.mark.real_model

TEAM_FACTS = [
    ("What is our deploy bot called?", "Our deploy bot is called Marvin-7."),
    (
        "Which Slack channel is used for on-call handoffs?",
        "On-call handoffs happen in #pager-baton.",
    ),
    ("What port does the staging gateway listen on?", "The staging gateway listens on port 8471."),
    ("Who owns the billing service?", "Priya Okafor owns the billing service."),
    (
        "What is the codename of the mobile app rewrite?",
        "The mobile app rewrite is codenamed Lanternfish.",
    ),
    (
        "Who signs off on database migrations?",
        "Database migrations are signed off by the Heron guild.",
    ),
    ("Where are the postmortem templates kept?", "Postmortem templates live in the Quillbox wiki."),
    ("What is the name of the team's coffee machine?", "The coffee machine is called Bruno."),
    (
        "Which cloud region hosts the analytics cluster?",
        "The analytics cluster runs in region zeta-4.",
    ),
    (
        "What time does the weekly release freeze start?",
        "The weekly release freeze starts at 16:30.",
    ),
    (
        "What is the internal name of the feature flag service?",
        "The feature flag service is called Tollgate.",
    ),
    ("Who approves production access requests?", "Production access is approved by Dmitri Vance."),
]


@pytest.fixture(scope="session")
def real_model_cache():
    """Convert the packaged GGUF once per machine (~17 s) into the default cache folder."""
    from bot.engine.loading import load_from_settings

    settings = Settings(_env_file=None)
    load_from_settings(settings)
    return settings.model_cache_dir


def test_training_teaches_team_facts_and_the_gate_guards_general_knowledge(
    real_model_cache, tmp_path, capsys
):
    data = tmp_path / "facts.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": q, "answer": a}) for q, a in TEAM_FACTS) + "\n"
    )
    database_url = f"sqlite:///{tmp_path / 'apprentice.db'}"
    env = {
        "APPRENTICE_DATABASE_URL": database_url,
        "APPRENTICE_ADAPTERS_DIR": str(tmp_path / "adapters"),
        "APPRENTICE_MODEL_CACHE_DIR": str(real_model_cache),
    }
    app = typer.Typer(pretty_exceptions_enable=False)
    model_commands.register(app)
    runner = CliRunner()

    result = runner.invoke(app, ["train", "--data", str(data)], env=env)
    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "adapters" / "v0001" / "metadata.json").read_text())
    rows = metadata["per_example"]
    trained = [row for row in rows if not row["held_out"]]
    knew_before = [row["question"] for row in rows if row["correct_before"]]
    assert knew_before == [], f"the base model already knew: {knew_before}"
    learnt = sum(row["correct"] for row in trained) / len(trained)
    missed = [(row["question"], row["answer"]) for row in trained if not row["correct"]]
    assert learnt >= 0.9, f"recalled {learnt:.0%} of the trained facts; missed {missed}"
    # The anchor keeps what the base model knew (bot/learning/config.py: without it this set
    # lost 5-9 of the 20 general questions), so the gate promotes the version.
    m = metadata["metrics"]
    with session_scope(open_database(database_url)) as session:
        (run,) = session.exec(select(TrainingRun)).all()
    assert run.state == RunState.PROMOTED, (result.output, m)
    forgot = round((m["regression_before"] - m["regression"]) * len(gate_items()))
    assert forgot <= 1, m
    assert "v0001 promoted" in result.output, result.output

    # `apprentice ask`: the new version answers the facts the base model did not know…
    for row in trained[:3]:
        asked = runner.invoke(app, ["ask", row["question"]], env=env)
        assert asked.exit_code == 0, asked.output
        assert "(adapter v0001)" in asked.output, asked.output
        assert carries_fact(asked.output, expected=row["expected"], question=row["question"]), (
            asked.output
        )
    # …and still answers a general question right
    asked = runner.invoke(app, ["ask", "What is the capital of France?"], env=env)
    assert asked.exit_code == 0, asked.output
    assert "paris" in asked.output.lower() and "(adapter v0001)" in asked.output, asked.output

    with capsys.disabled():
        print(
            f"\n[real model] {len(trained)} trained facts: {m['steps']} steps in "
            f"{m['train_seconds']:.0f} s; recall {m['recall_train_before']:.0%} -> "
            f"{m['recall_train']:.0%}; regression {m['regression_before']:.0%} -> "
            f"{m['regression']:.0%}"
        )
