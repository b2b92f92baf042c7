"""Running an experiment: prepare once, then train, evaluate (and certify) every (arm, seed) not yet done,
recording each in OUT/experiment.json as it finishes."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import tomli_w

from pipeline.atomic import move_aside, write_json
from pipeline.checkpoint import load_checkpoint
from pipeline.config import TrainConfig, load_config
from pipeline.dist import resolve_device
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate
from pipeline.evaluation.certify import certify
from pipeline.experiment.spec import (
    CERTIFIED_COLUMNS,
    STATE,
    Arm,
    Experiment,
    _pseudo_path,
    _pseudo_refs,
    _run_folder,
    arm_config,
    certify_spec,
)
from pipeline.experiment.table import check_outputs, measure_columns, write_results
from pipeline.experiment.transfer import PREPARE_SETTINGS, EvalData
from pipeline.locks import folder_lock
from pipeline.progress import console
from pipeline.pseudolabels import DEFAULT_COUNTS, make_pseudo_labels
from pipeline.report import load_run
from pipeline.runlayout import RunLayout
from pipeline.shards.shardset import ShardSet
from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.trainers import create_trainer
from pipeline.trainers.runfolder import start_fresh
from pipeline.trainers.subsets import PRUNERS
from pipeline.validate import Fields, parse_json


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


def _training(cfg) -> dict:
    """The settings training depends on: everything but [eval] (a new evaluation never retrains), and only those
    that differ from the defaults, so that a setting added to a later version (at its default) does not make
    every finished run look changed."""
    defaults = TrainConfig()
    defaults.method.name = cfg.method.name  # the same method sections
    base = defaults.to_dict()
    return {section: {k: v for k, v in values.items()
                      if base.get(section, {}).get(k, _MISSING) != v and f"{section}.{k}" not in _NOT_TRAINING}
            for section, values in cfg.to_record().items() if section != "eval"}


_MISSING = object()
_NOT_TRAINING = {"run.loggers", "run.wandb_project", "run.wandb_mode"}  # where curves go: adding one never retrains


def _digest(settings: dict) -> str:
    return hashlib.sha256(tomli_w.dumps(settings).encode()).hexdigest()[:16]


def _prepare(exp: Experiment, progress: bool) -> str:
    if not exp.prepare:
        return exp.shared["data"]["path"]
    return _prepared(exp, exp.prepare, exp.out / "shards", "[prepare]", progress)


def _prepared(exp: Experiment, settings: dict, out: Path, where: str, progress: bool) -> str:
    """The shard set `settings` (source + [prepare] settings) describes, prepared (or resumed) at its `out`."""
    p = dict(settings)
    source = p.pop("source", None)
    if not source:
        raise PipelineError(f"{exp.path}: {where} needs source = \"folder:PATH\" (or cifar10:PATH, digits, ...)")
    if set(p) - PREPARE_SETTINGS:
        raise PipelineError(f"{exp.path}: {where} has unknown setting(s) {', '.join(sorted(set(p) - PREPARE_SETTINGS))} "
                            f"({', '.join(sorted(PREPARE_SETTINGS))})")
    for key in ("formats", "splits"):
        if key in p:
            p[key] = tuple(p[key])
    p.setdefault("out", out)
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


def _evaluate(cfg, seed: int, progress: bool, data: str | None = None) -> dict:
    """The arm's evaluation on its own data (certified too where [eval] says so), or on `data` (transfer)."""
    e = cfg.eval
    result = evaluate(data or cfg.data.path, RunLayout(cfg.run.out).last, e.protocol, e.attack,
                      e.recipe or None, e.epochs or None, e.lr or None, e.batch_size or None, limit=e.limit or None,
                      eval_batch_size=e.test_batch_size, device=_device(cfg), eps=e.eps or None, step=e.step or None, steps=e.steps, seed=e.seed + seed,
                      progress=progress, noise_sigma=e.noise_sigma, smoothing=e.smoothing or None,
                      limits=e.limits or None, resize=e.resize)
    if e.certify and data is None:
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


def _device(cfg):
    return resolve_device(cfg.run.device)


def _eval_settings(cfg) -> dict:
    """[eval] as the evaluation record's digest takes it: settings added since (at their defaults) left out, so
    that a finished experiment is not evaluated again by a newer version."""
    defaults = TrainConfig().eval
    return {k: v for k, v in cfg.to_dict()["eval"].items()
            if not (k in _EVAL_ADDED and v == getattr(defaults, k))}


_EVAL_ADDED = {"resize"}


def _transfer_row(arm: Arm, seed: int, cfg, entry: EvalData, location: str, result: dict) -> dict:
    measures = list(result["measures"])
    return {"arm": arm.name, "seed": seed, "run": cfg.run.out, "eval_data": entry.name, "data": location,
            "dataset_fingerprint": result["dataset_fingerprint"],
            "pretrained_on": (result.get("pretrained_on") or {}).get("name"), "input": result.get("input"),
            "measures": measures, **{m: result.get(m) for m in measures},
            "eval": {k: result.get(k) for k in ("protocol", "recipe", "eps", "samples", "measure_samples",
                                                "checkpoint_sha256")}}


def _eval_data(exp: Experiment, arms: list[Arm], progress: bool) -> dict[str, tuple[str, str]]:
    """Every evaluation data set these arms name: {name: (location, fingerprint)}, prepared (or resumed) first,
    before any training, so that a wrong path fails in the first minute, not after the first arm."""
    found = {}
    for entry in (e for arm in arms for e in arm.eval_data):
        if entry.name not in found:
            location = entry.location(exp.out)
            if entry.prepare:
                location = _prepared(exp, entry.prepare, Path(location), f"eval_data {entry.name}", progress)
            found[entry.name] = (location, ShardSet.open(location).fingerprint)
    return found


def _transfers(arm: Arm, seed: int, cfg, record: dict, eval_digest: str, data: dict, progress: bool,
               say) -> bool:
    """Evaluate the run on each of its arm's eval_data not measured with these settings yet; True if any was."""
    done = record.setdefault("transfer", {})
    changed = False
    for entry in arm.eval_data:
        location, fingerprint = data[entry.name]
        kept = done.get(entry.name)
        if (kept and kept.get("eval_digest") == eval_digest and kept["row"].get("data") == location
                and kept["row"].get("dataset_fingerprint") == fingerprint):
            continue
        say(f"evaluating on {entry.name} ({location})")
        result = _evaluate(cfg, seed, progress, data=location)
        done[entry.name] = {"eval_digest": eval_digest, "row": _transfer_row(arm, seed, cfg, entry, location, result)}
        changed = True
    return changed


def _row(arm: Arm, seed: int, cfg, result: dict) -> dict:
    run = load_run(cfg.run.out)
    rounds = run.rounds
    measures = [m for m in result["measures"]]
    return {
        "arm": arm.name, "seed": seed, "run": cfg.run.out, "method": cfg.method.name,
        "selector": cfg.select.selector or "-", "fraction": _fraction(cfg),
        **{m: result.get(m) for m in measures},
        "train_s": round(run.train_seconds, 2), "wall_s": round(run.wall_seconds, 2), "images": run.images,
        "images_attacked": run.images_attacked,
        "epochs": len(run.epochs),
        "rounds": len(rounds), "selection_s": round(sum(r.get("wall_s") or r.get("selection_s") or 0 for r in rounds), 2),
        "selection_process_s": round(sum(r.get("process_s") or 0 for r in rounds), 2),
        "stall_s": round(sum(r.get("stall_s") or 0 for r in rounds), 2),
        "eval": {k: result.get(k) for k in ("protocol", "recipe", "eps", "samples", "measure_samples",
                                            "checkpoint_sha256", "noise_sigma", "smoothing", "certify")},
    }


def run_experiment(exp: Experiment, progress: bool = True, only: list[str] | None = None,
                   seeds: list[int] | None = None) -> list[dict]:
    """Run every (arm, seed) not yet done (of the arms in `only` and the seeds in `seeds`, when given); returns
    one row per finished run (in the file's order)."""
    if only:
        missing = sorted(set(only) - {a.name for a in exp.arms})
        if missing:
            raise PipelineError(f"--only {','.join(missing)}: no such arm in {exp.path} "
                                f"({', '.join(a.name for a in exp.arms)})")
    if seeds is not None:
        unknown = sorted(set(seeds) - {s for a in exp.arms for s in a.seeds})
        if unknown:
            raise PipelineError(f"--seeds {','.join(map(str, unknown))}: no arm of {exp.path} runs that seed")
    exp.out.mkdir(parents=True, exist_ok=True)
    with folder_lock(exp.out, "pipeline experiment"):
        check_outputs(exp)
        state_path = exp.out / STATE
        state = _read_state(state_path)
        data_path = _prepare(exp, progress)
        todo = exp.runs()
        eval_data = _eval_data(exp, [a for a in exp.arms if not only or a.name in only], progress)
        for n, (arm, seed, run_id) in enumerate(todo, 1):
            if (only and arm.name not in only) or (seeds is not None and seed not in seeds):
                continue
            cfg = arm_config(exp, arm, seed, data_path)
            digest, eval_digest = _digest(_training(cfg)), _digest(_eval_settings(cfg))
            kept = state["runs"].get(run_id)
            trained = kept and kept.get("digest") == digest and RunLayout(cfg.run.out).last.is_file()
            say = lambda text: console.print(f"[{n}/{len(todo)}] {run_id}: {text}")  # noqa: B023, E731
            if trained and kept.get("eval_digest", eval_digest) == eval_digest:
                say("done earlier, kept")
                if _transfers(arm, seed, cfg, kept, eval_digest, eval_data, progress, say):
                    write_json(state_path, state)
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
                    say("done earlier, kept")
                    if _transfers(arm, seed, cfg, state["runs"][run_id], eval_digest, eval_data, progress, say):
                        write_json(state_path, state)
                    continue
            console.print(f"[{n}/{len(todo)}] {run_id}: {note}; evaluating")
            row = _row(arm, seed, cfg, _evaluate(cfg, seed, progress))
            row["experiment_s"] = round(time.perf_counter() - started, 1)
            state["runs"][run_id] = {"digest": digest, "eval_digest": eval_digest, "row": row}
            write_json(state_path, state)  # after every arm: an interruption loses at most the arm in flight
            if _transfers(arm, seed, cfg, state["runs"][run_id], eval_digest, eval_data, progress, say):
                write_json(state_path, state)
        rows = [state["runs"][rid]["row"] for _, _, rid in todo if rid in state["runs"]]
        names = {a.name: {e.name for e in a.eval_data} for a in exp.arms}
        transfer = [t["row"] for arm, _, rid in todo if rid in state["runs"]
                    for name, t in state["runs"][rid].get("transfer", {}).items() if name in names[arm.name]]
        write_results(exp, rows, transfer)
    return rows


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {"format": "pipeline.experiment", "runs": {}}
    try:
        state = parse_json(path.read_text())
    except (ValueError, UnicodeDecodeError):  # ours, torn or damaged: kept aside; finished runs are found again
        aside = move_aside(path)
        console.print(f"[yellow]{path}: unreadable; kept as {aside.name}. Starting a new record: arms whose runs "
                      "finished are recognised by their run folders and only evaluated again[/]")
        return {"format": "pipeline.experiment", "runs": {}}
    if (not isinstance(state, dict) or state.get("format") != "pipeline.experiment"
            or not isinstance(state.get("runs"), dict)):
        raise PipelineError(f"{path}: not an experiment record (edited or foreign?); move it away to start the "
                            "experiment afresh")
    for run_id, kept in state["runs"].items():  # every field a resumed experiment reads
        f = Fields(path, kept, "move the file away to run the experiment afresh", f"runs.{run_id}.")
        f.text("digest")
        f.text("eval_digest", optional=True)
        row = f.table("row")
        r = f.inner("row", row)
        r.text("arm")
        r.int("seed")
        r.text("run")
        r.text("method", optional=True)
        row.setdefault("method", "-")  # records of versions before the column
        r.text("selector")
        if "fraction" not in row:
            r.fail("fraction", None, "is missing")
        if row["fraction"] is not None:
            r.number("fraction", 0, 1)
        r.table("eval")
        for name, t in f.table("transfer", optional=True).items() if "transfer" in kept else ():
            tf = Fields(path, t, "move the file away to run the experiment afresh", f"runs.{run_id}.transfer.{name}.")
            tf.text("eval_digest")
            tr = tf.inner("row", tf.table("row"))
            tr.text("arm")
            tr.int("seed")
            tr.text("data")
            tr.list("measures")
        for key in (*measure_columns(), "train_s", "wall_s", "images", "images_attacked", "selection_s", "stall_s"):
            r.number(key, optional=True)  # null where the arm did not measure it
    return state
