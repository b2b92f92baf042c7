"""Secrets never written down: a data URL's user info (`http://user:password@host/...`) and signed query
parameters (`X-Amz-Signature=...`, `sig=...`, `token=...`) are replaced by `***` wherever a path is recorded
(config.toml, checkpoints, results.json, logger configs), printed or reported. The process that was given the
URL keeps using it; a resumed run is given it again (`--data URL`), or takes credentials from the environment."""

from __future__ import annotations

import re

MARK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/?#@\s]+)@")
_SECRET_PARAMS = ("signature", "sig", "token", "credential", "security-token", "securitytoken", "password",
                  "passwd", "secret", "key", "awsaccesskeyid", "x-amz-signature", "x-amz-credential",
                  "x-amz-security-token", "x-goog-signature", "x-goog-credential", "access_token", "api_key",
                  "apikey", "auth")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def _param(m: re.Match) -> str:
    name = m.group("name")
    plain = name.lower().replace("_", "-")
    secret = plain in _SECRET_PARAMS or plain.replace("-", "") in _SECRET_PARAMS or plain.endswith(
        ("signature", "token", "credential", "password", "secret"))
    return f"{m.group('sep')}{name}={MARK}" if secret and m.group("value") else m.group(0)


def redact(text: str) -> str:
    """`text` with every URL's user info and secret query values replaced by ***."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MARK}@", text)
    return _QUERY.sub(_param, text) if "?" in text else text


def redacted(obj):
    """A copy of a JSON-like record (dicts, lists, strings) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redacted(v) for v in obj)
    return obj


def is_redacted(text: str) -> bool:
    return isinstance(text, str) and (f"://{MARK}@" in text or f"={MARK}" in text)


__all__ = ["MARK", "is_redacted", "redact", "redacted"]
