"""The one parser of `KEY=VALUE,KEY=VALUE` settings (select.params, --smoothing, eval.certify, --per-class,
crop options), and its TOML-table twin: a structured setting may be given either way."""

from __future__ import annotations

import math

from pipeline.errors import PipelineError


def _number_or_text(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value in ("true", "false"):
        return value == "true"
    return value


def parse_kv(value: str | dict | None, where: str, kinds: dict | None = None, example: str = "") -> dict:
    """"k=20,unit=batch" (or the table {k = 20, unit = "batch"}) -> {"k": 20, "unit": "batch"}.

    Without `kinds`, numbers and true/false are converted and any key is taken. With `kinds` (key -> int,
    float, str or bool), only those keys are allowed and each value is cast to its kind; `where` names the
    setting in the one-line error, `example` shows a valid value."""
    hint = f" (e.g. {example})" if example else ""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str):
        items = []
        for part in filter(None, (t.strip() for t in value.split(","))):
            key, sep, text = part.partition("=")
            if not sep or not key.strip():
                raise PipelineError(f"{where} {value!r}: expected KEY=VALUE,KEY=VALUE{hint}")
            items.append((key.strip(), _number_or_text(text.strip())))
    else:
        raise PipelineError(f"{where} {value!r}: expected KEY=VALUE,KEY=VALUE or a table{hint}")
    out = {}
    for key, v in items:
        if kinds is not None:
            if key not in kinds:
                raise PipelineError(f"{where}: unknown key {key!r} (keys: {', '.join(kinds)}){hint}")
            v = _cast(v, kinds[key], f"{where} {key}")
        out[key] = v
    return out


def _cast(value, kind, where: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise PipelineError(f"{where}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PipelineError(f"{where}={value!r}: not an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PipelineError(f"{where}={value!r}: not a finite number")
        return float(value)
    return value if isinstance(value, str) else str(value)


def format_kv(values: dict) -> str:
    """The inverse of parse_kv for flat values: {"k": 20} -> "k=20"."""
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())


__all__ = ["format_kv", "parse_kv"]
