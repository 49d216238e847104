"""Catalog ids: ULID-style, 26 characters of Crockford base32.

The first 10 characters encode the creation time in milliseconds, the last 16 are 80 random bits, so
ids sort by creation time, are unique without coordination between writers, and — with a fixed
alphabet and length — can never contain a separator, `..` or anything else that escapes
`<root>/loras/<id>/`.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
ID_LENGTH = 26
_TIME_CHARS = 10
_RANDOM_BITS = 80
# 26 characters carry 130 bits, an id 128: the first character is at most '7'.
_ID_PATTERN = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


class InvalidIdError(ValueError):
    """Text that is not a catalog id; the message says what an id looks like."""


def new_id(now: float | None = None) -> str:
    """A fresh id; `now` (seconds since the epoch) defaults to the current time."""
    millis = int((time.time() if now is None else now) * 1000)
    if not 0 <= millis < 1 << 48:
        raise ValueError(f"time {now!r} is outside the range an id can encode")
    value = (millis << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)
    chars = []
    for _ in range(ID_LENGTH):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def is_catalog_id(text: object) -> bool:
    return isinstance(text, str) and _ID_PATTERN.match(text) is not None


def validate_id(text: object) -> str:
    """Return `text` if it is a catalog id, else raise InvalidIdError naming it."""
    if not is_catalog_id(text):
        raise InvalidIdError(f"{text!r} is not a catalog id: expected {ID_LENGTH} characters of "
                             f"0-9 and A-Z without I, L, O, U (e.g. {new_id(0)})")
    return text  # type: ignore[return-value]


def id_time(catalog_id: str) -> datetime:
    """When the id was made (the writer's clock)."""
    millis = 0
    for char in validate_id(catalog_id)[:_TIME_CHARS]:
        millis = millis * 32 + ALPHABET.index(char)
    return datetime.fromtimestamp(millis / 1000, UTC)
