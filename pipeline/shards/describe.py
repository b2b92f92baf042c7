"""Human-readable summaries of shard sets and manifests (for `pipeline inspect` and `prepare`)."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from pipeline.shards.manifest import Manifest
from pipeline.shards.shardset import ShardSet


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:,.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024


def shardset_table(ss: ShardSet) -> Table:
    img = ss.index["image"]
    size = "x".join(map(str, img["size"])) if img["size"] else "varies"
    t = Table(title=f"{ss.name}  ({ss.root})", caption=f"fingerprint {ss.fingerprint}", title_justify="left")
    for col in ("split", "samples", "shards", "ids", "bytes", "ffcv"):
        t.add_column(col, justify="right" if col in ("samples", "shards", "bytes") else "left")
    for split, info in ss.index["splits"].items():
        nbytes = sum(sh["bytes"] for sh in info["shards"])
        ids = "{}..{}".format(*info["id_range"]) if info.get("id_range") else "-"
        t.add_row(split, f"{info['count']:,}", str(len(info["shards"])), ids, _size(nbytes),
                  "yes" if info.get("beton") else "-")
    t.add_section()
    t.add_row("image", f"{img['mode']} {size}", img["format"], "", "", "")
    t.add_row("classes", str(len(ss.classes)), ", ".join(ss.classes[:6]) + (" ..." if len(ss.classes) > 6 else ""), "", "", "")
    if ss.index.get("skipped"):
        t.add_row("skipped", str(len(ss.index["skipped"])), "unreadable source files (listed in index.json)", "", "", "")
    return t


def manifest_table(m: Manifest, shardset: ShardSet | None = None) -> Table:
    t = Table(title=f"manifest {m.path}", title_justify="left", show_header=False)
    t.add_column("field")
    t.add_column("value")
    producer = m.producer or {}
    rows = [
        ("split", m.split),
        ("samples", f"{len(m):,}"),
        ("producer", f"{producer.get('name', '?')} (tool {producer.get('version', '?')})"),
        ("parameters", ", ".join(f"{k}={v}" for k, v in (producer.get("params") or {}).items()) or "-"),
        ("round / epoch", f"{m.round} / {m.epoch}"),
        ("fraction", "-" if m.fraction is None else f"{m.fraction:g}"),
        ("weights", "-" if m.weights is None else f"sum {float(m.weights.sum()):,.1f}, max {float(m.weights.max()):,.2f}"),
        ("data fingerprint", m.dataset_fingerprint),
    ]
    if shardset is not None:
        labels = shardset.labels(m.split)[shardset.rows_of(m.split, m.ids)]
        counts = np.bincount(labels, minlength=len(shardset.classes))
        rows.append(("per class", ", ".join(f"{c}:{n}" for c, n in zip(shardset.classes, counts))))
        rows.append(("of split", f"{len(m) / shardset.count(m.split):.1%} of {shardset.count(m.split):,}"))
    for k, v in rows:
        t.add_row(k, str(v))
    return t
