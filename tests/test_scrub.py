"""Scrubbing: no secret in the corpus survives, and ordinary chat text is left exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.learning.scrub import Finding, find_secrets, iban_valid, luhn_valid, scrub

CORPUS = [
    json.loads(line)
    for line in (Path(__file__).parent / "data" / "pii_corpus.jsonl").read_text().splitlines()
    if line.strip()
]
SECRETS = [row for row in CORPUS if row["kind"]]
BENIGN = [row for row in CORPUS if not row["kind"]]


def test_the_corpus_is_big_enough_to_mean_something():
    assert len(SECRETS) >= 60
    assert len(BENIGN) >= 30
    assert all(row["secret"] in row["text"] for row in SECRETS)


@pytest.mark.parametrize("row", SECRETS, ids=lambda row: f"{row['kind']}:{row['text'][:30]}")
def test_no_secret_survives(row):
    scrubbed = scrub(row["text"])
    assert row["secret"] not in scrubbed
    assert f"[{row['kind']}]" in scrubbed


@pytest.mark.parametrize("row", BENIGN, ids=lambda row: row["text"][:40])
def test_benign_text_is_untouched(row):
    assert scrub(row["text"]) == row["text"]
    assert find_secrets(row["text"]) == []


@pytest.mark.parametrize("row", CORPUS, ids=lambda row: row["text"][:40])
def test_scrubbing_is_idempotent(row):
    once = scrub(row["text"])
    assert scrub(once) == once


def test_findings_name_the_kind_and_span():
    text = "mail ada@example.com or call +44 20 7946 0958"
    findings = find_secrets(text)
    assert [f.kind for f in findings] == ["EMAIL", "PHONE"]
    assert [text[slice(*f.span)] for f in findings] == ["ada@example.com", "+44 20 7946 0958"]
    assert scrub(text) == "mail [EMAIL] or call [PHONE]"


def test_assignments_keep_the_key_and_hide_the_value():
    assert scrub("set DB_PASSWORD=Tr0ub4dor&3 then restart") == (
        "set DB_PASSWORD=[PASSWORD] then restart"
    )
    assert scrub('{"client_secret": "abc123XYZ789"}') == '{"client_secret": "[SECRET]"}'


def test_prose_and_references_about_secrets_are_not_secrets():
    for text in (
        "the token is in the vault",
        "password: ask the on-call",
        "api_key=${OPENAI_API_KEY}",
        "token=<paste it here>",
        "max_new_tokens=160",
    ):
        assert scrub(text) == text


def test_overlapping_findings_are_merged_so_nothing_leaks():
    # The URL pattern and the password assignment both match parts of this; the union goes.
    text = "DATABASE_URL=postgres://app:pa55word@db:5432/app?password=pa55word"
    scrubbed = scrub(text)
    assert "pa55word" not in scrubbed
    spans = [f.span for f in find_secrets(text)]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_cards_need_luhn_and_a_card_prefix():
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert scrub("card 4111 1111 1111 1112 is a typo") == "card 4111 1111 1111 1112 is a typo"
    # Luhn-valid but no card network starts with 9: an order number, not a card.
    assert luhn_valid("9000000000000001")
    assert scrub("order 9000000000000001 shipped") == "order 9000000000000001 shipped"


def test_ibans_need_the_mod_97_check():
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB83 WEST 1234 5698 7654 32")
    assert scrub("ref GB83 WEST 1234 5698 7654 32") == "ref GB83 WEST 1234 5698 7654 32"


def test_a_private_key_cut_off_by_the_paste_is_still_removed():
    text = "key:\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nabc"
    assert scrub(text) == "key:\n[PRIVATE_KEY]"


def test_empty_text():
    assert scrub("") == ""
    assert find_secrets("") == []
    assert Finding("EMAIL", (0, 1)).placeholder == "[EMAIL]"
