"""Masking of secrets in anything printed, logged, reported or answered (pure).

``redact`` walks a config-like structure: values of keys that name a secret
(``password``, ``secret``, ``token``, ``api_key``-like names, ``sasl.password``,
``ssl.key.*``, …) become ``"***"``; strings anywhere lose the password of a URL
(``scheme://user:pass@host`` → ``scheme://user:***@host``) and of a libpq
key/value DSN (``password=…``). ``redact_text`` does the string part for free
text: exception messages, log lines, report warnings.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "is_secret_key", "redact", "redact_text"]

MASK = "***"

_SECRET_KEY = re.compile(r"(pass(word|wd|phrase)?$|password|secret|token|credential|private[_.-]?key|api[_.-]?key|"
                         r"access[_.-]?key|session[_.-]?key|signing[_.-]?key|sasl\.(password|oauthbearer|jaas)|ssl\.key\.|"
                         r"keytab)", re.I)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_KV_PASSWORD = re.compile(r"(?P<k>\b(password|passwd|pwd|secret|token|sasl\.password)\s*[=:]\s*)(?P<q>['\"]?)(?P<v>[^\s'\",;&]+)",
                          re.I)
_BEARER = re.compile(r"(?P<k>\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}")


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """``text`` with URL passwords, ``password=…`` pairs and bearer tokens masked."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _KV_PASSWORD.sub(lambda m: f"{m['k']}{m['q']}{MASK}", text)
    return _BEARER.sub(lambda m: f"{m['k']}{MASK}", text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (dicts, lists, strings, pydantic SecretStr) with every secret masked."""
    try:
        from pydantic import SecretBytes, SecretStr
    except ImportError:  # pragma: no cover - pydantic is a dependency
        SecretStr = SecretBytes = ()  # type: ignore[assignment]
    if isinstance(value, (SecretStr, SecretBytes)):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if key and is_secret_key(key) and value not in (None, "", False):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value
