"""`pipeline upload DIR URL`: copy a verified shard set to object storage (s3://, gs://).

The folder is verified first. A marker naming the set's fingerprint goes up before anything else, the shards
and member tables next, index.json last: a reader never finds an index naming objects that are not there yet,
and an interrupted upload is resumed by running the command again (objects already there are kept only when
their bytes are the file's: by the MD5 the service records, else read back and hashed). A prefix holding anything this tool did not put there for this shard set is refused:
nothing of anyone else's is replaced.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError, PipelineError
from pipeline.progress import progress_bar
from pipeline.shards import layout
from pipeline.shards.storage import ReadOptions, is_url, open_store
from pipeline.shards.verify import verify
from pipeline.validate import parse_json

MARKER = ".pipeline-upload.json"


@dataclass
class UploadResult:
    url: str
    uploaded: int  # objects put
    kept: int  # objects already there from an earlier, interrupted upload
    bytes: int  # bytes put


def _files(root: Path, index: dict) -> list[tuple[str, int]]:
    """(name, bytes) of every file the set's index names, shards before their tables."""
    out = []
    for info in index["splits"].values():
        for rec in info["shards"]:
            out.append((rec["tar"], rec["bytes"]))
            out.append((rec["idx"], rec.get("idx_bytes", (root / rec["idx"]).stat().st_size)))
        if info.get("beton"):
            out.append((info["beton"]["file"], info["beton"]["bytes"]))
    return out


def _check_prefix(store, index: dict, names: list[str]) -> bool:
    """True when an earlier upload of this set may be resumed; raises when the prefix holds something else."""
    theirs = store.size(layout.INDEX_NAME)
    if theirs is not None:
        other = layout.parse_index(store.where(layout.INDEX_NAME), store.read_file(layout.INDEX_NAME))
        if other["fingerprint"] != index["fingerprint"]:
            raise PipelineError(f"{store.url}: already holds another shard set ({other['name']}, fingerprint "
                                f"{other['fingerprint']}); upload to an empty prefix")
        return True
    if store.size(MARKER) is not None:
        where = store.where(MARKER)
        try:
            marker = parse_json(store.read_file(MARKER))
        except (ValueError, UnicodeDecodeError):
            marker = None
        if not isinstance(marker, dict) or not isinstance(marker.get("fingerprint"), str):
            raise DataError(f"{where}: a damaged upload marker (not the record this tool writes); delete it and "
                            "upload again, or upload to an empty prefix")
        if marker.get("fingerprint") == index["fingerprint"]:
            return True
        raise PipelineError(f"{store.url}: an unfinished upload of another shard set (fingerprint "
                            f"{marker.get('fingerprint')}) is there; finish it or upload to an empty prefix")
    foreign = [n for n in names if store.size(n) is not None]
    if foreign:
        raise PipelineError(f"{store.where(foreign[0])}: already exists and this tool did not put it there; "
                            "upload to an empty prefix")
    return False


def upload(src, url: str, progress: bool = True, options: ReadOptions = ReadOptions()) -> UploadResult:
    src = Path(src)
    if not is_url(url):
        raise PipelineError(f"{url}: not a URL; upload to s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    problems = verify(src, progress=progress)
    if problems:
        raise DataError(f"{src}: not healthy ({len(problems)} problem(s); the first: {problems[0]}); run "
                        f"`pipeline verify {src}` and prepare it again before uploading")
    index = layout.load_index(src)
    if index.get("shards_at"):
        raise PipelineError(f"{src}: indexes shards kept at {index['shards_at']} (`pipeline index`); they stay there: "
                            "copy the shards to the bucket and index them where they lie")
    if index.get("member_digests") is False:
        raise PipelineError(f"{src}: indexed from tar headers only, so remote reads of it could not be checked; "
                            f"run `pipeline index {src} --digests --overwrite`, then upload")
    if index["format_version"] < 2:
        raise DataError(f"{src / layout.INDEX_NAME}: a format-{index['format_version']} shard set, without the "
                        "member digests remote reads check; prepare it again with this version, then upload it")
    store = open_store(url, options)
    files = _files(src, index)
    resuming = _check_prefix(store, index, [n for n, _ in files])
    if not resuming:
        with tempfile.TemporaryDirectory() as tmp:
            marker = Path(tmp) / MARKER
            marker.write_text(json.dumps({"fingerprint": index["fingerprint"], "name": index["name"]}))
            store.upload(marker, MARKER)
    uploaded = kept = sent = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("upload", total=sum(b for _, b in files))
        for name, size in files:
            if resuming and store.holds_copy_of(name, src / name):
                kept += 1
            else:
                store.upload(src / name, name)
                uploaded += 1
                sent += size
            bar.advance(task, size)
    store.upload(src / layout.INDEX_NAME, layout.INDEX_NAME)
    store.remove(MARKER)
    return UploadResult(store.url, uploaded + 1, kept, sent)
