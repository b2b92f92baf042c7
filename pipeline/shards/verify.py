"""`pipeline verify`: re-read every shard against its index and decode every image (a folder or a URL).

Hostile shards are reported, never trusted: a member that is not a regular file is a finding (not read), a
member's declared size is checked against the index before a byte of it is read (a tiny tar declaring a huge
sparse member costs nothing), and every finding of every shard is listed; no traceback hides the others.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from pipeline.errors import DataError
from pipeline.progress import progress_bar
from pipeline.shards import layout
from pipeline.shards.images import CorruptImage, open_fully
from pipeline.shards.remote_fs import TooLarge
from pipeline.shards.storage import ReadOptions, is_url, open_store
from pipeline.shards.wds_index import is_indexed, verify_indexed

_LABEL_MAX = 32  # bytes of a label member (decimal text)


def _kind(m: tarfile.TarInfo) -> str:
    return ("symbolic link" if m.issym() else "hard link" if m.islnk() else "folder" if m.isdir()
            else "special file")


def _check_shard(tar_path: Path, idx_path: Path, rec: dict, id_range, on_image) -> list[str]:
    if not tar_path.is_file():
        return [f"{tar_path}: missing"]
    problems = []
    size = tar_path.stat().st_size
    if size != rec["bytes"]:
        problems.append(f"{tar_path}: {size} bytes, index.json says {rec['bytes']} (truncated or replaced)")
    elif layout.file_sha256(tar_path) != rec["sha256"]:
        problems.append(f"{tar_path}: content digest differs from index.json (the file was modified)")
    try:
        if "idx_sha256" in rec and idx_path.is_file():
            layout.check_idx_pin(idx_path, idx_path.read_bytes(), rec, "its shard cannot be trusted")
        table = layout.read_member_table(idx_path)
    except DataError as exc:
        return problems + [str(exc)]
    if len(table) != rec["count"]:
        problems.append(f"{idx_path}: {len(table)} rows, index.json says {rec['count']}")
    if len(table) and id_range and (table["id"].min() < id_range[0] or table["id"].max() > id_range[1]):
        problems.append(f"{idx_path}: ids outside the split's range {id_range}")
    expected = {}
    for row in table:
        expected[layout.member_key(int(row["id"]))] = row
    seen = set()
    try:
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                row = expected.get(key)
                if row is None:
                    problems.append(f"{tar_path}: member {m.name!r} not in {idx_path.name}")
                    continue
                if not m.isfile():
                    problems.append(f"{tar_path}: member {m.name!r} is a {_kind(m)}, not a file (not read)")
                    continue
                limit = _LABEL_MAX if ext == "cls" else int(row["size"])
                if m.size > limit:
                    problems.append(f"{tar_path}: {m.name} declares {m.size} bytes, index says at most {limit} "
                                    "(not read)")
                    continue
                data = tar.extractfile(m).read(limit)
                if ext == "cls":
                    if data.decode(errors="replace").strip() != str(int(row["label"])):
                        problems.append(f"{tar_path}: {m.name} says label {data!r}, index says {int(row['label'])}")
                    continue
                seen.add(key)
                if m.offset_data != row["offset"] or m.size != row["size"]:
                    problems.append(f"{tar_path}: {m.name} at byte {m.offset_data} size {m.size}, index says "
                                    f"{int(row['offset'])} size {int(row['size'])}")
                elif row["digest"] and layout.member_digest(data) != int(row["digest"]):  # format 1: no digests
                    problems.append(f"{tar_path}: {m.name}'s bytes do not match the digest in {idx_path.name}")
                try:
                    open_fully(data)
                except CorruptImage as exc:
                    problems.append(f"{tar_path}: {m.name} does not decode ({exc})")
                on_image()
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as exc:
        problems.append(f"{tar_path}: unreadable tar ({type(exc).__name__}: {exc})")
    missing = len(expected) - len(seen)
    if missing:
        problems.append(f"{tar_path}: {missing} images listed in {idx_path.name} are not in the tar")
    return problems


class _Local:
    """Where the files of a local shard set are: in its folder."""

    def __init__(self, root: Path):
        self.root = root

    def fetch(self, name: str, size: int | None = None) -> Path:
        return self.root / name

    def done(self) -> None:
        pass


class _Downloaded:
    """A remote set's files, fetched one shard at a time into a temporary folder (every byte is read either
    way; room for one shard is enough)."""

    def __init__(self, store, folder: Path):
        self.store, self.root, self._got = store, folder, []

    def fetch(self, name: str, size: int | None = None) -> Path:
        """The file, downloaded; never more than its recorded `size` (+ 1 byte, so a longer file is reported)."""
        path = self.root / name
        try:
            if size is None:
                self.store.download(name, path)
            else:
                self.store.download(name, path, limit=int(size) + 1)
        except TooLarge:
            raise DataError(f"{self.store.where(name)}: larger than the {int(size):,} bytes index.json records "
                            "(replaced or appended to); upload the shard set again") from None
        self._got.append(path)
        return path

    def done(self) -> None:
        for p in self._got:
            p.unlink(missing_ok=True)
        self._got.clear()


def verify(root: str | Path, progress: bool = True, options: ReadOptions = ReadOptions()) -> list[str]:
    """Every problem found, each naming its file (or URL); an empty list means healthy."""
    if not is_url(root):
        root = Path(root)
        try:
            index = layout.load_index(root)
        except DataError as exc:
            return [str(exc)]
        if is_indexed(index):  # shards `pipeline index` found, not wrote: their own names and keys
            return verify_indexed(root, progress)
        return _verify(index, _Local(root), root / layout.INDEX_NAME, progress)
    store = open_store(str(root), options)
    try:
        index = layout.parse_index(store.where(layout.INDEX_NAME), store.read_file(layout.INDEX_NAME))
    except DataError as exc:
        return [str(exc)]
    with tempfile.TemporaryDirectory(prefix="pipeline-verify-") as tmp:
        problems = _verify(index, _Downloaded(store, Path(tmp)), store.where(layout.INDEX_NAME), progress)
    return [p.replace(tmp, store.url) for p in problems]


def _verify(index: dict, files, index_path, progress: bool) -> list[str]:
    problems = []
    total = sum(info["count"] for info in index["splits"].values())
    with progress_bar(progress) as bar:
        task = bar.add_task("verify", total=total)
        for split, info in index["splits"].items():
            for rec in info["shards"]:
                try:
                    tar_path = files.fetch(str(rec["tar"]), rec.get("bytes"))
                    idx_path = files.fetch(str(rec["idx"]), rec.get("idx_bytes"))
                    problems += _check_shard(tar_path, idx_path, rec, info.get("id_range"),
                                             lambda: bar.advance(task))
                except DataError as exc:  # a read that failed, in its own words (missing, refused, too large)
                    problems.append(str(exc))
                except Exception as exc:  # report it with the others rather than stop at the first surprise
                    problems.append(f"{files.root / str(rec.get('tar', '?'))}: could not be checked "
                                    f"({type(exc).__name__}: {exc})")
                files.done()
            beton = info.get("beton")
            if beton:
                try:
                    path = files.fetch(beton["file"], beton.get("bytes"))
                except DataError as exc:
                    problems.append(str(exc))
                    continue
                if not path.is_file():
                    problems.append(f"{path}: missing (listed in index.json)")
                elif path.stat().st_size != beton["bytes"]:
                    problems.append(f"{path}: {path.stat().st_size} bytes, index.json says {beton['bytes']}")
                elif beton.get("sha256") and layout.file_sha256(path) != beton["sha256"]:  # older sets have none
                    problems.append(f"{path}: its SHA-256 is not the one index.json records (corrupted or replaced)")
                files.done()
    got = layout.fingerprint(index["classes"], index["image"], index["splits"])
    if got != index["fingerprint"]:
        problems.append(f"{index_path}: fingerprint does not match its own shard list (edited by hand?)")
    return problems
