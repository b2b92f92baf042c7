"""Transfer in an experiment: every arm's encoder finetuned and measured on other data sets too.

    [experiment]  eval_data = ["shards/cifar100-32", {name = "stl10", source = "stl10:data/stl10_binary"}]
    [[arm]]       name = "rcs-0.2", eval_data = [...]      (an arm's own list replaces the experiment's)

An entry is a shard-set folder or URL, or a table: `path` (a shard set) or `source` plus any [prepare] setting
(prepared once under OUT/eval-data/NAME, resumed like [prepare]); `name` labels it in the tables (default: the
folder's name). Each (arm, seed) is evaluated on its own data first (the experiment's table, as before), then on
each entry with the same [eval] settings (eval.resize says what size the encoder sees), and recorded in
OUT/experiment.json beside the arm's row as it finishes; the results table adds "pre-trained on A, evaluated
on B" with mean ± sd over seeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

PREPARE_SETTINGS = {"out", "image_size", "jpeg_quality", "per_class", "workers", "seed", "shard_size", "formats",
                    "test_fraction", "splits"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class EvalData:
    name: str
    path: str | None = None  # an existing shard set
    prepare: dict = field(default_factory=dict)  # source + [prepare] settings, when it is made here

    def location(self, out: Path) -> str:
        """Where the shard set is (or will be, once prepared)."""
        return self.path or str(self.prepare.get("out") or Path(out) / "eval-data" / self.name)


def parse_eval_data(value, where: str) -> list[EvalData]:
    """An `eval_data` list, checked entry by entry (one line naming the entry and what to write)."""
    if not isinstance(value, list):
        raise PipelineError(f"{where}: eval_data must be a list of shard sets (\"shards/cifar100-32\") or tables "
                            "({name = \"stl10\", source = \"stl10:PATH\"})")
    entries: list[EvalData] = []
    for n, item in enumerate(value, 1):
        if isinstance(item, str) and item.strip():
            entry = EvalData(Path(item.rstrip("/")).name or item, path=item)
        elif isinstance(item, dict):
            item = dict(item)
            name, path, source = item.pop("name", None), item.pop("path", None), item.get("source")
            if (path is None) == (source is None) or (path is not None and item):
                raise PipelineError(f"{where}: eval_data entry {n} needs either path = \"SHARDS\" or source = "
                                    "\"SOURCE\" with [prepare] settings, not both")
            unknown = sorted(set(item) - PREPARE_SETTINGS - {"source"})
            if unknown:
                raise PipelineError(f"{where}: eval_data entry {n} has unknown setting(s) {', '.join(unknown)} "
                                    f"(name, path, source, {', '.join(sorted(PREPARE_SETTINGS))})")
            if not isinstance(path or source, str):
                raise PipelineError(f"{where}: eval_data entry {n}: path and source are text")
            default = Path(path.rstrip("/")).name if path else str(source).split(":", 1)[0]
            entry = EvalData(name if name is not None else default, path=path, prepare=item if source else {})
        else:
            raise PipelineError(f"{where}: eval_data entry {n} must be a shard-set path or a table, got {item!r}")
        if not isinstance(entry.name, str) or not _NAME.fullmatch(entry.name):
            raise PipelineError(f"{where}: eval_data entry {n} needs a name of letters, digits, '.', '-' or '_' "
                                f"(got {entry.name!r}): add name = \"...\"")
        if entry.name in {e.name for e in entries}:
            raise PipelineError(f"{where}: two eval_data entries are named {entry.name!r}: name them apart")
        entries.append(entry)
    return entries


def transfer_groups(rows: list[dict]) -> list[dict]:
    """One line per (arm, evaluation data): mean and sample sd over seeds of each measure."""
    out = []
    for key in dict.fromkeys((r["arm"], r["eval_data"]) for r in rows):
        rs = [r for r in rows if (r["arm"], r["eval_data"]) == key]
        line = {"arm": key[0], "eval_data": key[1], "pretrained_on": rs[0].get("pretrained_on"),
                "seeds": [r["seed"] for r in rs], "input": rs[0].get("input"), "eval": rs[0].get("eval")}
        for m in rs[0]["measures"]:
            v = [r[m] for r in rs if r.get(m) is not None]
            line[m] = float(np.mean(v)) if v else None
            line[f"{m}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else None
        line["measures"] = rs[0]["measures"]
        out.append(line)
    return out


def transfer_markdown(rows: list[dict]) -> list[str]:
    """The results table's transfer part: pre-trained on A, evaluated on B, per arm and data set."""
    if not rows:
        return []
    groups = transfer_groups(rows)
    measures = list(dict.fromkeys(m for g in groups for m in g["measures"]))
    lines = ["", "Transfer: each arm's encoder finetuned and measured on other data (the same [eval] settings; "
             "accuracies in %, mean ± sd over seeds):", "",
             "| arm | pre-trained on | evaluated on | input px | seeds | " + " | ".join(measures) + " | test samples |",
             "| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in measures) + " | ---: |"]
    for g in groups:
        inp = g.get("input") or {}
        size = inp.get("size") or "-"
        if inp.get("size") and inp.get("data_size") not in (None, inp.get("size")):
            size = f"{inp['data_size']} -> {inp['size']}"
        cells = ["-" if g.get(m) is None else f"{100 * g[m]:.2f}"
                 + (f" ± {100 * g[f'{m}_std']:.2f}" if g.get(f"{m}_std") is not None else "") for m in measures]
        ev = g.get("eval") or {}
        lines.append(f"| {g['arm']} | {g.get('pretrained_on') or '-'} | {g['eval_data']} | {size} | "
                     f"{len(g['seeds'])} | " + " | ".join(cells) + f" | {ev.get('samples', '-')} |")
    return lines


__all__ = ["EvalData", "parse_eval_data", "transfer_groups", "transfer_markdown"]
