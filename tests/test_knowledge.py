"""The knowledge base with a real database (SQLite and PostgreSQL) and the real MiniLM embedder."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from itertools import count

import numpy as np
import pytest

from bot.knowledge import (
    KnowledgeBase,
    SentenceEmbedder,
    as_notes,
    citation,
    current_entries,
    load_embedder,
    normalise_question,
)
from bot.store import open_database, session_scope
from bot.store.models import Answer, Question, Verdict

NOV_20 = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)
VPN_FACT = "File a ticket in #it-help; your manager approves it and access arrives within a day."


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


class CountingEmbedder:
    """The real embedder, recording every text it was asked to encode."""

    def __init__(self, inner):
        self.inner = inner
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts.extend(texts)
        return self.inner.encode(texts)


class Team:
    """Writes questions, answers and verdicts the way the Slack side does, with explicit times."""

    def __init__(self, engine):
        self.engine = engine
        self._ts = count(1)

    def answered(self, question, answer="Ask in #it-help.", *, channel="CPUBLIC", type="channel"):
        ts = f"1700000000.{next(self._ts):06d}"
        with session_scope(self.engine) as session:
            q = Question(
                source="mention",
                text=question,
                channel_id=channel,
                channel_type=type,
                user_id="UASKER",
                message_ts=ts,
            )
            session.add(q)
            session.flush()
            a = Answer(question_id=q.id, text=answer, channel_id=channel, message_ts=ts + "1")
            session.add(a)
            session.flush()
            return a.id

    def verdict(self, answer_id, kind, *, by="UALICE", text=None, at=NOV_20):
        with session_scope(self.engine) as session:
            v = Verdict(answer_id=answer_id, kind=kind, author_id=by, text=text, created_at=at)
            session.add(v)
            session.flush()
            return v.id

    def withdraw(self, verdict_id):
        with session_scope(self.engine) as session:
            v = session.get(Verdict, verdict_id)
            v.withdrawn_at = datetime.now(UTC)
            session.add(v)


@pytest.fixture
def team(database_url):
    return Team(open_database(database_url))


def test_a_correction_answers_a_reworded_question_with_a_citation(team, embedder):
    answer = team.answered("How do I get VPN access?", "Just connect, it is open to everyone.")
    team.verdict(answer, "correct", by="UALICE", text=VPN_FACT)
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    kb.refresh()

    hits = kb.search("what's the way to request access to the VPN?", channel_id="COTHER")

    assert [hit.entry.id for hit in hits] == [f"answer:{answer}"]
    entry = hits[0].entry
    assert (entry.kind, entry.answer, entry.expert_id) == ("corrected", VPN_FACT, "UALICE")
    assert hits[0].score >= kb.threshold
    [note] = as_notes(hits)
    assert note.question == "How do I get VPN access?"
    assert note.answer == VPN_FACT
    assert note.source == "corrected by <@UALICE> on 2026-11-20"
    link = "https://team.slack.com/archives/CPUBLIC/p1700000000000001"
    assert citation(entry, link) == (
        f"from an answer corrected by <@UALICE> on 2026-11-20 (<{link}|thread>)"
    )
    assert citation(entry) == "from an answer corrected by <@UALICE> on 2026-11-20"
    assert (entry.channel_id, entry.thread_ts) == ("CPUBLIC", "1700000000.000001")


def test_unrelated_and_neighbouring_questions_get_nothing(sqlite_url, embedder):
    team = Team(open_database(sqlite_url))
    team.verdict(team.answered("How do I get VPN access?"), "correct", text=VPN_FACT)
    team.verdict(team.answered("Where do I file expense reports?", "In Expensify."), "approve")
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    kb.refresh()

    for question in (
        "What is the capital of France?",
        "Why is the build red on main?",
        "How do I get access to the staging database?",
    ):
        assert kb.search(question, channel_id="CPUBLIC") == [], question
        assert kb.exact_match(question, channel_id="CPUBLIC") is None, question
    # ...while each stored question is still found by a rewording.
    assert kb.search("who do I ask to get on the vpn", channel_id="CPUBLIC")
    assert kb.search("how can I submit my expenses?", channel_id="CPUBLIC")


def test_private_entries_stay_in_their_own_conversation(team, embedder):
    private = team.answered("How do I get VPN access?", channel="GSECRET", type="group")
    team.verdict(private, "correct", text=VPN_FACT)
    dm = team.answered("What is the wifi password?", "hunter2", channel="DALICE", type="im")
    team.verdict(dm, "approve")
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    kb.refresh()
    asked = "what's the way to request access to the VPN?"

    assert [h.entry.id for h in kb.search(asked, channel_id="GSECRET")] == [f"answer:{private}"]
    assert kb.exact_match("How do I get VPN access?", channel_id="GSECRET") is not None
    for elsewhere in ("CPUBLIC", "GOTHER", "DALICE", None):
        assert kb.search(asked, channel_id=elsewhere) == []
        assert kb.exact_match("How do I get VPN access?", channel_id=elsewhere) is None
    assert kb.exact_match("what is the wifi password", channel_id="DALICE").answer == "hunter2"
    assert kb.search("what's the wi-fi password?", channel_id="DBOB") == []


def test_withdrawn_verdicts_leave_and_earlier_ones_come_back(team, embedder):
    answer = team.answered("How do I get VPN access?", "Ask IT for a token.")
    approval = team.verdict(answer, "approve", by="UALICE", at=NOV_20)
    correction = team.verdict(
        answer, "correct", by="UBOB", text=VPN_FACT, at=NOV_20 + timedelta(hours=1)
    )
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    kb.refresh()
    assert [(e.kind, e.answer) for e in kb.entries] == [("corrected", VPN_FACT)]

    team.withdraw(correction)
    report = kb.refresh()
    assert not report.skipped
    assert [(e.kind, e.answer, e.expert_id) for e in kb.entries] == [
        ("approved", "Ask IT for a token.", "UALICE")
    ]

    team.withdraw(approval)
    report = kb.refresh()
    assert (report.entries, report.dropped) == (0, 1)
    assert kb.search("How do I get VPN access?", channel_id="CPUBLIC") == []
    assert kb.exact_match("How do I get VPN access?", channel_id="CPUBLIC") is None


def test_a_later_reject_removes_the_entry(team, embedder):
    answer = team.answered("How do I get VPN access?")
    team.verdict(answer, "correct", text=VPN_FACT, at=NOV_20)
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    kb.refresh()
    assert kb.search("how do I get vpn access", channel_id="CPUBLIC")

    team.verdict(answer, "reject", by="UBOB", at=NOV_20 + timedelta(minutes=5))
    kb.refresh()
    assert kb.entries == ()
    assert kb.search("how do I get vpn access", channel_id="CPUBLIC") == []


def test_a_later_reject_of_the_same_question_retires_an_older_approval(team, embedder):
    older = team.answered("How do I get VPN access?", "Ask Bob, he has the tokens.")
    newer = team.answered("how do I get vpn access", "Ask Bob.", channel="CHELP")
    elsewhere = team.answered(
        "How do I get VPN access?", "Ask Carol.", channel="GOPS", type="group"
    )
    team.verdict(older, "approve", at=NOV_20)
    team.verdict(elsewhere, "approve", at=NOV_20)
    team.verdict(newer, "reject", by="UBOB", at=NOV_20 + timedelta(days=30))
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    kb.refresh()

    # Bob left: the stale approval is not served in public; the private channel keeps its own.
    assert [e.id for e in kb.entries] == [f"answer:{elsewhere}"]
    assert kb.exact_match("How do I get VPN access?", channel_id="CGENERAL") is None


def test_soft_votes_and_unfinished_answers_make_no_entry(team):
    team.verdict(team.answered("Who is on call?"), "up", by="UANYONE")
    pending = team.answered("When is payday?", "")
    team.verdict(pending, "approve")
    with session_scope(team.engine) as session:
        assert current_entries(session=session) == []


def test_the_latest_verdict_wins_per_question_within_a_scope(team, embedder):
    old = team.answered("How do I get VPN access?", "Ask IT.", channel="CGENERAL")
    new = team.answered("how do I get VPN access", "Ask Bob.", channel="CHELP")
    mine = team.answered("How do I get VPN access??", "Ask Carol.", channel="GOPS", type="group")
    stale = team.answered("How do I get VPN access", "Ask Dave.", channel="GDEV", type="group")
    team.verdict(old, "approve", at=NOV_20)
    team.verdict(stale, "approve", at=NOV_20 + timedelta(hours=1))
    team.verdict(new, "correct", text=VPN_FACT, at=NOV_20 + timedelta(days=1))
    team.verdict(mine, "approve", at=NOV_20 + timedelta(days=2))
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    kb.refresh()

    # One public entry (the later correction) and each private channel's own.
    assert sorted(e.id for e in kb.entries) == [f"answer:{i}" for i in sorted([new, mine, stale])]
    asked = "what's the way to request access to the VPN?"
    [public_hit] = kb.search(asked, channel_id="CRANDOM")
    assert public_hit.entry.answer == VPN_FACT
    # In a private channel both are visible; the notes hold only the latest, never both.
    [own_hit] = kb.search(asked, channel_id="GOPS")
    assert own_hit.entry.answer == "Ask Carol."
    [newer_public_hit] = kb.search(asked, channel_id="GDEV")
    assert newer_public_hit.entry.answer == VPN_FACT
    assert kb.exact_match("HOW DO I GET VPN ACCESS", channel_id="GOPS").answer == "Ask Carol."


def test_exact_match_needs_the_same_question_not_a_similar_one(sqlite_url, embedder):
    team = Team(open_database(sqlite_url))
    deploy = team.answered("How do I deploy to production?", "Run `make ship` from main.")
    team.verdict(deploy, "approve")
    sla = team.answered("What's the SLA for P1 incidents?", "15 minutes to respond.")
    team.verdict(sla, "approve")
    # A low bar, so that only the guard on numbers tells P1 from P2.
    kb = KnowledgeBase(db=team.engine, embedder=embedder, exact_threshold=0.85)
    kb.refresh()

    assert kb.exact_match("  how do I deploy to production ", channel_id="C1").id == (
        f"answer:{deploy}"
    )
    assert kb.exact_match("<@UBOT> How can I deploy to production?", channel_id="C1") is not None
    assert kb.exact_match("What's the SLA for P2 incidents?", channel_id="C1") is None
    assert kb.search("What's the SLA for P2 incidents?", channel_id="C1")  # a note, not the answer

    strict = KnowledgeBase(db=team.engine, embedder=embedder)
    strict.refresh()
    assert (
        strict.exact_match("what are the steps to ship a release to prod?", channel_id="C1") is None
    )
    assert strict.exact_match("How do I deploy to production?", channel_id="C1") is not None


def test_refresh_embeds_only_new_question_texts(sqlite_url, embedder):
    team = Team(open_database(sqlite_url))
    vpn = team.answered("How do I get VPN access?")
    team.verdict(vpn, "approve")
    team.verdict(team.answered("Where do I file expense reports?"), "approve")
    counting = CountingEmbedder(embedder)
    kb = KnowledgeBase(db=team.engine, embedder=counting)

    first = kb.refresh()
    assert (first.entries, first.embedded) == (2, 2)
    assert sorted(counting.texts) == [
        "How do I get VPN access?",
        "Where do I file expense reports?",
    ]

    assert kb.refresh().skipped
    assert kb.refresh(force=True).embedded == 0

    team.verdict(team.answered("Who is on call this week?"), "approve")
    team.verdict(vpn, "correct", by="UBOB", text=VPN_FACT, at=NOV_20 + timedelta(hours=1))
    counting.texts.clear()
    report = kb.refresh()
    assert (report.entries, report.embedded, report.skipped) == (3, 1, False)
    assert counting.texts == ["Who is on call this week?"]
    # The correction replaced the text without re-embedding the unchanged question.
    assert kb.exact_match("How do I get VPN access?", channel_id="C1").answer == VPN_FACT


def test_searches_during_refreshes_from_many_threads(sqlite_url, embedder):
    team = Team(open_database(sqlite_url))
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    errors: list[BaseException] = []
    done = threading.Event()
    asked = "where do I file expense report number 9?"

    def searcher():
        try:
            while not done.is_set():
                for hit in kb.search(asked, channel_id="CPUBLIC"):
                    assert hit.entry.visible_in("CPUBLIC")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for number in range(8):
            team.verdict(
                team.answered(f"Where do I file expense report number {number}?"), "approve"
            )
            refreshers = [threading.Thread(target=kb.refresh) for _ in range(2)]
            for thread in refreshers:
                thread.start()
            for thread in refreshers:
                thread.join()
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(kb) == 8
    assert len(kb.search(asked, channel_id="CPUBLIC", k=10)) == 8


def test_background_refresh_picks_up_a_new_verdict(sqlite_url, embedder):
    team = Team(open_database(sqlite_url))
    kb = KnowledgeBase(db=team.engine, embedder=embedder)
    stop = kb.refresh_in_background(every_s=0.05)
    try:
        team.verdict(team.answered("How do I get VPN access?"), "correct", text=VPN_FACT)
        for _ in range(200):  # polls; the bound only keeps a broken refresher from hanging
            if kb.exact_match("how do I get VPN access", channel_id="C1") is not None:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the background refresh never picked up the new correction")
    finally:
        stop.set()


def test_embedder_vectors_are_unit_length_and_cached(embedder):
    calls, threads = [], []

    class Recording:
        def __init__(self, model):
            self.model = model

        def encode(self, texts, **kwargs):
            calls.append(list(texts))
            threads.append(threading.current_thread())
            return self.model.encode(texts, **kwargs)

        def get_sentence_embedding_dimension(self):
            return self.model.get_sentence_embedding_dimension()

    wrapped = SentenceEmbedder(Recording(embedder._model), cache_size=2)
    first = wrapped.encode(["a question", "another one", "a question"])
    again = wrapped.encode(["another one"])
    assert first.shape == (3, 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first[1], again[0])
    assert calls == [["a question", "another one"]]
    wrapped.encode(["third"])  # the cap of two evicts the least recently used, "a question"
    wrapped.encode(["another one", "a question"])
    assert calls[1:] == [["third"], ["a question"]]
    # each encode ran on a thread of its own that has ended (torch's OpenMP helpers go with it)
    assert len({id(t) for t in threads}) == len(threads) == 3
    assert threading.current_thread() not in threads
    assert not any(t.is_alive() for t in threads)


def test_normalised_questions_ignore_case_spacing_mentions_and_punctuation():
    assert normalise_question("<@UBOT>  How do I get   VPN access??") == "how do i get vpn access"
    assert normalise_question("What’s new in Python 3.11?") == "what's new in python 3.11"
    assert normalise_question("see <https://x.example/a|the docs>!") == "see the docs"
