"""How far brute-force retrieval goes: search and refresh time against the answer budget.

    python bench/retrieval_scale.py                  # 100 / 1k / 10k / 50k entries, SQLite
    python bench/retrieval_scale.py --calibrate      # the similarity threshold table first
    python bench/retrieval_scale.py --database-url postgresql://postgres@127.0.0.1:5432/bench

What is real and what is not:
- The database is real: every size gets its own database (a SQLite file by default) filled
  with questions, answers and expert verdicts (a fifth of them in 50 private channels), and
  `KnowledgeBase.refresh()` / `search()` run unchanged against it.
- The vectors for the scale part are NOT MiniLM's: embedding 50k sentences at ~200/s would take
  minutes, and search time depends on the matrix shape, not on the numbers in it. A hash-seeded
  random unit vector (384 dimensions) stands in for each question. MiniLM's real cost is measured
  on its own (one query, and the throughput for a first full embedding) and reported beside.
- Questions are random sentences built from word lists, all distinct after normalisation.

Each time is also given as a share of the answer budget (default 1 s of generation), the number
that decides whether retrieval can sit on the answer path.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.knowledge import KnowledgeBase, load_embedder  # noqa: E402
from bot.store import open_database  # noqa: E402
from bot.store.models import Answer, Question, Verdict  # noqa: E402

DIMENSIONS = 384
SIZES = (100, 1_000, 10_000, 50_000)

OPENERS = ["How do I", "Where can I", "Who can help me", "What is the way to",
           "Can someone explain how to", "Is there a guide to", "What's the process to",
           "When should I"]  # fmt: skip
VERBS = ["request", "reset", "deploy", "rotate", "configure", "renew", "debug", "install", "book",
         "approve", "migrate", "monitor", "restart", "export", "archive", "share", "review",
         "upgrade", "backup", "audit"]  # fmt: skip
ADJECTIVES = ["staging", "production", "shared", "legacy", "new", "internal", "regional",
              "nightly", "customer", "billing", "analytics", "mobile", "partner", "test",
              "sandbox", "finance", "security", "support", "design", "marketing"]  # fmt: skip
NOUNS = ["VPN profile", "database", "dashboard", "API key", "laptop", "build server", "cluster",
         "report", "certificate", "service account", "wiki page", "expense claim", "meeting room",
         "feature flag", "on-call rota", "Slack channel", "SSO login", "backup job", "DNS record",
         "parking pass", "license", "repository", "pipeline", "queue", "cron job", "bucket",
         "firewall rule", "invoice", "contract", "roadmap"]  # fmt: skip
PLACES = ["in Berlin", "for my team", "on Fridays", "before a release", "after hours",
          "for a contractor", "in the EU region", "for the audit", "on my phone", "this quarter",
          "for a new hire", "during an incident", "from home", "in AWS", "in GCP", "for QA",
          "for the demo", "next week", "without admin rights", "for a customer"]  # fmt: skip


def synthetic_questions(n: int, *, seed: int = 7) -> list[str]:
    combos = len(OPENERS) * len(VERBS) * len(ADJECTIVES) * len(NOUNS) * len(PLACES)
    picks = random.Random(seed).sample(range(combos), n)
    questions = []
    for pick in picks:
        parts = []
        for words in (OPENERS, VERBS, ADJECTIVES, NOUNS, PLACES):
            pick, index = divmod(pick, len(words))
            parts.append(words[index])
        opener, verb, adjective, noun, place = parts
        questions.append(f"{opener} {verb} the {adjective} {noun} {place}?")
    return questions


class RandomUnitEmbedder:
    """A stand-in for MiniLM: a random unit vector seeded by the text's hash (see the docstring)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += len(texts)
        rows = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
            rows[row] = np.random.default_rng(seed).standard_normal(DIMENSIONS)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fill(engine, questions: list[str], *, start_id: int = 1) -> None:
    """Questions, answers and approve/correct verdicts in bulk, one row each."""
    now = datetime(2026, 11, 20, tzinfo=UTC)
    q_rows, a_rows, v_rows = [], [], []
    for offset, text in enumerate(questions):
        ident = start_id + offset
        private = ident % 5 == 0
        channel = f"G{ident % 50:04d}" if private else "CGENERAL"
        at = now + timedelta(seconds=ident)
        q_rows.append(
            dict(id=ident, source="mention", text=text, channel_id=channel,
                 channel_type="group" if private else "channel", message_ts=f"{ident}.000100",
                 created_at=at)
        )  # fmt: skip
        a_rows.append(
            dict(id=ident, question_id=ident, text=f"Answer {ident}.", channel_id=channel,
                 message_ts=f"{ident}.000200", state="done", truncated=False, created_at=at)
        )  # fmt: skip
        corrected = ident % 3 == 0
        v_rows.append(
            dict(id=ident, answer_id=ident, kind="correct" if corrected else "approve",
                 author_id="UEXPERT", text=f"Corrected {ident}." if corrected else None,
                 created_at=at)
        )  # fmt: skip
    with engine.begin() as connection:
        for table, rows in ((Question, q_rows), (Answer, a_rows), (Verdict, v_rows)):
            for chunk in range(0, len(rows), 5_000):
                connection.execute(insert(table), rows[chunk : chunk + 5_000])


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def database_for(size: int, url: str | None, folder: Path) -> str:
    if url is None:
        return f"sqlite:///{folder / f'bench-{size}.db'}"
    import psycopg

    name = f"apprentice_bench_{size}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{url.rsplit('/', 1)[0]}/{name}"


def scale_table(*, sizes, url: str | None, budget_s: float, queries: int) -> None:
    embedder = load_embedder()
    probe = synthetic_questions(600, seed=99)
    embedder.encode(synthetic_questions(8, seed=5))  # first calls pay one-off setup
    one_query = [timed(lambda t=t: embedder.encode([t]), 1)[0] for t in probe[:30]]
    started = time.perf_counter()
    embedder.encode(probe[30:])
    rate = len(probe[30:]) / (time.perf_counter() - started)
    query_s = statistics.median(one_query)

    print(f"Answer budget: {budget_s:g} s. MiniLM on this machine: one query "
          f"{query_s * 1000:.1f} ms ({query_s / budget_s:.1%} of the budget, at any size), "
          f"{rate:.0f} sentences/s for a first full embedding.\n")  # fmt: skip
    print("| entries | search p50 | p95 | % budget | refresh, nothing new | % budget "
          "| refresh, 1 new entry | % budget | first refresh (DB+index) | + MiniLM embedding "
          "| matrix |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    per_entry_s = None
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            engine = open_database(database_for(size, url, Path(folder)))
            questions = synthetic_questions(size + 1)
            fill(engine, questions[:size])
            kb = KnowledgeBase(db=engine, embedder=RandomUnitEmbedder())
            first = kb.refresh()
            assert first.entries == size, (first.entries, size)

            asked = synthetic_questions(queries, seed=1234)
            index = iter(range(10**9))

            def search(kb=kb, asked=asked, index=index):
                i = next(index)
                kb.search(asked[i % len(asked)], channel_id=f"G{i % 50:04d}", k=3)

            timed(search, 5)  # warm up
            searches = sorted(timed(search, queries))
            skipped = statistics.median(timed(kb.refresh, 20))
            fill(engine, questions[size:], start_id=size + 1)
            grown = kb.refresh()
            assert grown.embedded == 1 and grown.entries == size + 1, grown

            p50, p95 = statistics.median(searches), searches[int(0.95 * (len(searches) - 1))]
            per_entry_s = p50 / size
            bytes_ = kb._snapshot.matrix.nbytes
            print(
                f"| {size:,} | {p50 * 1000:.2f} ms | {p95 * 1000:.2f} ms | {p50 / budget_s:.2%} "
                f"| {skipped * 1000:.1f} ms | {skipped / budget_s:.1%} "
                f"| {grown.seconds * 1000:.0f} ms | {grown.seconds / budget_s:.0%} "
                f"| {first.seconds:.2f} s | {size / rate:,.0f} s "
                f"| {bytes_ / 2**20:.1f} MiB |"
            )
            engine.dispose()
    if per_entry_s:
        matters = 0.05 * budget_s / per_entry_s
        print(
            f"\nSearch grows linearly; at the largest size {per_entry_s * 1e9:.0f} ns per entry, "
            f"so it passes 5 % of a {budget_s:g} s answer near {matters:,.0f} entries."
        )


# Team questions and rewordings (positives); same-template other-entity questions (hard
# negatives, the first 14) and unrelated ones (easy negatives).
POSITIVE = [
    ("How do I get VPN access?", "what's the way to request access to the VPN?"),
    ("How do I get VPN access?", "who do I ask to get on the vpn"),
    ("Where do I file expense reports?", "how can I submit my expenses?"),
    ("Who is on call this week?", "who's the current on-call engineer?"),
    ("How do I deploy to production?", "what are the steps to ship a release to prod?"),
    ("How do I reset my password?", "I forgot my password, how do I change it?"),
    ("What is the wifi password in the office?", "what's the office wi-fi key?"),
    ("How many vacation days do we get?", "what's our annual PTO allowance?"),
    ("Where is the staging database?", "what's the hostname of the staging db?"),
    ("How do I run the test suite locally?", "how can I run the tests on my laptop?"),
    ("Who approves purchase orders?", "who signs off on POs?"),
    ("How do I request a new laptop?", "what's the process for getting a new computer?"),
    ("When is payday?", "what day do we get paid?"),
    ("How do I add someone to the GitHub org?", "how can I invite a new person to our github?"),
    ("What's the SLA for P1 incidents?", "how fast must we respond to a priority one incident?"),
    ("Where are the design docs kept?", "where can I find our design documents?"),
    ("How do I rotate the API keys?", "what's the procedure for rotating api credentials?"),
    ("Which Python version do we use?", "what version of python is our codebase on?"),
    ("How do I book a meeting room?", "how can I reserve a conference room?"),
    ("Can I work remotely on Fridays?", "is working from home allowed on fridays?"),
    ("How do I get access to the analytics dashboard?", "who can let me view the dashboards?"),
    ("What is the process for code review?", "how do code reviews work here?"),
    ("How do I expense a client dinner?", "can I get reimbursed for dinner with a customer?"),
    ("Where do I report a security incident?", "who should I tell if I think we've been hacked?"),
    ("How do I set up my development environment?", "what do I need to install to develop?"),
    ("What's the parental leave policy?", "how much leave do new parents get?"),
    ("How do I restart the build server?", "the CI machine is stuck, how do I reboot it?"),
    ("Who owns the billing service?", "which team is responsible for billing?"),
    ("How do I get a parking pass?", "where can I get a permit to park at the office?"),
    ("What time is the all-hands meeting?", "when does the company all hands start?"),
]
NEGATIVE = [
    ("How do I get VPN access?", "How do I get access to the staging database?"),
    ("How do I get VPN access?", "Can I connect to the corporate network from home?"),
    ("How do I deploy to production?", "How do I deploy to staging?"),
    ("How do I deploy to production?", "How do I roll back a bad deploy?"),
    ("Who is on call this week?", "What is our deploy process?"),
    ("How many vacation days do we get?", "How many sick days do we get?"),
    ("How do I reset my password?", "How do I reset my 2FA device?"),
    ("Where is the staging database?", "Where is the production database?"),
    ("Who approves purchase orders?", "Who approves vacation requests?"),
    ("How do I request a new laptop?", "How do I return my old laptop?"),
    ("When is payday?", "When is the holiday party?"),
    ("What's the SLA for P1 incidents?", "What's the SLA for P3 incidents?"),
    ("Which Python version do we use?", "Which Node version do we use?"),
    ("How do I book a meeting room?", "How do I book travel?"),
    ("How do I get VPN access?", "What is the capital of France?"),
    ("How do I get VPN access?", "what should I eat for lunch today?"),
    ("Where do I file expense reports?", "how does the garbage collector work in python?"),
    ("Who is on call this week?", "why is the sky blue?"),
    ("How do I reset my password?", "what is a good name for a cat?"),
    ("How do I run the test suite locally?", "when is the next public holiday?"),
    ("Who owns the billing service?", "what's the weather in Berlin?"),
    ("How do I get a parking pass?", "how do I write a for loop in Rust?"),
    ("What time is the all-hands meeting?", "how do I get VPN access?"),
    ("Can I work remotely on Fridays?", "how do I deploy to production?"),
    ("What's the parental leave policy?", "where is the staging database?"),
    ("How do I rotate the API keys?", "who approves purchase orders?"),
    ("How do I set up my development environment?", "what's the wifi password?"),
    ("Where are the design docs kept?", "How many vacation days do we get?"),
    ("How do I expense a client dinner?", "how do I restart the build server?"),
    ("What is the process for code review?", "can I bring my dog to the office?"),
]
HARD = 14


def calibration_table() -> None:
    embedder = load_embedder()

    def similarity(pairs):
        left = embedder.encode([a for a, _ in pairs])
        right = embedder.encode([b for _, b in pairs])
        return (left * right).sum(axis=1)

    positive, negative = similarity(POSITIVE), similarity(NEGATIVE)
    hard, easy = negative[:HARD], negative[HARD:]
    print(f"Paraphrases: {len(POSITIVE)}, min {positive.min():.2f}, median "
          f"{np.median(positive):.2f}. Different-entity questions: {HARD}, max {hard.max():.2f}. "
          f"Unrelated or neighbouring: {len(easy)}, max {easy.max():.2f}.\n")  # fmt: skip
    print(
        "| threshold | paraphrases found | different-entity questions returned | others returned |"
    )
    print("|---:|---:|---:|---:|")
    for threshold in np.arange(0.40, 0.81, 0.05):
        print(
            f"| {threshold:.2f} | {np.mean(positive >= threshold):.0%} "
            f"| {np.mean(hard >= threshold):.0%} | {np.mean(easy >= threshold):.0%} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--database-url", help="a PostgreSQL server URL; default SQLite files")
    parser.add_argument("--answer-budget-s", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--calibrate", action="store_true", help="print the threshold table too")
    args = parser.parse_args()
    if args.calibrate:
        calibration_table()
    scale_table(
        sizes=args.sizes, url=args.database_url, budget_s=args.answer_budget_s, queries=args.queries
    )


if __name__ == "__main__":
    main()
