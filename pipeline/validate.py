"""Checks for records read back from disk: each names the file and the field, in one DataError line.

A record of ours can still be damaged, edited by hand or forged; everything read back goes through a
validator of its type (`shards.layout.validate_index` and `validate_member_table`, the manifest header, the
pseudo-label arrays, checkpoint specs, metrics records) built from these helpers, so a bad value is refused
where it is read, not met later as a traceback or a 12 GB allocation.
"""

from __future__ import annotations

import math
import numbers
import re

from pipeline.errors import DataError, PipelineError

LIMIT = 1 << 40  # no count, id, offset or size of ours comes near this
INT64_MAX = (1 << 63) - 1  # seeds, epochs: what numpy, torch and the records written down hold


def whole_number(value, what: str, least: int = 0, why: str = "") -> int:
    """`value` as an int when it is a whole number in [least, 2^63): one PipelineError line naming `what` else
    (booleans, floats and numbers beyond int64 included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not least <= value <= INT64_MAX:
        raise PipelineError(f"{what} {value!r}: a whole number >= {least} (and below 2^63){why}")
    return int(value)


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a file name in its own folder: no path, no link out


class Fields:
    """`Fields(path, record, fix)` then `.int("count")`, `.text("split")`, ...: each returns the value or raises
    one line "PATH: FIELD = VALUE: what it must be; FIX"."""

    def __init__(self, path, record, fix: str, where: str = ""):
        self.path, self.record, self.fix, self.where = path, record, fix, where
        if not isinstance(record, dict):
            self.fail("", record, "must be a table of fields")

    def fail(self, key: str, value, rule: str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        name = f"{self.where}{key}" if key else (self.where.rstrip(".") or "the record")
        raise DataError(f"{self.path}: {name} = {shown}: {rule}; {self.fix}")

    def get(self, key: str, optional: bool = False):
        if key not in self.record:
            if optional:
                return None
            self.fail(key, None, "is missing")
        return self.record[key]

    def int(self, key: str, lo: int = 0, hi: int = LIMIT, optional: bool = False):
        v = self.get(key, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(key, v, f"must be a whole number in [{lo}, {hi}]")
        return v

    def number(self, key: str, lo: float = -math.inf, hi: float = math.inf, optional: bool = False):
        v = self.get(key, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            self.fail(key, v, f"must be a finite number in [{lo:g}, {hi:g}]")
        return v

    def text(self, key: str, pattern: re.Pattern | None = None, optional: bool = False):
        v = self.get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str) or (pattern is not None and not pattern.fullmatch(v)):
            self.fail(key, v, "must be text" + (f" matching {pattern.pattern}" if pattern is not None else ""))
        return v

    def name(self, key: str, optional: bool = False):
        """A file name beside the record: no folder part, nothing that leaves the folder."""
        v = self.get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str) or not SAFE_NAME.fullmatch(v) or ".." in v:
            self.fail(key, v, "must be a plain file name in the same folder")
        return v

    def table(self, key: str, optional: bool = False) -> dict | None:
        v = self.get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, dict):
            self.fail(key, v, "must be a table")
        return v

    def list(self, key: str, optional: bool = False) -> list | None:
        v = self.get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, list):
            self.fail(key, v, "must be a list")
        return v

    def inner(self, key: str, record=None) -> "Fields":
        return Fields(self.path, self.record[key] if record is None else record, self.fix, f"{self.where}{key}.")


def parse_json(text):
    """json.loads for records read back: input nested beyond what the parser recurses through is a decoding
    error like any other (ValueError), caught where the file is read and named, not a RecursionError."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested deeper than any record of ours", "", 0) from None


def parse_toml(text: str) -> dict:
    """tomllib.loads, with deep nesting a TOMLDecodeError (a ValueError) instead of a RecursionError."""
    import tomllib

    try:
        return tomllib.loads(text)
    except RecursionError:
        raise tomllib.TOMLDecodeError("nested deeper than any settings file") from None


def read_array(path, fix: str, dtype=None, ndim: int | None = None):
    """A .npy array of ours read back: plain values only (an object array is a pickle: refused), of the kind
    and rank its reader expects; anything else is one DataError line naming the file and `fix`."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a plain array ({str(exc)[:120]}); {fix}") from None
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise DataError(f"{path}: an array of {arr.dtype}, expected {np.dtype(dtype).name}; {fix}")
    if arr.dtype.kind not in "biufU":
        raise DataError(f"{path}: an array of {arr.dtype}, not numbers; {fix}")
    if ndim is not None and arr.ndim != ndim:
        raise DataError(f"{path}: a {arr.ndim}-d array, expected {ndim}-d; {fix}")
    return arr


__all__ = ["Fields", "LIMIT", "SAFE_NAME", "parse_json", "parse_toml", "read_array"]
