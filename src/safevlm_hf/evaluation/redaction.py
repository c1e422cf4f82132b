"""Keep credentials out of reports, caches and error messages.

* :func:`redact_url` drops ``user:password@`` and masks credential-like query parameters (``?api-key=...``).
* :func:`redact_text` masks bearer/basic tokens, key-shaped strings (``sk-...``, ``hf_...``) and URL credentials
  anywhere in free text.
* :func:`redact` applies :func:`redact_text` to every string of a JSON-like value (what reports are written from).
* :func:`check_env_var_name` rejects a key pasted where the *name* of an environment variable is expected.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any


REDACTED = "REDACTED"
#: Query-parameter names whose value is a credential (compared lower-case, without ``-``/``_``).
_SECRET_QUERY_KEYS = frozenset(
    {
        "apikey",
        "key",
        "token",
        "accesstoken",
        "authtoken",
        "auth",
        "password",
        "pass",
        "pwd",
        "secret",
        "clientsecret",
        "sig",
        "signature",
        "code",
        "session",
        "sessiontoken",
        "credential",
        "credentials",
        "xapikey",
    }
)
# Key shapes of common providers: OpenAI/Anthropic-style "sk-...", Hugging Face "hf_...", GitHub "ghp_/gho_/...",
# Slack "xox?-...", AWS access key ids, Google "AIza...".
_KEY_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_\-]{16,}|sk_(?:live|test)_[A-Za-z0-9]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{30,})"
)
_AUTH_HEADER = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{8,}", flags=re.IGNORECASE)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _secret_key(name: str) -> bool:
    return re.sub(r"[-_]", "", name.lower()) in _SECRET_QUERY_KEYS


def redact_url(url: str) -> str:
    """``url`` without ``user:password@`` (replaced by ``REDACTED@``) and with credential query values masked."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return _KEY_SHAPES.sub(REDACTED, url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode([(k, REDACTED if _secret_key(k) else v) for k, v in pairs], safe=REDACTED)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with URL credentials, ``Authorization`` tokens and key-shaped strings masked."""
    text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    text = _AUTH_HEADER.sub(lambda match: f"{match.group(1)} {REDACTED}", text)
    return _KEY_SHAPES.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings, numbers) with :func:`redact_text` applied to every string,
    keys included."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(key) if isinstance(key, str) else key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


def looks_like_a_key(value: str) -> bool:
    """True when ``value`` has the shape of a secret rather than of an environment variable name."""
    if _KEY_SHAPES.search(value) or _AUTH_HEADER.search(value):
        return True
    # Names are words in one case; a long mixed-case-and-digit run is a token.
    return (
        len(value) >= 24
        and any(c.islower() for c in value)
        and any(c.isupper() for c in value)
        and any(c.isdigit() for c in value)
    )


def check_env_var_name(value: str, option: str = "api_key_env") -> str:
    """Return ``value`` if it can be the name of an environment variable; raise ``ValueError`` (without echoing the
    value) when it looks like a credential or is not a valid name."""
    shown = f"{value[:3]}..." if len(value) > 3 else "..."
    if looks_like_a_key(value):
        raise ValueError(
            f"{option} expects the NAME of an environment variable (e.g. OPENAI_API_KEY), but the value given "
            f"({shown}, {len(value)} characters) looks like a key itself. Put the key in an environment variable and "
            "pass that variable's name."
        )
    if not _ENV_NAME.match(value):
        raise ValueError(
            f"{option} expects the name of an environment variable (letters, digits and '_', not starting with a "
            f"digit), got {shown!r} ({len(value)} characters)."
        )
    return value


__all__ = ["REDACTED", "check_env_var_name", "looks_like_a_key", "redact", "redact_text", "redact_url"]
