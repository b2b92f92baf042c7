"""Subset manifests: which samples of a split to train on next.

A manifest is two or three files side by side:
    round-0003.json                        header: shard-set fingerprint, split, producer, round, count, ...
    round-0003.<digest>.npy                int64 sample ids (named by the digest of their content)
    round-0003.<digest>.weights.npy        float32 per-sample weights (optional)
The arrays are written first under names of their own, the header last by one rename, so a header on disk
always names a complete pair: rewriting a manifest never touches the pair the old header names until the new
header has replaced it (then the old arrays are removed). The header carries the digest of the id file, so a
header paired with another id file is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.atomic import write_json, write_npy
from pipeline.errors import DataError
from pipeline.validate import Fields, parse_json, read_array

FORMAT = "pipeline.manifest"
FORMAT_VERSION = 1


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:32]


def _header_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix == ".npy":
        path = path.with_suffix("")
    return path if path.suffix == ".json" else path.with_name(path.name + ".json")


def read_header(path: str | Path, strict: bool = False) -> dict | None:
    """The header of the manifest of ours at `path` (its .json, or the name it is saved under): the one reader
    of manifest headers. None for a missing, unreadable or foreign file; with `strict`, one DataError line
    naming the file and what is wrong instead."""
    header_path = _header_path(path)
    if not header_path.is_file():
        if strict:
            raise DataError(f"{header_path}: no such manifest (write one with `pipeline select`)")
        return None
    try:
        h = parse_json(header_path.read_text())
    except (OSError, ValueError) as exc:
        if strict:
            raise DataError(f"{header_path}: malformed manifest header ({exc}); select this round again") from exc
        return None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        if strict:
            raise DataError(f"{header_path}: not a manifest of this tool")
        return None
    return h


def array_digest(array: np.ndarray) -> str:
    """The content digest in an array file's name (`STEM.DIGEST.npy`)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def owned_array(path: Path, stem: str, kinds: tuple[str, ...] = ("", ".weights")) -> bool:
    """Whether `path` is an array this tool wrote for the header named `stem`: its name is STEM.DIGEST[KIND].npy
    and DIGEST is the digest of the array it holds. Nothing else is ever deleted as "the old pair"."""
    m = re.fullmatch(re.escape(stem) + r"\.([0-9a-f]{16})(" + "|".join(re.escape(k) for k in kinds) + r")\.npy",
                     path.name)
    if m is None or not path.is_file() or path.is_symlink():
        return False
    try:
        return array_digest(np.load(path, allow_pickle=False)) == m.group(1)
    except (OSError, ValueError):
        return False


def header_arrays(header_path: str | Path) -> list[Path]:
    """The array files an existing header of ours names and provably wrote (see `owned_array`)."""
    header_path = _header_path(header_path)
    h = read_header(header_path) or {}
    stem = header_path.with_suffix("").name
    named = [header_path.parent / Path(str(n)).name for n in (h.get("ids_file"), h.get("weights_file")) if n]
    return [p for p in named if owned_array(p, stem)]



def check_manifest_target(path: str | Path) -> None:
    """Refuse to write a manifest onto a folder or onto a file that is not a manifest of ours (a shard set's
    index.json, a config, ...)."""
    given = Path(path)
    if given.is_dir():
        raise DataError(f"{given}: is a folder; give a manifest file name, e.g. {given / 'round-0001.json'}")
    header_path = _header_path(path)
    if header_path.is_dir():
        raise DataError(f"{header_path}: is a folder; give a manifest file name")
    if header_path.exists():
        if read_header(header_path) is None:
            raise DataError(f"{header_path}: exists and is not a manifest; refusing to replace it (choose another "
                            "--out)")


@dataclass
class Manifest:
    ids: np.ndarray
    split: str
    dataset_fingerprint: str
    producer: dict = field(default_factory=dict)  # {"name": selector, "version": tool version, "params": {...}}
    weights: np.ndarray | None = None
    round: int | None = None
    epoch: int | None = None
    fraction: float | None = None
    snapshot: str | None = None
    extra: dict = field(default_factory=dict)  # timing, objective, validation ids, ...
    path: Path | None = None

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float32)
            if self.weights.shape != self.ids.shape:
                raise ValueError(f"{len(self.weights)} weights for {len(self.ids)} ids")

    @classmethod
    def for_shardset(cls, shardset, split: str, ids, **kwargs) -> "Manifest":
        return cls(ids=ids, split=split, dataset_fingerprint=shardset.fingerprint, **kwargs)

    def __len__(self) -> int:
        return len(self.ids)

    # -- writing ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        header_path = _header_path(path)
        check_manifest_target(header_path)
        stem = header_path.with_suffix("").name
        header_path.parent.mkdir(parents=True, exist_ok=True)
        ids_digest = array_digest(self.ids)
        ids_path = header_path.with_name(f"{stem}.{ids_digest}.npy")
        write_npy(ids_path, self.ids)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset_fingerprint": self.dataset_fingerprint,
            "split": self.split,
            "producer": {"version": __version__, **self.producer},
            "round": self.round,
            "epoch": self.epoch,
            "fraction": self.fraction,
            "snapshot": self.snapshot,
            "count": int(len(self.ids)),
            "ids_file": ids_path.name,
            "ids_sha256": _digest(ids_path),
            "weights_file": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.extra,
        }
        keep = {ids_path.name}
        if self.weights is not None:
            w_digest = array_digest(self.weights)
            wpath = header_path.with_name(f"{stem}.{w_digest}.weights.npy")
            write_npy(wpath, self.weights)
            header["weights_file"] = wpath.name
            keep.add(wpath.name)
        old = {p.name for p in header_arrays(header_path)}
        write_json(header_path, header)  # the switch: one rename
        for name in old - keep:  # the previous pair, now unreferenced
            (header_path.parent / name).unlink(missing_ok=True)
        self.path = header_path
        return header_path

    # -- reading ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        header_path = _header_path(path)
        h = read_header(header_path, strict=True)
        if h.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{header_path}: manifest format {h.get('format_version')}, this tool reads {FORMAT_VERSION}")
        missing = [k for k in ("dataset_fingerprint", "split", "count", "ids_file", "ids_sha256") if k not in h]
        if missing:
            raise DataError(f"{header_path}: malformed manifest header, missing {', '.join(missing)}")
        f = Fields(header_path, h, "select this round again")
        f.text("dataset_fingerprint")
        f.text("split")
        f.int("count")
        f.name("ids_file")
        f.text("ids_sha256")
        f.name("weights_file", optional=True)
        f.int("round", optional=True)
        f.int("epoch", optional=True)
        f.number("fraction", 0, 1, optional=True)
        producer = f.table("producer", optional=True) or {}
        pf = f.inner("producer", producer)
        pf.text("name", optional=True)
        pf.text("version", optional=True)
        pf.table("params", optional=True)
        ids_path = header_path.parent / Path(h["ids_file"]).name
        if not ids_path.is_file():
            raise DataError(f"{header_path}: its id file {ids_path.name} is missing; select this round again")
        if _digest(ids_path) != h["ids_sha256"]:
            raise DataError(f"{ids_path}: does not match the digest in {header_path.name} (a stale or foreign id "
                            "file); select this round again")
        ids = cls._load_array(ids_path, np.int64)
        weights = None
        if h.get("weights_file"):
            weights = cls._load_array(header_path.parent / Path(h["weights_file"]).name, np.float32)
        if len(ids) != h["count"] or (weights is not None and len(weights) != len(ids)):
            raise DataError(f"{header_path}: count {h['count']} does not match {ids_path.name} ({len(ids)} ids)")
        if len(ids) and ids.min() < 0:
            raise DataError(f"{ids_path}: sample ids must be >= 0 (found {int(ids.min())}); select this round again")
        if weights is not None and len(weights) and (not np.isfinite(weights).all() or weights.min() < 0):
            raise DataError(f"{header_path}: its weights must be finite and >= 0; select this round again")
        known = {"format", "format_version", "dataset_fingerprint", "split", "producer", "round", "epoch", "fraction",
                 "snapshot", "count", "ids_file", "ids_sha256", "weights_file", "created"}
        return cls(ids=ids, split=h["split"], dataset_fingerprint=h["dataset_fingerprint"],
                   producer=producer, weights=weights, round=h.get("round"), epoch=h.get("epoch"),
                   fraction=h.get("fraction"), snapshot=h.get("snapshot"),
                   extra={k: v for k, v in h.items() if k not in known}, path=header_path)

    @staticmethod
    def _load_array(path: Path, dtype) -> np.ndarray:
        return read_array(path, "select this round again", dtype, ndim=1)

    # -- validation ---------------------------------------------------------------------------------------
    def check_against(self, shardset) -> None:
        """Refuse a manifest that does not fit `shardset`: other data, unknown split, duplicate or foreign ids."""
        where = self.path or "manifest"
        if self.dataset_fingerprint != shardset.fingerprint:
            raise DataError(
                f"{where}: made for the shard set with fingerprint {self.dataset_fingerprint}, but {shardset.root} "
                f"has {shardset.fingerprint} (the data changed or it is another data set); select again on it"
            )
        if self.split not in shardset.splits:
            raise DataError(f"{where}: split {self.split!r} not in {shardset.root} (it has {', '.join(shardset.splits)})")
        if len(np.unique(self.ids)) != len(self.ids):
            raise DataError(f"{where}: holds duplicate sample ids; select again")
        try:
            shardset.rows_of(self.split, self.ids)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None


_ROUND = re.compile(r"^round-(\d+)\.json$")


def round_path(directory: str | Path, round_no: int) -> Path:
    """The one spelling of a round's manifest: DIR/round-NNNN.json."""
    return Path(directory) / f"round-{round_no:04d}.json"


def round_paths(directory: str | Path) -> list[tuple[int, Path]]:
    """(round number, header path) of every round manifest in `directory`, newest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("round-*.json") if (m := _ROUND.match(p.name))]
    return sorted(found, reverse=True)


def next_round(directory: str | Path) -> int:
    return max((n for n, _ in round_paths(directory)), default=0) + 1


def newest_valid(directory: str | Path, shardset, split: str | None = None) -> Manifest | None:
    """The highest-numbered manifest in `directory` that loads and fits `shardset` (others are skipped)."""
    for _, p in round_paths(directory):
        try:
            m = Manifest.load(p)
            m.check_against(shardset)
        except DataError:
            continue
        if split is None or m.split == split:
            return m
    return None
