"""`pipeline experiment CONFIG.toml`: a grid of arms trained and evaluated the same way, one after another.

An experiment file is a training config (the sections of `pipeline train --config`, shared by every arm) plus
three things of its own:

    [experiment]  out = "runs/experiments/NAME", seeds = [0, 1, 2]
    [prepare]     the shard set every arm trains on: source, out, image_size, per_class, workers, seed
                  (prepared once; a complete set is reused, an interrupted one resumed)
    [[arm]]       name = "rcs-0.2", then any sections it changes, e.g. select = {selector = "rcs", fraction = 0.2}

A setting given as "pseudo-labels:ARM" names the k-means pseudo-labels (AdvCL's five counts) of the encoder
that arm ARM trained with the same seed: made once, after that arm, under OUT/pseudo-labels/ (e.g.
advcl = {pseudo_labels = "pseudo-labels:simclr"}, with the simclr arm earlier in the file).

Each (arm, seed) is a run folder OUT/runs/ARM-sSEED with the usual config.toml, so any arm can be rerun by
hand with `pipeline train --config OUT/runs/ARM-sSEED/config.toml`. Progress is kept in OUT/experiment.json
after every arm: an interrupted experiment resumes with the arms it has not finished (an arm interrupted
mid-training continues from its last epoch); an arm whose training settings changed since is trained again, one
whose [eval] settings alone changed is only evaluated again.

[eval] may also say noise_sigma, smoothing and certify (randomized smoothing: the RUSH arm), e.g.
eval = {noise_sigma = 0.25, smoothing = "sigma=0.25,n=100", attack = "pgd20,eot-pgd20", certify = "n=10000,limit=500"}.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w

from pipeline.atomic import atomic_path, write_json
from pipeline.checkpoint import load_checkpoint
from pipeline.config import TrainConfig, load_config
from pipeline.dist import resolve_device
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate
from pipeline.evaluation.certify import certify
from pipeline.evaluation.measures import list_measures
from pipeline.evaluation.smoothing import Smoothing
from pipeline.kv import parse_kv
from pipeline.locks import folder_lock
from pipeline.progress import console
from pipeline.pseudolabels import DEFAULT_COUNTS, make_pseudo_labels
from pipeline.report import build_report, load_run
from pipeline.runlayout import RunLayout
from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.trainers import TRAINERS, create_trainer
from pipeline.trainers.runfolder import start_fresh
from pipeline.trainers.subsets import PRUNERS

STATE = "experiment.json"
_OWN = ("experiment", "prepare", "arm")


@dataclass
class Arm:
    name: str
    overrides: dict  # section -> {key: value}, on top of the shared settings
    seeds: list[int]


@dataclass
class Experiment:
    path: Path
    out: Path
    shared: dict  # training config sections every arm starts from
    arms: list[Arm]
    prepare: dict = field(default_factory=dict)

    def runs(self) -> list[tuple[Arm, int, str]]:
        return [(arm, seed, f"{arm.name}-s{seed}") for arm in self.arms for seed in arm.seeds]


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise PipelineError(f"{where} must be a table of settings")
    return value


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and s >= 0 for s in value):
        raise PipelineError(f"{where}: seeds must be a non-empty list of whole numbers >= 0, e.g. [0, 1, 2]")
    return value


def load_experiment(path: str | Path, out: str | Path | None = None) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such experiment file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: malformed TOML ({exc})") from None
    head = _table(raw.get("experiment", {}), f"{path}: [experiment]")
    unknown = set(head) - {"out", "seeds"}
    if unknown:
        raise PipelineError(f"{path}: [experiment] has unknown setting(s) {', '.join(sorted(unknown))} (out, seeds)")
    seeds = _seeds(head.get("seeds", [0]), f"{path}: [experiment]")
    out = Path(out or head.get("out") or Path("runs") / "experiments" / path.stem)
    prepare = _table(raw.get("prepare", {}), f"{path}: [prepare]")
    shared = {k: _table(v, f"{path}: [{k}]") for k, v in raw.items() if k not in _OWN}
    if not prepare and not shared.get("data", {}).get("path"):
        raise PipelineError(f"{path}: no data: give a [prepare] section or data.path")
    arms_raw = raw.get("arm")
    if not isinstance(arms_raw, list) or not arms_raw:
        raise PipelineError(f"{path}: no arms: add [[arm]] tables, each with a name and the settings it changes")
    arms, names = [], set()
    for n, a in enumerate(arms_raw, 1):
        a = dict(_table(a, f"{path}: arm {n}"))
        name = a.pop("name", None)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise PipelineError(f"{path}: arm {n} needs a name of letters, digits, '.', '-' or '_' (got {name!r})")
        if name in names:
            raise PipelineError(f"{path}: two arms are named {name!r}")
        names.add(name)
        arm_seeds = _seeds(a.pop("seeds"), f"{path}: arm {name}") if "seeds" in a else seeds
        arms.append(Arm(name, {k: _table(v, f"{path}: arm {name}: {k}") for k, v in a.items()}, arm_seeds))
    exp = Experiment(path, out, shared, arms, prepare)
    for arm in arms:  # every arm's settings are checked before anything runs
        arm_config(exp, arm, arm.seeds[0], data_path=shared.get("data", {}).get("path") or "-")
    return exp


PSEUDO = "pseudo-labels:"


def _pseudo_ref(value) -> str | None:
    """ARM of a "pseudo-labels:ARM" setting, None for any other value."""
    return value[len(PSEUDO):] if isinstance(value, str) and value.startswith(PSEUDO) else None


def _pseudo_refs(arm: Arm) -> list[str]:
    return [r for values in arm.overrides.values() if isinstance(values, dict)
            for r in map(_pseudo_ref, values.values()) if r]


def _run_folder(exp: Experiment, arm: str, seed: int) -> Path:
    return exp.out / "runs" / f"{arm}-s{seed}"


def _pseudo_path(exp: Experiment, ref: str, seed: int) -> Path:
    return exp.out / "pseudo-labels" / f"{ref}-s{seed}.json"


def _ensure_pseudo_labels(exp: Experiment, arm: Arm, seed: int, data_path: str, progress: bool) -> None:
    for ref in _pseudo_refs(arm):
        path = _pseudo_path(exp, ref, seed)
        if path.is_file():
            continue
        ckpt = RunLayout(_run_folder(exp, ref, seed)).last
        if ref not in {a.name for a in exp.arms} or not ckpt.is_file():
            raise PipelineError(f"{exp.path}: arm {arm.name} takes pseudo-labels from arm {ref!r}, seed {seed}, "
                                f"which has no trained run ({ckpt}): put that arm earlier in the file")
        console.print(f"pseudo-labels of {ckpt} -> {path}")
        make_pseudo_labels(data_path, ckpt, DEFAULT_COUNTS, seed=seed, progress=progress).save(path)


def arm_config(exp: Experiment, arm: Arm, seed: int, data_path: str):
    merged = copy.deepcopy(exp.shared)
    for section, values in arm.overrides.items():
        merged.setdefault(section, {}).update(
            {k: str(_pseudo_path(exp, _pseudo_ref(v), seed)) if _pseudo_ref(v) else v for k, v in values.items()}
            if isinstance(values, dict) else values)
    merged.setdefault("data", {})["path"] = str(data_path)
    merged.setdefault("run", {}).update(out=str(_run_folder(exp, arm.name, seed)), seed=seed)
    origin = f"{exp.path}: arm {arm.name}"
    cfg = TrainConfig.from_dict(merged, origin=origin)
    try:
        TRAINERS.get(cfg.method.name).complete_config(cfg)  # as `pipeline train` will: the same config.toml
        if cfg.eval.smoothing:
            Smoothing.parse(cfg.eval.smoothing)
        if cfg.eval.certify:
            certify_spec(cfg.eval.certify)
            if not (cfg.eval.smoothing or cfg.eval.noise_sigma):
                raise PipelineError("eval.certify needs the noise sigma: set eval.noise_sigma or eval.smoothing")
        return cfg.validate()
    except PipelineError as exc:
        raise PipelineError(f"{origin}: {exc}") from None


def _training(cfg) -> dict:
    """The settings training depends on: everything but [eval] (a new evaluation never retrains), and only those
    that differ from the defaults, so that a setting added to a later version (at its default) does not make
    every finished run look changed."""
    defaults = TrainConfig()
    defaults.method.name = cfg.method.name  # the same method sections
    base = defaults.to_dict()
    return {section: {k: v for k, v in values.items() if base.get(section, {}).get(k, _MISSING) != v}
            for section, values in cfg.to_dict().items() if section != "eval"}


_MISSING = object()


def _digest(settings: dict) -> str:
    return hashlib.sha256(tomli_w.dumps(settings).encode()).hexdigest()[:16]


def _prepare(exp: Experiment, progress: bool) -> str:
    if not exp.prepare:
        return exp.shared["data"]["path"]

    p = dict(exp.prepare)
    source = p.pop("source", None)
    if not source:
        raise PipelineError(f"{exp.path}: [prepare] needs source = \"folder:PATH\" (or cifar10:PATH, digits, ...)")
    allowed = {"out", "image_size", "jpeg_quality", "per_class", "workers", "seed", "shard_size", "formats", "test_fraction"}
    if set(p) - allowed:
        raise PipelineError(f"{exp.path}: [prepare] has unknown setting(s) {', '.join(sorted(set(p) - allowed))} "
                            f"({', '.join(sorted(allowed))})")
    if "formats" in p:
        p["formats"] = tuple(p["formats"])
    p.setdefault("out", exp.out / "shards")
    result = prepare(source, PrepareOptions(progress=progress, **p))
    return str(result.out)


def _fraction(cfg) -> float | None:
    """The share of the data an arm trains on: 1 without a selector, None where the size follows the losses."""
    if not cfg.select.selector:
        return 1.0
    pruner = PRUNERS[cfg.select.selector] if cfg.select.selector in PRUNERS else None
    return None if pruner is not None and not pruner.fixed_fraction else cfg.select.fraction


def _train(cfg, progress: bool) -> str:
    """Train (or finish training) one arm's run; returns what was done."""

    run = RunLayout(cfg.run.out)
    last = run.last
    resume, note = False, "trained"
    if last.is_file() and run.config.is_file():
        same = _training(load_config(run.config)) == _training(cfg)
        done = int(load_checkpoint(last).get("epoch") or 0) if same else 0
        if same and done >= cfg.optim.epochs:
            return "already trained"
        resume = same and done > 0
        note = f"resumed after epoch {done}" if resume else "settings changed: trained afresh"
    if not resume:
        start_fresh(run.root, overwrite=True)
    trainer = create_trainer(cfg, resume=resume, progress=progress)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return note


def _evaluate(cfg, seed: int, progress: bool) -> dict:
    e = cfg.eval
    result = evaluate(cfg.data.path, RunLayout(cfg.run.out).last, e.protocol, e.attack,
                      e.recipe or None, e.epochs or None, e.lr or None, e.batch_size or None, limit=e.limit or None,
                      device=_device(cfg), eps=e.eps or None, step=e.step or None, steps=e.steps, seed=e.seed + seed,
                      progress=progress, noise_sigma=e.noise_sigma, smoothing=e.smoothing or None)
    if e.certify:
        c = certify_spec(e.certify)
        sigma = result["smoothing"]["sigma"] if result["smoothing"] else e.noise_sigma
        summary = certify(cfg.data.path, result["classifier_path"] or result["checkpoint"], sigma, c["n0"], c["n"],
                          c["alpha"], c.get("limit"), protocol=e.protocol, batch=c.get("batch", 4096),
                          seed=e.seed + seed, device=_device(cfg), progress=progress, eps=e.eps or None)
        for radius, acc in summary["certified_accuracy"].items():
            result[f"certified@{radius}"] = acc
        result["measures"] = result["measures"] + [f"certified@{r}" for r in CERTIFIED_COLUMNS]
        result["certify"] = {k: summary[k] for k in ("samples", "abstained", "seconds_per_sample", "out")}
    return result


CERTIFIED_COLUMNS = ("0.25", "0.5")


def certify_spec(text: str | dict) -> dict:
    """"n0=100,n=10000,alpha=0.001[,limit=N][,batch=B]" of [eval] certify."""
    kinds = {"n0": int, "n": int, "alpha": float, "limit": int, "batch": int}
    return {"n0": 100, "n": 100_000, "alpha": 0.001,
            **parse_kv(text, "eval.certify", kinds, "n0=100,n=10000,limit=500")}


def _device(cfg):
    return resolve_device(cfg.run.device)


def _row(arm: Arm, seed: int, cfg, result: dict) -> dict:
    run = load_run(cfg.run.out)
    rounds = run.rounds
    measures = [m for m in result["measures"]]
    return {
        "arm": arm.name, "seed": seed, "run": cfg.run.out, "method": cfg.method.name,
        "selector": cfg.select.selector or "-", "fraction": _fraction(cfg),
        **{m: result.get(m) for m in measures},
        "train_s": round(run.train_seconds, 2), "images": run.images, "epochs": len(run.epochs),
        "rounds": len(rounds), "selection_s": round(sum(r.get("wall_s") or r.get("selection_s") or 0 for r in rounds), 2),
        "selection_process_s": round(sum(r.get("process_s") or 0 for r in rounds), 2),
        "stall_s": round(sum(r.get("stall_s") or 0 for r in rounds), 2),
        "eval": {k: result.get(k) for k in ("protocol", "recipe", "eps", "samples", "checkpoint_sha256", "noise_sigma",
                                            "smoothing", "certify")},
    }


def run_experiment(exp: Experiment, progress: bool = True, only: list[str] | None = None) -> list[dict]:
    """Run every (arm, seed) not yet done; returns one row per finished run (in the file's order)."""
    if only:
        missing = sorted(set(only) - {a.name for a in exp.arms})
        if missing:
            raise PipelineError(f"--only {','.join(missing)}: no such arm in {exp.path} "
                                f"({', '.join(a.name for a in exp.arms)})")
    exp.out.mkdir(parents=True, exist_ok=True)
    with folder_lock(exp.out, "pipeline experiment"):
        state_path = exp.out / STATE
        state = _read_state(state_path)
        data_path = _prepare(exp, progress)
        todo = exp.runs()
        for n, (arm, seed, run_id) in enumerate(todo, 1):
            if only and arm.name not in only:
                continue
            cfg = arm_config(exp, arm, seed, data_path)
            digest, eval_digest = _digest(_training(cfg)), _digest(cfg.to_dict()["eval"])
            kept = state["runs"].get(run_id)
            trained = kept and kept.get("digest") == digest and RunLayout(cfg.run.out).last.is_file()
            if trained and kept.get("eval_digest", eval_digest) == eval_digest:
                console.print(f"[{n}/{len(todo)}] {run_id}: done earlier, kept")
                continue
            started = time.perf_counter()
            if trained:
                note = "trained earlier, evaluation settings changed"
            else:
                console.print(f"[{n}/{len(todo)}] {run_id}: training ({cfg.run.out}/config.toml)")
                _ensure_pseudo_labels(exp, arm, seed, data_path, progress)
                note = _train(cfg, progress)
                if note == "already trained" and kept and kept.get("eval_digest") == eval_digest:
                    # the run folder holds these settings' finished training (the record's digest was taken
                    # by an older version): its evaluation stands
                    state["runs"][run_id] = {**kept, "digest": digest}
                    write_json(state_path, state)
                    console.print(f"[{n}/{len(todo)}] {run_id}: done earlier, kept")
                    continue
            console.print(f"[{n}/{len(todo)}] {run_id}: {note}; evaluating")
            row = _row(arm, seed, cfg, _evaluate(cfg, seed, progress))
            row["experiment_s"] = round(time.perf_counter() - started, 1)
            state["runs"][run_id] = {"digest": digest, "eval_digest": eval_digest, "row": row}
            write_json(state_path, state)  # after every arm: an interruption loses at most the arm in flight
        rows = [state["runs"][rid]["row"] for _, _, rid in todo if rid in state["runs"]]
        write_results(exp, rows)
    return rows


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {"format": "pipeline.experiment", "runs": {}}
    try:
        state = json.loads(path.read_text())
        if state.get("format") != "pipeline.experiment" or not isinstance(state.get("runs"), dict):
            raise ValueError
        return state
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise PipelineError(f"{path}: not an experiment record (edited or foreign?); move it away to start the "
                            "experiment afresh") from None


def _mean_std(values) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def measure_columns() -> list[str]:
    """Every registered measure, in registration order, then the certified accuracies."""
    return [*list_measures(), *(f"certified@{r}" for r in CERTIFIED_COLUMNS)]


def summarize(rows: list[dict]) -> list[dict]:
    """One line per arm: mean and sample standard deviation (n-1) over its seeds."""
    measures = [k for k in measure_columns() if any(r.get(k) is not None for r in rows)]
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        line = {"arm": arm, "method": rs[0].get("method", "-"), "selector": rs[0]["selector"], "fraction": rs[0]["fraction"], "seeds": [r["seed"] for r in rs]}
        for key in (*measures, "train_s", "images", "selection_s", "stall_s"):
            line[key], line[f"{key}_std"] = _mean_std(r.get(key) for r in rs)
        out.append(line)
    return out


def _pm(mean, std, pct: bool = False, digits: int = 1) -> str:
    if mean is None:
        return "-"
    if pct:
        return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
    return f"{mean:,.{digits}f}" + (f" ± {std:,.{digits}f}" if std is not None else "")


def results_markdown(exp: Experiment, rows: list[dict]) -> str:
    groups = summarize(rows)
    measures = [k for k in measure_columns() if any(g.get(k) is not None for g in groups)]
    ev = rows[0]["eval"] if rows else {}
    lines = [f"# Experiment {exp.path.name}", "",
             f"{len(rows)} runs; evaluation {str(ev.get('protocol', '-')).upper()} ({ev.get('recipe')} recipe), "
             f"eps {ev.get('eps', 0):.4g}, {ev.get('samples')} test samples. Accuracies in %, mean ± sample standard "
             "deviation over seeds; times in seconds of training epochs (selection overlapped).", ""]
    for arm in dict.fromkeys(r["arm"] for r in rows):  # arms measured otherwise say how
        ev_arm = next(r["eval"] for r in rows if r["arm"] == arm)
        if ev_arm.get("smoothing") or ev_arm.get("noise_sigma") or ev_arm.get("samples") != ev.get("samples"):
            sm, c = ev_arm.get("smoothing") or {}, ev_arm.get("certify") or {}
            lines.append(f"- {arm}: {ev_arm.get('samples')} test samples; finetuned with noise sigma "
                         f"{ev_arm.get('noise_sigma') or 0:g}" + (f"; smoothed classifier sigma {sm['sigma']:g}, n "
                         f"{sm['n']}, alpha {sm['alpha']:g}, EOT draws {sm['eot']} (abstentions are errors)" if sm else "")
                         + (f"; certified on {c['samples']} samples" if c else ""))
    lines += ["",
             "| arm | method | selector | fraction | seeds | " + " | ".join(measures) +
             " | train s | images trained on | selection s | stall s |",
             "| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in measures) + " | ---: | ---: | ---: | ---: |"]
    for g in groups:
        lines.append(f"| {g['arm']} | {g['method']} | {g['selector']} | {'-' if g['fraction'] is None else format(g['fraction'], 'g')} | "
                     f"{len(g['seeds'])} | "
                     + " | ".join(_pm(g[m], g[f"{m}_std"], True) for m in measures)
                     + f" | {_pm(g['train_s'], g['train_s_std'])} | {_pm(g['images'], None, digits=0)} | "
                     + (f"{_pm(g['selection_s'], g['selection_s_std'])} | {_pm(g['stall_s'], None, digits=2)} |"
                        if g["selector"] != "-" else "- | - |"))
    lines += ["", "Every run:", "", "| run | " + " | ".join(measures) + " | train s | images | rounds | selection s | "
              "selection process s | stall s |", "| --- | " + " | ".join("---:" for _ in measures) +
              " | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['arm']}-s{r['seed']} | " + " | ".join(
            "-" if r.get(m) is None else f"{100 * r[m]:.2f}" for m in measures) +
            f" | {r['train_s']:.1f} | {r['images']:,} | {r['rounds']} | {r['selection_s']:.1f} | "
            f"{r['selection_process_s']:.1f} | {r['stall_s']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(exp: Experiment, rows: list[dict]) -> list[Path]:
    """OUT/results.md and results.json; OUT/report/ (figures, the trade-off plot) through `pipeline report`."""
    if not rows:
        return []
    md = exp.out / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text(results_markdown(exp, rows))
    write_json(exp.out / "results.json", {"experiment": str(exp.path), "rows": rows, "arms": summarize(rows)})

    report, _ = build_report([r["run"] for r in rows], exp.out / "report")
    return [md, exp.out / "results.json", report]


__all__ = ["Arm", "Experiment", "arm_config", "load_experiment", "results_markdown", "run_experiment", "summarize"]
