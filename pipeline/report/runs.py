"""What a report reads from a run folder: config, metrics, selection rounds and their manifests, results."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.evaluation.measures import robust_measures
from pipeline.runlayout import RunLayout
from pipeline.validate import Fields, parse_json, parse_toml
from pipeline.shards.manifest import Manifest, round_paths


@dataclass
class RunRecord:
    path: Path
    config: dict
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # selection records, joined with their manifests
    results: list[dict] = field(default_factory=list)  # one per (checkpoint, protocol-measure)
    accounting: list[dict] = field(default_factory=list)  # per subset epoch: what selection cost and saved
    warnings: list[dict] = field(default_factory=list)
    certifications: list[dict] = field(default_factory=list)  # certify.json summaries, with "tsv" and "name"
    divergence: list[tuple[int, float]] = field(default_factory=list)  # (epochs done, RD(U)) of a run with a U

    @property
    def warmup_epochs(self) -> int:
        """Epochs before the first one that trained on a subset (all of them when none did)."""
        return next((i for i, e in enumerate(self.epochs) if e.get("subset_round") is not None), len(self.epochs))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """The run's name and what it trained on: a selector and its fraction, a manifest and its size, the
        manifests of a folder, or all data; and a selective attack's share."""
        sel, data, attack = (self.config.get(k, {}) for k in ("select", "data", "attack"))
        if sel.get("selector"):
            what = f"{sel['selector']} {sel.get('fraction', 0):g}"
        elif data.get("manifest"):
            size = self.epochs[0].get("subset_size") if self.epochs else None
            what = f"manifest {Path(data['manifest']).name}" + (f", {size:,} images" if size else "")
        elif data.get("manifests"):
            what = f"manifests of {Path(data['manifests']).name}/"
        else:
            what = "all data"
        if attack.get("fraction", 1.0) < 1:
            what += f", attack on {attack['fraction']:.0%} ({attack.get('select', 'random')})"
        return f"{self.name} ({what})"

    @property
    def train_data(self) -> str:
        """The data it trained on: the shard set's folder name and the split."""
        data = self.config.get("data", {})
        return f"{Path(str(data.get('path') or '-')).name}, {data.get('split', 'train')} split"

    @property
    def start(self) -> float:
        """Wall-clock start of training: the first epoch's end less its duration."""
        return self.epochs[0]["time"] - self.epochs[0]["seconds"] if self.epochs else 0.0

    @property
    def train_seconds(self) -> float:
        return float(sum(e["seconds"] for e in self.epochs))

    @property
    def wall_seconds(self) -> float:
        """Training wall time, selection and stalls included: the epochs' own wall times where they record
        them (a stopped run's downtime is not in them), else first start to last end (runs of older versions:
        a resumed one counts its downtime too)."""
        if self.epochs and all("wall_s" in e for e in self.epochs):
            return float(sum(e["wall_s"] for e in self.epochs))
        return self.epochs[-1]["time"] - self.start if self.epochs else 0.0

    @property
    def images(self) -> int:
        return int(sum(e["images"] for e in self.epochs))

    @property
    def images_attacked(self) -> int:
        """Images whose adversarial views training crafted (a selective attack crafts a share; runs of versions
        before it attacked every image they trained on)."""
        return int(sum(e.get("images_attacked", e["images"]) for e in self.epochs))


def _jsonl(path: Path) -> list[dict]:
    """The records of a metrics file; a torn last line (the run was killed while writing it: the next resume
    cuts it) is left out, any other line that is not JSON is an error."""
    text = path.read_text()
    lines = text.splitlines()
    torn = bool(lines) and not text.endswith("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(parse_json(line))
            except json.JSONDecodeError:
                if torn and n == len(lines):
                    break
                raise PipelineError(f"{path}: line {n} is not JSON (an edited or foreign file?)") from None
    return out


def _check_certification(meta: Path, summary: dict) -> None:
    f = Fields(meta, summary, "certify again into a new folder")
    st = f.inner("settings")
    st.number("sigma", 0)
    st.int("n0", 1)
    st.int("n", 1)
    st.number("alpha", 0, 1)
    for key in ("samples", "abstained", "dims"):
        f.int(key)
    for key in ("linf_eps", "l2_radius_covering_linf_eps", "seconds_per_sample"):
        f.number(key, 0)
    f.number("certified_accuracy_at_linf_eps", 0, 1)
    for key in ("certified_accuracy", "linf_radius"):
        table = f.table(key)
        inner = f.inner(key, table)
        for radius in table:
            inner.number(radius, 0)


def _check_result(results: Path, digest: str, key: str, res: dict) -> None:
    f = Fields(results, res, "evaluate again (`pipeline eval`)", f"{digest}.{key}.")
    f.text("protocol")
    for name in robust_measures() + ["clean"]:
        f.number(name, 0, 1, optional=True)
    f.number("eps", 0, optional=True)
    f.int("samples", optional=True)


def load_run(path: str | Path) -> RunRecord:
    path = Path(path)
    run_files = RunLayout(path)
    if not run_files.metrics.is_file() or not run_files.config.is_file():
        raise PipelineError(f"{path}: not a training run (needs config.toml and metrics.jsonl); "
                            "train one with `pipeline train --out RUN`")
    try:
        config = parse_toml(run_files.config.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{run_files.config}: unreadable ({exc})") from None
    records = _jsonl(run_files.metrics)
    for n, rec in enumerate(records, 1):  # every field the report reads, by type
        f = Fields(f"{run_files.metrics}, record {n}", rec, "that line was edited or is foreign; remove it")
        kind = f.text("kind")
        if kind == "epoch":
            for key in ("epoch", "images"):
                f.int(key)
            for key in ("loss", "seconds", "time"):
                f.number(key)
            f.number("rd_u", optional=True)
        elif kind == "divergence":
            f.int("epoch")
            f.number("rd_u")
        elif kind == "selection":
            f.int("round")
        elif kind == "accounting":
            for key in ("images_not_attacked_total",):
                f.int(key)
            for key in ("selection_s_total", "saved_s_total", "net_s"):
                f.number(key)
    run = RunRecord(path, config, [r for r in records if r.get("kind") == "epoch"],
                    [r for r in records if r.get("kind") == "step"])
    if not run.epochs:
        raise PipelineError(f"{path}: no finished epoch in metrics.jsonl yet")
    run.divergence = ([(r["epoch"], r["rd_u"]) for r in records if r.get("kind") == "divergence"][:1] +
                      [(e["epoch"], e["rd_u"]) for e in run.epochs if e.get("rd_u") is not None])
    run.accounting = [r for r in records if r.get("kind") == "accounting"]
    run.warnings = [r for r in records if r.get("kind") == "selection_not_worth"]
    manifests = {n: p for n, p in round_paths(run_files.manifests)}
    previous_ids = None
    for rec in sorted((r for r in records if r.get("kind") == "selection"), key=lambda r: r["round"]):
        row = dict(rec)
        m = None
        if rec["round"] in manifests:
            try:
                m = Manifest.load(manifests[rec["round"]])
            except PipelineError:
                m = None
        if m is not None:
            ids = set(m.ids.tolist())
            row["kept_from_previous"] = (len(ids & previous_ids) / len(ids)) if previous_ids and ids else None
            row["timing"] = m.extra.get("timing", {})
            previous_ids = ids
        run.rounds.append(row)
    results = run_files.results
    if results.is_file():
        try:
            by_ckpt = parse_json(results.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # parse_json: deep nesting is one too
            raise PipelineError(f"{results}: not JSON (or nested beyond reason)") from None
        Fields(results, by_ckpt, "evaluate again (`pipeline eval`) after moving the file away")
        for digest, entry in by_ckpt.items():
            if not isinstance(entry, dict):
                continue
            for key, res in entry.items():
                if isinstance(res, dict) and "protocol" in res:
                    _check_result(results, digest, key, res)
                    run.results.append({"checkpoint": entry.get("checkpoint"), "digest": digest, "key": key, **res})
    for meta in run_files.certifications():
        try:
            summary = parse_json(meta.read_text())
        except (OSError, ValueError):
            continue  # a certification being written; the report shows the finished ones
        if "certified_accuracy" in summary:
            _check_certification(meta, summary)
            run.certifications.append({**summary, "name": meta.parent.name, "tsv": str(meta.parent / "certify.tsv")})
    return run


def robust_of(result: dict) -> tuple[str, float | None]:
    """The robust accuracy of the strongest attack a result holds (the lowest accuracy: the worst case), over
    the measures registered as robust."""
    measured = [(result[n], n) for n in robust_measures() if result.get(n) is not None]
    if not measured:
        return "-", None
    value, name = min(measured)
    return name, value


__all__ = ["RunRecord", "load_run", "robust_of"]
