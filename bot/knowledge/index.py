"""The knowledge base: approved and corrected answers, searchable by meaning, at once.

An expert's correction should help the very next asker, not only after the next training cycle.
`KnowledgeBase.refresh()` re-reads the entries from the database and embeds only questions it
has not seen; `search()` returns the entries whose question means the same as the new one, and
only those the asker's channel may see (see `entries.py` for the visibility rules).

Thresholds (cosine similarity of all-MiniLM-L6-v2 question embeddings), measured on 30
paraphrase pairs and 30 non-matching pairs of team questions (`bench/retrieval_scale.py
--calibrate`): unrelated questions score below 0.15 and questions on a neighbouring topic
(VPN vs staging database) 0.27–0.56; paraphrases spread from 0.22 to 0.90, 70 % of them at or
above 0.6. 0.6 is the lowest cut with no neighbouring-topic question above it. Questions that
differ in one entity ("deploy to production" vs "to staging", "P1" vs "P3") score 0.5–0.9 and no
threshold separates them: the notes carry their own question so the model (and the reader of
the citation) can see what they answered.

`exact_match()` is stricter because the bot may post the approved text without generating:
normalised text equal, or similarity ≥ 0.98 *and* the same numbers. One-word swaps still reach
0.96 ("open on Monday" vs "on Tuesday", "python 3.11 or 3.12" vs "3.12 or 3.13").

Search is brute force: one matrix-vector product over every entry's vector, a mask for the
channel, a sort of the few rows above the threshold. `bench/retrieval_scale.py` measures it:
under 0.1 ms at 1k entries, ~15 ms at 50k (memory-bound: 73 MiB of vectors per query), so it
passes 5 % of a 1 s answer only past ~150k entries; embedding the question (~10 ms) costs more.
A refresh that finds a changed verdict re-reads every entry (~0.3 s at 10k, ~3 s at 50k on a
busy two-core machine): call `refresh()` before each answer for small teams, or use
`refresh_in_background()` past a few thousand entries.

Thread safety: a refresh builds a new immutable snapshot and swaps it in with one assignment,
so searches never lock and never see half an update; refreshes serialise on their own lock.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine, func
from sqlmodel import col, select

from bot.knowledge.citations import as_notes, citation
from bot.knowledge.embedder import Embedder
from bot.knowledge.entries import EXPERT_KINDS, KnowledgeEntry, current_entries
from bot.store.db import session_scope
from bot.store.models import Verdict
from bot.store.question_keys import clean_question, normalise_question

__all__ = ["Hit", "KnowledgeBase", "RefreshReport", "as_notes", "citation"]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.6
DEFAULT_EXACT_THRESHOLD = 0.98
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass(frozen=True)
class Hit:
    entry: KnowledgeEntry
    score: float  # cosine similarity of the questions, -1..1


@dataclass(frozen=True)
class RefreshReport:
    entries: int  # in the index after the refresh
    embedded: int  # question texts sent to the embedder this time
    dropped: int  # entries that left since the previous refresh
    skipped: bool  # nothing changed in the verdicts, the database was not re-read
    seconds: float


@dataclass(frozen=True)
class _Snapshot:
    entries: tuple[KnowledgeEntry, ...] = ()
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    public: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    private_rows: dict[str | None, np.ndarray] = field(default_factory=dict)
    by_text: dict[str, tuple[KnowledgeEntry, ...]] = field(default_factory=dict)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class KnowledgeBase:
    """Approved answers in memory, refreshed from the database, searched by cosine similarity."""

    def __init__(
        self,
        *,
        db: Engine,
        embedder: Embedder,
        threshold: float = DEFAULT_THRESHOLD,
        exact_threshold: float = DEFAULT_EXACT_THRESHOLD,
        reread_every_s: float = 60.0,
    ) -> None:
        self._db = db
        self._embedder = embedder
        self.threshold = threshold
        self.exact_threshold = exact_threshold
        # Edits that do not touch the verdict table (a question's text changed) are picked up
        # by a full re-read at least this often.
        self._reread_every_s = reread_every_s
        self._snapshot = _Snapshot()
        self._vectors: dict[str, np.ndarray] = {}  # cleaned question text -> unit vector
        self._fingerprint: tuple | None = None
        self._read_at = 0.0
        self._refresh_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._snapshot.entries)

    @property
    def entries(self) -> tuple[KnowledgeEntry, ...]:
        return self._snapshot.entries

    def refresh(self, *, force: bool = False) -> RefreshReport:
        """Bring the index up to date with the verdicts in the database.

        Cheap when nothing changed (one aggregate query over the verdicts); otherwise the
        entries are re-read and only question texts not embedded before go to the embedder.
        """
        started = time.perf_counter()
        with self._refresh_lock:
            with session_scope(self._db) as session:
                fingerprint = self._read_fingerprint(session)
                fresh = time.monotonic() - self._read_at < self._reread_every_s
                if not force and fresh and fingerprint == self._fingerprint:
                    return RefreshReport(
                        entries=len(self._snapshot.entries),
                        embedded=0,
                        dropped=0,
                        skipped=True,
                        seconds=time.perf_counter() - started,
                    )
                entries = current_entries(session=session)
            read_at = time.monotonic()

            texts = {entry.id: clean_question(entry.question) for entry in entries}
            missing = list(dict.fromkeys(t for t in texts.values() if t not in self._vectors))
            if missing:
                vectors = _unit(self._embedder.encode(missing))
                self._vectors.update(zip(missing, vectors, strict=True))
            wanted = set(texts.values())
            self._vectors = {t: v for t, v in self._vectors.items() if t in wanted}

            before = {entry.id for entry in self._snapshot.entries}
            self._snapshot = self._build(entries, [texts[e.id] for e in entries])
            self._fingerprint, self._read_at = fingerprint, read_at
            return RefreshReport(
                entries=len(entries),
                embedded=len(missing),
                dropped=len(before - texts.keys()),
                skipped=False,
                seconds=time.perf_counter() - started,
            )

    def refresh_in_background(self, *, every_s: float = 2.0) -> threading.Event:
        """Refresh on a daemon thread every `every_s` seconds until the returned event is set.

        Past a few thousand entries a refresh after a verdict costs a noticeable share of an
        answer (see the bench); refreshing on a timer keeps that off the answer path, at the
        price of an expert's verdict taking up to `every_s` to be found.
        """
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.refresh()
                except Exception:  # the database may be briefly away; try again next tick
                    log.warning("knowledge base refresh failed; retrying", exc_info=True)

        threading.Thread(target=loop, name="knowledge-refresh", daemon=True).start()
        return stop

    def search(self, question: str, *, channel_id: str | None, k: int = 3) -> list[Hit]:
        """Up to `k` entries visible in `channel_id` whose question means the same, best first.

        Entries below the threshold are never returned. When the same question has entries in
        several scopes the asker can see (public and this private channel), only the one with
        the latest verdict is returned, so the notes never contradict each other.
        """
        snapshot = self._snapshot
        if not snapshot.entries or k <= 0 or not clean_question(question):
            return []
        scores = self._scores(snapshot, question, channel_id)
        candidates = np.flatnonzero(scores >= self.threshold)
        if candidates.size == 0:
            return []
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        hits: dict[str, Hit] = {}
        # The same question in two scopes has (nearly) the same vector, so its twins sit next
        # to each other in the order; a few rows past k are enough to see them.
        for row in order[: k * 4]:
            entry = snapshot.entries[row]
            seen = hits.get(entry.key)
            if seen is None or entry.verdict_at > seen.entry.verdict_at:
                hits[entry.key] = Hit(entry=entry, score=float(scores[row]))
        return sorted(hits.values(), key=lambda hit: -hit.score)[:k]

    def exact_match(self, question: str, *, channel_id: str | None) -> KnowledgeEntry | None:
        """The entry to answer with directly: the same question, not merely a similar one."""
        snapshot = self._snapshot
        key = normalise_question(question)
        if not key:
            return None
        same = [e for e in snapshot.by_text.get(key, ()) if e.visible_in(channel_id)]
        if same:
            return max(same, key=lambda e: (e.verdict_at, e.verdict_id))
        hits = self.search(question, channel_id=channel_id, k=1)
        if not hits or hits[0].score < self.exact_threshold:
            return None
        entry = hits[0].entry
        # Embeddings barely see digits: "P1" and "P2", "3.11" and "3.12" score ~0.96.
        if _NUMBER.findall(key) != _NUMBER.findall(entry.key):
            return None
        return entry

    def _scores(self, snapshot: _Snapshot, question: str, channel_id: str | None) -> np.ndarray:
        query = _unit(self._embedder.encode([clean_question(question)]))[0]
        scores = snapshot.matrix @ query
        visible = snapshot.public.copy()
        own = snapshot.private_rows.get(channel_id)
        if own is not None:
            visible[own] = True
        return np.where(visible, scores, -np.inf)

    def _build(self, entries: list[KnowledgeEntry], texts: list[str]) -> _Snapshot:
        if not entries:
            return _Snapshot()
        matrix = np.stack([self._vectors[text] for text in texts])
        public = np.array([entry.public for entry in entries], dtype=bool)
        private: dict[str | None, list[int]] = {}
        by_text: dict[str, list[KnowledgeEntry]] = {}
        for row, entry in enumerate(entries):
            if not entry.public:
                private.setdefault(entry.channel_id, []).append(row)
            by_text.setdefault(entry.key, []).append(entry)
        return _Snapshot(
            entries=tuple(entries),
            matrix=matrix,
            public=public,
            private_rows={c: np.array(rows, dtype=np.intp) for c, rows in private.items()},
            by_text={key: tuple(group) for key, group in by_text.items()},
        )

    @staticmethod
    def _read_fingerprint(session) -> tuple:
        """Changes whenever an expert verdict is added, withdrawn or removed."""
        row = session.exec(
            select(
                func.count(col(Verdict.id)),
                func.max(col(Verdict.id)),
                func.count(col(Verdict.withdrawn_at)),
                func.max(col(Verdict.withdrawn_at)),
            ).where(col(Verdict.kind).in_(EXPERT_KINDS))
        ).one()
        return tuple(row)
