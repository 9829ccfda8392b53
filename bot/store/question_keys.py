"""What makes two askings the same question, for every part that needs to know.

Knowledge entries ("latest verdict per question wins"), the exact-match shortcut and the
training set all group questions by `normalise_question`, so a question is one question
everywhere: Slack mentions and link markup dropped, case, spacing and punctuation ignored.
"""

from __future__ import annotations

import re
import unicodedata

_MENTION = re.compile(r"<[@#!][^>]*>")  # <@U123>, <#C123|general>, <!here>
_LINK = re.compile(r"<((?:https?|mailto):[^>|]+)(?:\|([^>]*))?>")
_WORD = re.compile(r"\w+(?:['’.]\w+)*")  # keeps "what's" and "3.11" whole


def clean_question(text: str) -> str:
    """The question as a person reads it: Slack mentions dropped, links as their labels."""
    text = _LINK.sub(lambda m: m.group(2) or m.group(1), text)
    text = _MENTION.sub(" ", text)
    return " ".join(text.split())


def normalise_question(text: str) -> str:
    """A key under which rewordings by case, spacing and punctuation compare equal."""
    text = unicodedata.normalize("NFKC", clean_question(text)).casefold()
    return " ".join(_WORD.findall(text.replace("’", "'")))
