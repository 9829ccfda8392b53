"""Team knowledge: approved and corrected answers, retrievable the moment an expert judges them.

`entries` reads what the experts stand behind, `embedder` turns questions into vectors,
`index` keeps them searchable per channel, `citations` credits them. Importing this package
does not import torch; `load_embedder()` does.
"""

from bot.knowledge.citations import as_notes, citation, vouched_by
from bot.knowledge.embedder import Embedder, EmbedderUnavailable, SentenceEmbedder, load_embedder
from bot.knowledge.entries import KnowledgeEntry, current_entries
from bot.knowledge.index import Hit, KnowledgeBase, RefreshReport
from bot.store.question_keys import normalise_question

__all__ = [
    "Embedder",
    "EmbedderUnavailable",
    "Hit",
    "KnowledgeBase",
    "KnowledgeEntry",
    "RefreshReport",
    "SentenceEmbedder",
    "as_notes",
    "citation",
    "current_entries",
    "load_embedder",
    "normalise_question",
    "vouched_by",
]
