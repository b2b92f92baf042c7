"""`ShardSet`: an opened shard-set folder. Metadata, the member table of each split, loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.shards import layout
from pipeline.shards.images import decode
from pipeline.shards.loaders import create_loader
from pipeline.shards.reader import read_rows
from pipeline.shards.storage import DataSource, ReadOptions, ShardFile, open_store


@dataclass(frozen=True)
class MemberTable:
    """Every sample of a split, in storage order (shard by shard); ids increase along it."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    sources: np.ndarray
    digests: np.ndarray  # `layout.member_digest` of each image (0 in format-1 sets)
    shard: np.ndarray  # shard number of each row
    shard_starts: np.ndarray  # first row of each shard, plus len at the end

    def __len__(self) -> int:
        return len(self.ids)


class ShardSet:
    """`root` is the folder (a Path) or the URL (a str) it was opened from; `meta` reads its index and member
    tables there, `store` its shards: the same store, or for a set `pipeline index` made over shards kept
    elsewhere, the store of `shards_at` (a folder or a URL)."""

    def __init__(self, store, index: dict):
        if isinstance(store, (str, os.PathLike, DataSource)):
            store = open_store(store)
        self.meta, self.index = store, index
        self.store = open_store(index["shards_at"], store.options) if index.get("shards_at") else store
        self.root = store.label
        self._tables: dict[str, MemberTable] = {}

    @classmethod
    def open(cls, location: str | os.PathLike | DataSource, options: ReadOptions = ReadOptions()) -> "ShardSet":
        """A shard-set folder, or one under an s3://, gs:// or http(s):// prefix (`ReadOptions`: how; a
        `DataSource` brings its own)."""
        store = open_store(location, options)
        if store.local:
            return cls(store, layout.load_index(store.root))
        index = layout.parse_index(store.where(layout.INDEX_NAME), store.read_index(layout.INDEX_NAME))
        if index["format_version"] < 2:
            raise DataError(f"{store.where(layout.INDEX_NAME)}: a format-{index['format_version']} shard set, "
                            "whose members carry no digests to check remote reads against; prepare it again "
                            "with this version and upload it (`pipeline upload DIR URL`)")
        return cls(store, index)

    # -- metadata ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.index["name"]

    @property
    def classes(self) -> list[str]:
        return self.index["classes"]

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def splits(self) -> list[str]:
        return list(self.index["splits"])

    @property
    def mode(self) -> str:
        return self.index["image"]["mode"]

    @property
    def channels(self) -> int:
        return self.index["image"]["channels"]

    @cached_property
    def image_size(self) -> int | None:
        """Side of the (square) stored images; None when they vary or are not square."""
        size = self.index["image"]["size"]
        return size[0] if size and size[0] == size[1] else None

    def count(self, split: str) -> int:
        return self._split_info(split)["count"]

    def _split_info(self, split: str) -> dict:
        if split not in self.index["splits"]:
            raise PipelineError(f"{self.root}: has no split {split!r} (it has {', '.join(self.splits)})")
        return self.index["splits"][split]

    def labelled(self, split: str) -> bool:
        """Whether the split's samples carry labels (STL-10's unlabeled split does not: its labels are -1)."""
        return self._split_info(split).get("labelled", True) is not False

    def shard_path(self, split: str, shard_no: int):
        """Where a shard's tar is: a Path, or a URL for a remote set."""
        return self.store.where(self._split_info(split)["shards"][shard_no]["tar"])

    def shard_files(self, split: str) -> list[ShardFile]:
        return [ShardFile(r["tar"], r["sha256"], r["bytes"], r["count"]) for r in self._split_info(split)["shards"]]

    # -- members ------------------------------------------------------------------------------------------
    def members(self, split: str) -> MemberTable:
        if split not in self._tables:
            info = self._split_info(split)
            parts, starts = [], [0]
            for rec in info["shards"]:
                where = self.meta.where(rec["idx"])
                table = layout.read_member_table(where, self._pinned_idx(rec))
                layout.validate_member_table(where, table, rec, len(self.classes), self.labelled(split))
                parts.append(table)
                starts.append(starts[-1] + len(table))
            t = np.concatenate(parts) if parts else np.zeros(0, layout.MEMBER_DTYPE)
            shard = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts])
            if len(t) > 1 and np.any(np.diff(t["id"]) <= 0):
                raise DataError(f"{self.root}: ids of split {split!r} are not increasing; prepare the shard set again")
            self._tables[split] = MemberTable(
                t["id"].copy(), t["label"].copy(), t["offset"].copy(), t["size"].copy(), t["source"].copy(),
                t["digest"].copy(), shard, np.asarray(starts, dtype=np.int64),
            )
        return self._tables[split]

    def _pinned_idx(self, rec: dict) -> bytes:
        """A shard's .idx bytes, checked against the size and SHA-256 index.json pins (read no further than
        the pinned size from a server)."""
        where = self.meta.where(rec["idx"])
        if self.meta.local:
            try:
                data = where.read_bytes()
            except FileNotFoundError:
                raise DataError(f"{where}: missing; run `pipeline prepare` again to rebuild the shard") from None
            except OSError as exc:
                raise DataError(f"{where}: unreadable ({exc.strerror}); run `pipeline verify`") from None
            fix = "the shard set is damaged or mixed with another: run `pipeline verify`, then prepare it again"
        else:
            data = self.meta.read_pinned(rec["idx"], rec.get("idx_bytes"), rec.get("idx_sha256"))
            fix = "the remote copy is damaged or mixed with another: upload the shard set again"
        layout.check_idx_pin(where, data, rec, fix)
        return data

    def ids(self, split: str) -> np.ndarray:
        return self.members(split).ids

    def labels(self, split: str) -> np.ndarray:
        return self.members(split).labels

    def rows_of(self, split: str, ids: np.ndarray) -> np.ndarray:
        """Rows of the member table holding `ids`; DataError naming the first id the split lacks."""
        table_ids = self.members(split).ids
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(table_ids, ids)
        rows_clipped = np.minimum(rows, len(table_ids) - 1)
        bad = (rows >= len(table_ids)) | (table_ids[rows_clipped] != ids) if len(table_ids) else np.ones(len(ids), bool)
        if np.any(bad):
            first = int(ids[np.flatnonzero(bad)[0]])
            raise DataError(f"sample id {first} (and {int(bad.sum()) - 1} more) not in split {split!r} of {self.root}")
        return rows

    def read_bytes(self, split: str, sample_id: int) -> bytes:
        return bytes(self.read_rows(split, self.rows_of(split, np.array([sample_id])))[0])

    def read_rows(self, split: str, rows: np.ndarray) -> list:
        """The image bytes of member-table rows, in the order given: one store read per shard touched."""
        return read_rows(self.store, self.shard_files(split), self.members(split), np.asarray(rows))

    def read_image(self, split: str, sample_id: int) -> np.ndarray:
        """One decoded image, HxWxC uint8."""
        return decode(self.read_bytes(split, sample_id), self.mode)

    # -- loading ------------------------------------------------------------------------------------------
    def loader(self, split: str = "train", subset=None, **kwargs):
        """A loader over `split`, or over `subset` (ids, or a Manifest) of it. See loaders.create_loader."""
        return create_loader(self, split, subset, **kwargs)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s)}" for s in self.splits)
        return f"ShardSet({str(self.root)!r}, {self.name}, {counts})"
