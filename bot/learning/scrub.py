"""Scrubbing: personal data and secrets out of text before it can reach a training set.

An adapter memorises what it is trained on, and anyone who can ask the bot a question can read
it back. So every question, answer and correction is scrubbed before it becomes an example:
`scrub(text)` replaces each finding with a typed placeholder (`[EMAIL]`, `[SLACK_TOKEN]`, …) so
the sentence still reads naturally and the model learns "here goes a token", not the token.

How it decides:
- Well-formed secrets are found by their shape (Slack `xoxb-`, AWS `AKIA…`, `ghp_…`, PEM
  blocks, JWTs, URLs with a password). These are precise, so they run everywhere.
- Numbers are where false positives live ("port 8080", "v2.3.1", "2024-05-12"). Cards must
  pass the Luhn check and start like a card network; IBANs must pass ISO 7064 mod 97; phone
  numbers must look like a dialled number (a `+country` prefix, a national trunk `0`, the
  US `(555) 123-4567` shape, or a number right after "call"/"phone"/"tel").
- Assignments (`password=…`, `DB_PASSWORD: …`, `api_key = "…"`) hide the value and keep the
  key, so "set password=[PASSWORD] in the config" still teaches where it goes. Values that are
  not secrets (numbers for non-password keys, `true`, `${ENV_VAR}`, `<your-token>`, our own
  placeholders) are left alone; so is prose ("passwords: never share them").
- Findings that overlap are merged, so a secret matched partly by two patterns is replaced
  whole: the guarantee is that no character of any finding survives.

`scrub` is idempotent: scrubbing scrubbed text changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Finding", "find_secrets", "scrub", "luhn_valid", "iban_valid"]


@dataclass(frozen=True)
class Finding:
    kind: str  # the placeholder's name: "EMAIL" is written as "[EMAIL]"
    span: tuple[int, int]  # [start, end) in the scrubbed-from text

    @property
    def placeholder(self) -> str:
        return f"[{self.kind}]"


# --- checksums ---------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    if not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616 / ISO 7064 mod-97 check of an IBAN (spaces allowed)."""
    compact = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


# Issuer prefixes (IIN ranges) of the card networks, with their lengths: a Luhn-valid number
# that starts like no card is much more likely an order id than a card.
_CARD_PREFIX = re.compile(
    r"^(?:4\d{12}(?:\d{3}){0,2}"  # Visa 13/16/19
    r"|(?:5[1-5]\d{2}|222[1-9]|22[3-9]\d|2[3-6]\d{2}|27[01]\d|2720)\d{12}"  # Mastercard
    r"|3[47]\d{13}"  # American Express
    r"|3(?:0[0-5]|[68]\d)\d{11,16}"  # Diners Club
    r"|6(?:011|5\d{2}|4[4-9]\d)\d{12,15}"  # Discover
    r"|35(?:2[89]|[3-8]\d)\d{12,15}"  # JCB
    r"|(?:5018|5020|5038|6304|6759|676[1-3])\d{8,15})$"  # Maestro
)


def _is_card(number: str) -> bool:
    digits = re.sub(r"[ -]", "", number)
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_valid(digits)


def _phone_digits_ok(number: str, *, low: int = 8, high: int = 15) -> bool:
    # E.164 caps a number at 15 digits; fewer than 8 is an extension or a count, not a phone.
    count = sum(char.isdigit() for char in number)
    return low <= count <= high


# --- assignments -------------------------------------------------------------------------

# Key names whose value is a secret. Any identifier containing one counts (DB_PASSWORD,
# slack_signing_secret, GITHUB_TOKEN, x-api-key), matched case-insensitively.
_PASSWORD_WORDS = r"pass(?:word|wd|phrase)?|pwd"
_SECRET_WORDS = (
    r"secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|client[_-]?secret"
    r"|auth[_-]?key|signing[_-]?key|credentials?"
)
_KEY = rf"[A-Za-z0-9_.-]*?(?:(?P<pw>{_PASSWORD_WORDS})|{_SECRET_WORDS})[A-Za-z0-9_-]*"
_ASSIGNMENT = re.compile(
    rf"""(?ix)
    (?<![A-Za-z0-9])(?P<key>{_KEY})["']?          # key, maybe quoted as in JSON / YAML
    (?P<op>\s*(?:=|:=|=>|:)\s*|\s+(?:is|was)\s+(?:set\s+to\s+)?)
    (?P<quote>["'`])?
    (?P<value>(?(quote)[^"'`\n]+?|[^\s"'`,;)}}\]]+?))
    (?=(?(quote)(?P=quote)|(?:$|[\s"'`,;)}}\]])))
    """
)
_NOT_A_SECRET = re.compile(
    r"""(?ix)^(?:
        true|false|none|null|nil|yes|no|required|optional|empty|unset|redacted|hidden
        |\*+|x{3,}|\.{3,}|…
        |\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|%[A-Za-z_]+%|\{\{.*\}\}     # env / template refs
        |<[^<>]*>                                                # <your-token>
    )$"""
)


# A value that starts like our own placeholder, an <angle-bracket hint> or a template reference
# is not a secret, even when it runs on past a space ("token=<paste it here>").
_NOT_A_VALUE_START = re.compile(r"\[[A-Z_]+\]|<[^<>\n]{1,80}>|\{\{[^{}\n]*\}\}")


def _assignment_findings(text: str) -> Iterator[Finding]:
    for match in _ASSIGNMENT.finditer(text):
        value = match.group("value")
        start, end = match.span("value")
        if not match.group("quote") and len(value) > 1 and value.endswith("."):
            # "set password=hunter2." ends a sentence; the full stop is not part of the secret.
            value = value.rstrip(".") or value
            end = start + len(value)
        if _NOT_A_VALUE_START.match(text, match.start("value")) or _NOT_A_SECRET.match(value):
            continue
        is_password = match.group("pw") is not None
        if value.isdigit() and not (is_password and _names_the_password(match.group("key"))):
            continue  # max_tokens=160, token_ttl: 3600, password_min_length=12
        op = match.group("op").strip().lower()
        if op not in ("=", ":=", "=>") and not match.group("quote"):
            # Prose ("passwords: never share them", "the token is stored in vault") uses the same
            # words: past a colon or "is", only a value that looks generated counts.
            if not _looks_generated(value):
                continue
        yield Finding("PASSWORD" if is_password else "SECRET", (start, end))


def _names_the_password(key: str) -> bool:
    # DB_PASSWORD=1234 is a PIN-like password; password_min_length=12 is a property of one.
    return re.search(rf"(?:{_PASSWORD_WORDS})[\"']?$", key, re.IGNORECASE) is not None


def _looks_generated(value: str) -> bool:
    has_digit = any(char.isdigit() for char in value)
    has_symbol = any(not char.isalnum() for char in value)
    has_mixed_case = value.lower() != value and value.upper() != value
    if len(value) < 6:
        return False
    return has_digit or has_symbol or (has_mixed_case and len(value) >= 10) or len(value) >= 20


# --- shape patterns ----------------------------------------------------------------------

_B64 = r"[A-Za-z0-9+/]"
_PATTERNS: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], bool] | None]] = [
    # PEM / OpenSSH / PGP private keys, also when the END line was cut off by the paste.
    (
        "PRIVATE_KEY",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)"
        ),
        None,
    ),
    # GCP service-account JSON: the key and its id.
    ("PRIVATE_KEY", re.compile(r'"private_key"\s*:\s*"(?P<s>[^"]+)"'), None),
    ("SECRET", re.compile(r'"private_key_id"\s*:\s*"(?P<s>[0-9a-f]{16,})"'), None),
    # URLs that carry a password: scheme://user:password@host
    (
        "URL_WITH_CREDENTIALS",
        re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@<>|]*:[^\s/@<>|]+@[^\s<>|]+"),
        None,
    ),
    # Slack
    (
        "SLACK_WEBHOOK",
        re.compile(r"https?://hooks\.slack(?:-gov)?\.com/(?:services|workflows|triggers)/[\w/-]+"),
        None,
    ),
    ("SLACK_TOKEN", re.compile(r"\bxox[a-z](?:\.xox[a-z])?-[A-Za-z0-9-]{8,}"), None),
    ("SLACK_TOKEN", re.compile(r"\bxapp-\d-[A-Za-z0-9-]{8,}"), None),
    # AWS access key ids, and the secret key next to its name
    (
        "AWS_KEY",
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}\b"),
        None,
    ),
    (
        "AWS_SECRET",
        re.compile(
            rf"(?i)(?:aws_?secret_?access_?key|secret access key)[\"']?\s*(?:=|:|is)?\s*[\"']?"
            rf"(?P<s>{_B64}{{40}})(?!{_B64})"
        ),
        None,
    ),
    # Azure storage / service bus connection strings and SAS signatures
    (
        "AZURE_CONNECTION_STRING",
        re.compile(
            r"(?i)(?:DefaultEndpointsProtocol|Endpoint|BlobEndpoint)=[^\s;]+;"
            r"(?:[A-Za-z]+=[^\s;]*;?)*?(?:AccountKey|SharedAccessKey|SharedAccessSignature)="
            r"[^\s;]+;?(?:[A-Za-z]+=[^\s;]*;?)*"
        ),
        None,
    ),
    ("SECRET", re.compile(r"(?i)AccountKey=(?P<s>[A-Za-z0-9+/=]{20,})"), None),
    ("SECRET", re.compile(r"[?&]sig=(?P<s>[A-Za-z0-9%+/=]{20,})"), None),
    # GitHub, GitLab
    ("GITHUB_TOKEN", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), None),
    ("GITHUB_TOKEN", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}\b"), None),
    ("GITLAB_TOKEN", re.compile(r"\bgl(?:pat|dt|ptt|rt)-[A-Za-z0-9_-]{20,}\b"), None),
    # OpenAI / Anthropic / Stripe / Google / npm / Hugging Face / SendGrid style keys
    ("API_KEY", re.compile(r"\bsk-(?:proj-|ant-(?:api\d\d-)?|svcacct-)?[A-Za-z0-9_-]{20,}"), None),
    ("API_KEY", re.compile(r"\b(?:sk|rk|pk|whsec)_(?:live|test)_[A-Za-z0-9]{16,}"), None),
    ("API_KEY", re.compile(r"\bwhsec_[A-Za-z0-9+/=]{24,}"), None),
    ("API_KEY", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), None),
    ("API_KEY", re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"), None),
    ("API_KEY", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), None),
    ("API_KEY", re.compile(r"\bSG\.[\w-]{16,}\.[\w-]{16,}"), None),
    # JSON Web Tokens: base64url header and payload (both JSON objects: "eyJ") and signature
    ("JWT", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), None),
    # HTTP authorization headers
    ("SECRET", re.compile(r"(?i)\bbearer\s+(?P<s>[A-Za-z0-9._~+/=-]{16,})"), None),
    (
        "SECRET",
        re.compile(r"(?i)\bbasic\s+(?P<s>[A-Za-z0-9+/]{12,}={0,2})(?![A-Za-z0-9+/=])"),
        None,
    ),
    # E-mail addresses
    (
        "EMAIL",
        re.compile(
            r"(?<![\w.+-])(?!git@)[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
            r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b"
        ),
        None,
    ),
    # Payment cards: 13-19 digits, optionally grouped by spaces or dashes; checked below.
    (
        "CARD",
        re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)"),
        lambda m: _is_card(m[0]),
    ),
    # IBAN: country, check digits, then the account in groups of four; checked below.
    (
        "IBAN",
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
        lambda m: iban_valid(m[0]),
    ),
    # US social security numbers (not 000, 666 or 9xx areas).
    (
        "SSN",
        re.compile(r"(?<![\w.-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"),
        None,
    ),
    # Phones, international: +country, then groups (spaces, dots, dashes, a bracketed area).
    (
        "PHONE",
        re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,6}(?![\w.]\d|\d)"),
        lambda m: _phone_digits_ok(m[0]),
    ),
    (
        "PHONE",
        re.compile(r"(?<![\w+])00[1-9]\d{0,2}(?:[ .-]\(?\d{1,5}\)?){2,6}(?![\w]|[.-]\d)"),
        lambda m: _phone_digits_ok(m[0], low=10),
    ),
    # Phones, North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-555-123-4567
    (
        "PHONE",
        re.compile(
            r"(?<![\w.+/-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}(?P<sep>[ .-]))\d{3}"
            r"(?(sep)(?P=sep)|[ .-])\d{4}(?![\w]|[.-]\d)"
        ),
        None,
    ),
    # Phones, national with a trunk 0: 020 7946 0958, 07700 900123, 06 12 34 56 78, 030/1234567
    (
        "PHONE",
        re.compile(
            r"(?<![\w.:/-])0\(?\d{1,4}\)?(?P<nsep>[ ./-])\d{2,8}(?:(?P=nsep)\d{2,8}){0,3}"
            r"(?![\w]|[.:/-]\d)"
        ),
        lambda m: _phone_digits_ok(m[0], low=9, high=12) and not _looks_like_date(m[0]),
    ),
    ("PHONE", re.compile(r"(?<![\w.:/-])0[1-9]\d{8,9}(?![\w]|[.:/-]\d)"), None),
    # Any digit run right after words that announce a phone number.
    (
        "PHONE",
        re.compile(
            r"(?i)\b(?:phone|tel|telephone|mobile|cell|call|text me|whatsapp|sms|fax)"
            r"(?:\s*(?:number|no\.?|#|:|is|on|at|me at|me on)\s*){0,3}\s*"
            r"(?P<s>\+?\(?\d[\d ().-]{5,}\d)"
        ),
        lambda m: _phone_digits_ok(m["s"], low=7),
    ),
]


def _looks_like_date(number: str) -> bool:
    # 01.02.2024, 03/04/2025, 05-06-24: a national-phone shape that is really a date
    return bool(re.fullmatch(r"0?\d{1,2}[./-]\d{1,2}[./-](?:\d{2}|\d{4})", number))


def _raw_findings(text: str) -> Iterator[Finding]:
    for kind, pattern, check in _PATTERNS:
        for match in pattern.finditer(text):
            if check is not None and not check(match):
                continue
            start, end = match.span("s") if "s" in pattern.groupindex else match.span()
            # Lookbehind patterns may start with the blanks and quotes around a value: trim them.
            while start < end and text[start] in " \t\"'":
                start += 1
            while end > start and text[end - 1] in " \t\"'":
                end -= 1
            if start < end:
                yield Finding(kind, (start, end))
    yield from _assignment_findings(text)


def find_secrets(text: str) -> list[Finding]:
    """Every span of `text` that holds personal data or a secret, merged and in order.

    Overlapping findings become one (the earliest-starting, then longest, finding names it), so
    replacing each returned span removes every character any pattern matched.
    """
    raw = sorted(_raw_findings(text), key=lambda f: (f.span[0], -f.span[1]))
    merged: list[Finding] = []
    for finding in raw:
        if merged and finding.span[0] < merged[-1].span[1]:
            last = merged[-1]
            if finding.span[1] > last.span[1]:
                merged[-1] = Finding(last.kind, (last.span[0], finding.span[1]))
            continue
        merged.append(finding)
    return merged


def scrub(text: str) -> str:
    """`text` with every finding of `find_secrets` replaced by its placeholder, e.g. `[EMAIL]`."""
    if not text:
        return text
    parts = []
    cursor = 0
    for finding in find_secrets(text):
        start, end = finding.span
        parts.append(text[cursor:start])
        parts.append(finding.placeholder)
        cursor = end
    parts.append(text[cursor:])
    return "".join(parts)
