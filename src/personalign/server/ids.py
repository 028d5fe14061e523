"""User ids from HTTP clients, and the stored ids they map to.

Chat apps name users with whatever their identity provider gives them: ``auth0|5f7c...``,
``org:42``, ``alice@example.com``, a UUID. The store names folders after user ids, so it only
takes safe ids (:func:`personalign.types.validate_user_id`). The server accepts any id of 1-256
characters with no control character and no whitespace at either end (:data:`USER_ID_PATTERN`,
which the OpenAPI schema states) and maps it to a stored id:

- an id the store accepts as it is (``alice``, ``alice@example.com``) is stored as given, so the
  server, the Python API and the CLI see the same users;
- any other id is escaped: ``esc+`` then the id with every character other than letters, digits,
  ``_``, ``-`` and ``@`` written as ``+HH`` per UTF-8 byte (``auth0|5f7c`` -> ``esc+auth0+7C5f7c``);
- an escaped id too long for the store is hashed: ``sha+`` then its SHA-256 hex digest.

The mapping is one-to-one: escaped and hashed ids start with ``esc+`` or ``sha+``, and an id
that itself starts with either (however unlikely) is escaped too, so it cannot alias another.
Stored ids contain no ``/``, no ``..`` and nothing but the store's safe characters.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Any

from personalign.errors import ValidationError
from personalign.types import validate_user_id

EXTERNAL_ID_MAX_LEN = 256
ESCAPED_PREFIX = "esc+"
HASHED_PREFIX = "sha+"
_KEPT = frozenset(string.ascii_letters + string.digits + "_-@")
_FIX = f"send 1-{EXTERNAL_ID_MAX_LEN} characters, no control characters, no leading or trailing whitespace"
# Control characters (C0, DEL, C1), the line and paragraph separators, and unpaired surrogates.
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_CONTROL_RE = re.compile(f"[{_CONTROL}\ud800-\udfff]")
# What str.strip() removes that is not a control character (so the pattern matches exactly the ids accepted).
_SPACE = " \xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
# The accepted ids as a JSON Schema pattern (surrogates left out: JSON Schema's regex engines take no lone surrogate,
# and UTF-8 in a URL or body cannot carry one).
USER_ID_PATTERN = (
    f"^[^{_CONTROL}{_SPACE}]([^{_CONTROL}]{{0,{EXTERNAL_ID_MAX_LEN - 2}}}[^{_CONTROL}{_SPACE}])?$"
)


def check_external_id(user: Any, field: str = "user") -> str:
    """``user`` if it is an id a client may send, else :class:`ValidationError` naming ``field``."""
    if not isinstance(user, str):
        raise ValidationError(field, "must be a string", _FIX, user)
    if not 1 <= len(user) <= EXTERNAL_ID_MAX_LEN:
        raise ValidationError(field, f"must be 1-{EXTERNAL_ID_MAX_LEN} characters long", _FIX, len(user))
    if _CONTROL_RE.search(user):  # control characters, line breaks, unpaired surrogates
        raise ValidationError(field, "contains a control character", _FIX, user)
    if user.strip() != user:
        raise ValidationError(field, "starts or ends with whitespace", _FIX, user)
    return user


def _is_native(user: str) -> bool:
    try:
        validate_user_id(user)
    except ValidationError:
        return False
    return not user.startswith((ESCAPED_PREFIX, HASHED_PREFIX))


def escape(user: str) -> str:
    """``user`` with every character outside ``[A-Za-z0-9_@-]`` written as ``+HH`` per UTF-8 byte."""
    return "".join(ch if ch in _KEPT else "".join(f"+{b:02X}" for b in ch.encode("utf-8")) for ch in user)


def unescape(text: str) -> str:
    """The inverse of :func:`escape`."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+":
            out.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            out.extend(text[i].encode("ascii"))
            i += 1
    return out.decode("utf-8")


def stored_form(user: str, max_len: int) -> str:
    """The store-safe id (at most ``max_len`` characters) for a checked external id."""
    if _is_native(user) and len(user) <= max_len:
        return user
    escaped = ESCAPED_PREFIX + escape(user)
    if len(escaped) <= max_len:
        return escaped
    hashed = HASHED_PREFIX + hashlib.sha256(user.encode("utf-8")).hexdigest()
    assert len(hashed) <= max_len, "the tenant prefix leaves no room for a hashed id"
    return hashed


def external_form(stored: str) -> str | None:
    """The external id a stored id came from (``None`` for a hashed id, which keeps only its digest)."""
    if stored.startswith(ESCAPED_PREFIX):
        return unescape(stored[len(ESCAPED_PREFIX) :])
    if stored.startswith(HASHED_PREFIX):
        return None
    return stored
