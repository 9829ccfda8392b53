"""The training set's rules, each on real rows in a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from bot.learning.dataset import (
    DatasetSplit,
    PreferencePair,
    Signal,
    TrainingSet,
    build_training_set,
    count_new_expert_verdicts,
    normalise_question,
    split,
    to_chat_jsonl,
)
from bot.learning.examples import Example
from bot.store import open_database, session_scope
from bot.store.models import Answer, ChannelSetting, Question, Verdict, utcnow

T0 = utcnow().replace(microsecond=0) - timedelta(days=1)


def at(minutes: float):
    return T0 + timedelta(minutes=minutes)


class Store:
    """Inserts questions, answers and verdicts as the Slack side would leave them."""

    def __init__(self, engine):
        self.engine = engine

    def answer(self, question, answer, *, channel_type="channel", channel_id="CPUBLIC", minute=0):
        with session_scope(self.engine) as session:
            q = Question(
                source="mention",
                channel_id=channel_id,
                channel_type=channel_type,
                user_id="UASKER",
                text=question,
                created_at=at(minute),
            )
            session.add(q)
            session.flush()
            a = Answer(question_id=q.id, text=answer, channel_id=channel_id, created_at=at(minute))
            session.add(a)
            session.flush()
            return a.id

    def verdict(self, answer_id, kind, *, author="UEXPERT", minute, text=None, withdrawn=None):
        with session_scope(self.engine) as session:
            v = Verdict(
                answer_id=answer_id,
                kind=kind,
                author_id=author,
                text=text,
                created_at=at(minute),
                withdrawn_at=None if withdrawn is None else at(withdrawn),
            )
            session.add(v)
            session.flush()
            return v.id

    def opt_in(self, channel_id):
        with session_scope(self.engine) as session:
            session.add(ChannelSetting(channel_id=channel_id, train_opt_in=True))

    def build(self, **kwargs) -> TrainingSet:
        with session_scope(self.engine) as session:
            return build_training_set(session=session, **kwargs)

    def count(self, since):
        with session_scope(self.engine) as session:
            return count_new_expert_verdicts(session=session, since=since)


@pytest.fixture
def store(database_url):
    engine = open_database(database_url)
    yield Store(engine)
    engine.dispose()


def test_an_approved_answer_is_an_example(store):
    answer = store.answer("<@UBOT> where is the VPN guide?", "In the wiki under IT/VPN.", minute=1)
    store.verdict(answer, "approve", minute=2)
    built = store.build()
    assert built.examples == [
        Example("where is the VPN guide?", "In the wiki under IT/VPN.", id=f"answer:{answer}")
    ]
    assert built.example_ids == [f"answer:{answer}"]
    assert built.preference_pairs == []
    assert built.excluded == {}


def test_a_correction_is_an_example_and_a_preference_pair(store):
    answer = store.answer("How long is the on-call shift?", "One day.", minute=1)
    store.verdict(answer, "correct", minute=2, text="One week, Monday to Monday.")
    built = store.build()
    assert [(e.question, e.answer) for e in built.examples] == [
        ("How long is the on-call shift?", "One week, Monday to Monday.")
    ]
    assert built.preference_pairs == [
        PreferencePair(
            prompt="How long is the on-call shift?",
            chosen="One week, Monday to Monday.",
            rejected="One day.",
            id=f"answer:{answer}",
        )
    ]


def test_a_rejected_answer_is_never_an_example(store):
    rejected = store.answer("Who approves expenses?", "The CEO, always.", minute=1)
    store.verdict(rejected, "reject", minute=2, text="wrong")
    kept = store.answer("Where are expense forms?", "In the finance drive.", minute=3)
    store.verdict(kept, "approve", minute=4)
    built = store.build()
    assert built.example_ids == [f"answer:{kept}"]
    assert built.excluded == {"rejected": 1}


def test_withdrawn_verdicts_drop_out(store):
    only_withdrawn = store.answer("Is Friday a release day?", "Yes.", minute=1)
    store.verdict(only_withdrawn, "approve", minute=2, withdrawn=3)
    # A withdrawn correction leaves the earlier approval standing.
    answer = store.answer("Which branch deploys?", "main", minute=4)
    store.verdict(answer, "approve", author="UEXPERT", minute=5)
    store.verdict(answer, "correct", author="UOTHER", minute=6, text="release/*", withdrawn=7)
    built = store.build()
    assert [(e.question, e.answer) for e in built.examples] == [("Which branch deploys?", "main")]
    assert built.preference_pairs == []
    assert built.excluded == {"withdrawn": 1}


def test_the_latest_expert_verdict_wins_across_experts(store):
    overruled = store.answer("What is our SLA?", "99%", minute=1)
    store.verdict(overruled, "approve", author="UALICE", minute=2)
    store.verdict(overruled, "reject", author="UBOB", minute=3)
    reinstated = store.answer("Who owns billing?", "Team Ledger.", minute=4)
    store.verdict(reinstated, "reject", author="UBOB", minute=5)
    store.verdict(reinstated, "approve", author="UALICE", minute=6)
    built = store.build()
    assert built.example_ids == [f"answer:{reinstated}"]
    assert built.excluded == {"rejected": 1}


def test_a_question_asked_twice_is_one_example_and_the_latest_verdict_wins(store):
    first = store.answer("How do I reset my password?", "Ask IT.", minute=1)
    second = store.answer("<@UBOT>  how do I RESET my password", "Use the SSO portal.", minute=10)
    store.verdict(second, "approve", minute=11)
    store.verdict(first, "correct", minute=12, text="Use id.example.com/reset.")
    built = store.build()
    assert [(e.id, e.answer) for e in built.examples] == [
        (f"answer:{first}", "Use id.example.com/reset.")
    ]
    assert built.excluded == {"superseded": 1}


def test_a_later_rejection_of_a_reasked_question_retires_the_old_approval(store):
    old = store.answer("What is the VPN host?", "vpn-old.example.com", minute=1)
    store.verdict(old, "approve", minute=2)
    new = store.answer("what is the vpn host?", "vpn-old.example.com", minute=20)
    store.verdict(new, "reject", minute=21, text="moved to vpn2")
    built = store.build()
    assert built.examples == []
    assert built.excluded == {"rejected": 1, "superseded": 1}


def test_thumbs_are_signals_not_examples(store):
    answer = store.answer("Where is the coffee?", "Kitchen, 2nd floor.", minute=1)
    store.verdict(answer, "up", author="U1", minute=2)
    store.verdict(answer, "up", author="U2", minute=3, withdrawn=4)
    store.verdict(answer, "down", author="U2", minute=5)  # U2 changed their mind
    store.verdict(answer, "up", author="U3", minute=6)
    built = store.build()
    assert built.examples == []
    assert built.signals == {f"answer:{answer}": Signal(up=2, down=1)}
    assert built.excluded == {}


@pytest.mark.parametrize("channel_type", ["group", "im", "mpim", None])
def test_private_channels_and_dms_stay_out_unless_they_opted_in(store, channel_type):
    hidden = store.answer(
        "Salary bands?", "See HR.", channel_type=channel_type, channel_id="GHIDDEN", minute=1
    )
    store.verdict(hidden, "approve", minute=2)
    store.verdict(hidden, "up", author="U1", minute=2)
    shared = store.answer(
        "Team offsite date?", "June 3.", channel_type=channel_type, channel_id="GSHARED", minute=3
    )
    store.verdict(shared, "approve", minute=4)
    store.opt_in("GSHARED")
    built = store.build()
    assert built.example_ids == [f"answer:{shared}"]
    assert built.excluded == {"private": 1}
    assert built.signals == {}


def test_everything_returned_is_scrubbed(store):
    answer = store.answer(
        "my token xoxb-2741069384-5829301746-Qm7tPZk2LwVbN8aRcYs3HdJf fails, mail me at a@b.io",
        "Rotate it; call +44 20 7946 0958.",
        minute=1,
    )
    store.verdict(answer, "correct", minute=2, text="Rotate it and set password=Tr0ub4dor&3.")
    built = store.build()
    (example,) = built.examples
    (pair,) = built.preference_pairs
    assert example.question == "my token [SLACK_TOKEN] fails, mail me at [EMAIL]"
    assert example.answer == "Rotate it and set password=[PASSWORD]."
    assert pair.rejected == "Rotate it; call [PHONE]."
    dumped = json.dumps([built.examples, built.preference_pairs], default=vars)
    for secret in ("xoxb-", "a@b.io", "7946", "Tr0ub4dor"):
        assert secret not in dumped


def test_now_fixes_the_snapshot(store):
    answer = store.answer("Who signs NDAs?", "Legal.", minute=1)
    store.verdict(answer, "approve", minute=2, withdrawn=10)
    late = store.answer("Who orders laptops?", "IT.", minute=3)
    store.verdict(late, "approve", minute=8)
    as_of_5 = store.build(now=at(5))
    assert as_of_5.example_ids == [f"answer:{answer}"]  # the withdrawal came later
    assert store.build().example_ids == [f"answer:{late}"]
    assert store.build(now=at(5)).dataset_hash == as_of_5.dataset_hash


def test_count_new_expert_verdicts_for_the_threshold(store):
    public = store.answer("q1", "a1", minute=1)
    private = store.answer("q2", "a2", channel_type="im", channel_id="DPRIV", minute=1)
    store.verdict(public, "approve", minute=2)
    store.verdict(public, "reject", author="UOTHER", minute=6)
    store.verdict(public, "correct", author="UTHIRD", minute=7, text="x", withdrawn=8)
    store.verdict(public, "up", author="U1", minute=7)
    store.verdict(private, "approve", minute=7)
    assert store.count(None) == 2
    assert store.count(at(5)) == 1
    assert store.count(at(6)) == 0
    store.opt_in("DPRIV")
    assert store.count(at(5)) == 2


def test_dataset_hash_and_lineage_follow_the_content(store):
    first = store.answer("Build command?", "make build", minute=1)
    store.verdict(first, "approve", minute=2)
    before = store.build()
    assert before.dataset_hash == store.build().dataset_hash
    second = store.answer("Test command?", "make test", minute=3)
    store.verdict(second, "approve", minute=4)
    after = store.build()
    assert after.dataset_hash != before.dataset_hash
    assert after.example_ids == [f"answer:{first}", f"answer:{second}"]


def _examples(n, start=0):
    return [
        Example(f"question number {i}?", f"answer {i}", id=f"answer:{i}") for i in range(start, n)
    ]


def test_split_is_by_question_not_by_order():
    examples = _examples(40)
    forward = split(TrainingSet(examples, [], {}))
    backward = split(TrainingSet(list(reversed(examples)), [], {}))
    assert {e.id for e in forward.eval} == {e.id for e in backward.eval}
    assert forward.eval and forward.train
    assert {e.id for e in forward.train} | {e.id for e in forward.eval} == {e.id for e in examples}
    # More data never moves an old example across the line.
    grown = split(TrainingSet(_examples(80), [], {}))
    assert {e.id for e in forward.eval} <= {e.id for e in grown.eval}
    assert {e.id for e in forward.train} <= {e.id for e in grown.train}
    # Rewording only in case and spacing keeps the side: the key is the normalised question.
    loud = [Example(e.question.upper() + "  ", e.answer, id=e.id) for e in examples]
    assert {e.id for e in split(TrainingSet(loud, [], {})).eval} == {e.id for e in forward.eval}


def test_split_holds_out_at_least_one_from_five():
    assert len(split(TrainingSet(_examples(5), [], {})).eval) >= 1
    assert split(TrainingSet(_examples(4), [], {})) == DatasetSplit(train=_examples(4), eval=[])


def test_chat_jsonl_lines():
    lines = list(to_chat_jsonl([Example("Q?", "A — ok", id="answer:7")]))
    assert [json.loads(line) for line in lines] == [
        {
            "messages": [
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A — ok"},
            ],
            "id": "answer:7",
        }
    ]
    assert "\n" not in lines[0]


def test_normalise_question():
    assert normalise_question("<@U1> How do I  deploy?") == normalise_question("how do i deploy")
    assert normalise_question("How do I deploy?") != normalise_question("How do I test?")


def _cli():
    import typer

    from bot.cli import learning_commands

    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is called by its name
    learning_commands.register(app)
    return app


def test_export_writes_scrubbed_chat_jsonl_and_reports_on_stderr(store, database_url, tmp_path):
    from typer.testing import CliRunner

    ids = []
    for i in range(6):
        answer = store.answer(f"How do I run job {i}? mail ops@acme.io", f"run job{i}", minute=i)
        store.verdict(answer, "approve", minute=i + 0.5)
        ids.append(f"answer:{answer}")
    private = store.answer("secret plan?", "x", channel_type="group", channel_id="G1", minute=9)
    store.verdict(private, "approve", minute=10)

    runner = CliRunner()
    result = runner.invoke(_cli(), ["export", "--database-url", database_url])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["id"] for row in rows] == ids
    assert all("ops@acme.io" not in line for line in result.stdout.splitlines())
    assert rows[0]["messages"][0] == {"role": "user", "content": "How do I run job 0? mail [EMAIL]"}
    assert "exported 6 examples" in result.stderr and "private 1" in result.stderr

    out = tmp_path / "eval.jsonl"
    result = runner.invoke(
        _cli(), ["export", "--database-url", database_url, "--split", "eval", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    held_out = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    train = runner.invoke(_cli(), ["export", "--database-url", database_url, "--split", "train"])
    trained = [json.loads(line)["id"] for line in train.stdout.splitlines()]
    assert len(held_out) >= 1 and set(held_out).isdisjoint(trained)
    assert sorted(held_out + trained) == sorted(ids)


def test_export_says_what_is_wrong_with_a_bad_split(sqlite_url):
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli(), ["export", "--database-url", sqlite_url, "--split", "test"])
    assert result.exit_code != 0
    assert "train" in result.output and "eval" in result.output
