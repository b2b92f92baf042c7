"""What an experiment file says, checked before anything runs.

`pipeline experiment CONFIG.toml`: a grid of arms trained and evaluated the same way, one after another.

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

Sizes: `[profile.NAME]` tables hold sections (training ones, [prepare], [experiment]) that replace the file's
when `experiment.profile = "NAME"`, so one file runs at the paper's size on a GPU and small on a CPU:
`pipeline experiment FILE --set experiment.profile=cpu`. `--set SECTION.KEY=VALUE` changes any setting of the
file, over the profile and over every arm.

`eval_data = [...]` in [experiment] (or in an arm, for that arm) adds transfer evaluations: each arm's encoder
finetuned and measured on other data sets as well (`experiment/transfer.py`).

[eval] may also say noise_sigma, smoothing and certify (randomized smoothing: the RUSH arm), e.g.
eval = {noise_sigma = 0.25, smoothing = "sigma=0.25,n=100", attack = "pgd20,eot-pgd20", certify = "n=10000,limit=500"}.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.smoothing import Smoothing
from pipeline.experiment.transfer import EvalData, parse_eval_data
from pipeline.kv import parse_kv
from pipeline.trainers import TRAINERS
from pipeline.trainers.subsets import check_rounds_land
from pipeline.validate import parse_toml

STATE = "experiment.json"


_OWN = ("experiment", "prepare", "arm", "profile")


@dataclass
class Arm:
    name: str
    overrides: dict  # section -> {key: value}, on top of the shared settings
    seeds: list[int]
    eval_data: list[EvalData] = field(default_factory=list)  # transfer evaluations after its own


@dataclass
class Experiment:
    path: Path
    out: Path
    shared: dict  # training config sections every arm starts from
    arms: list[Arm]
    prepare: dict = field(default_factory=dict)
    forced: dict = field(default_factory=dict)  # training settings of --set: over every arm's own

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


def _parse_sets(items, path) -> dict[str, dict]:
    """--set SECTION.KEY=VALUE items as {section: {key: value}}; VALUE is read as TOML (a number, a list, a table,
    a quoted string), else kept as text."""
    sets: dict[str, dict] = {}
    for item in items:
        key, eq, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not section or not name:
            raise PipelineError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. experiment.profile=cpu or "
                                "optim.epochs=2")
        if section in ("arm", "profile"):
            raise PipelineError(f"--set {item!r}: arms and profiles are set in {path} itself")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        sets.setdefault(section, {})[name] = value
    return sets


def _merged(raw: dict, sections: dict, where: str) -> dict:
    """`raw` with each section's settings replaced by `sections`' (one level deep: a table value replaces)."""
    out = dict(raw)
    for section, values in sections.items():
        out[section] = {**_table(out.get(section, {}), f"{where}: [{section}]"),
                        **_table(values, f"{where}: [{section}]")}
    return out


def _with_profile(raw: dict, sets: dict, path: Path) -> dict:
    """The file's settings under its chosen profile (experiment.profile, which --set may give), then --set's."""
    raw = _merged(raw, sets, str(path))
    name = _table(raw.get("experiment", {}), f"{path}: [experiment]").get("profile")
    if name is None:
        return raw
    profiles = _table(raw.get("profile", {}), f"{path}: [profile]")
    if name not in profiles:
        raise PipelineError(f"{path}: experiment.profile = {name!r}: the file has "
                            + (f"profiles {', '.join(profiles)}" if profiles else "no [profile.NAME] tables"))
    chosen = _table(profiles[name], f"{path}: [profile.{name}]")
    bad = sorted(k for k in chosen if k in ("arm", "profile"))
    if bad:
        raise PipelineError(f"{path}: [profile.{name}] may hold sections, not {', '.join(bad)}")
    return _merged(_merged(raw, chosen, f"{path}: [profile.{name}]"), sets, str(path))


def load_experiment(path: str | Path, out: str | Path | None = None, sets: list[str] = ()) -> Experiment:
    """The experiment file at `path`, checked; `sets`: --set SECTION.KEY=VALUE items over the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such experiment file")
    try:
        raw = parse_toml(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: malformed TOML ({exc})") from None
    forced = _parse_sets(sets, path)
    raw = _with_profile(raw, forced, path)
    forced = {k: v for k, v in forced.items() if k not in ("experiment", "prepare")}
    head = _table(raw.get("experiment", {}), f"{path}: [experiment]")
    unknown = set(head) - {"out", "seeds", "eval_data", "profile"}
    if unknown:
        raise PipelineError(f"{path}: [experiment] has unknown setting(s) {', '.join(sorted(unknown))} (out, seeds, "
                            "eval_data, profile)")
    seeds = _seeds(head.get("seeds", [0]), f"{path}: [experiment]")
    eval_data = parse_eval_data(head.get("eval_data", []), f"{path}: [experiment]")
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
        arm_data = parse_eval_data(a.pop("eval_data"), f"{path}: arm {name}") if "eval_data" in a else eval_data
        arms.append(Arm(name, {k: _table(v, f"{path}: arm {name}: {k}") for k, v in a.items()}, arm_seeds,
                        arm_data))
    named: dict = {}
    for arm in arms:  # one name, one evaluation data set: its prepared folder is shared
        for entry in arm.eval_data:
            if named.setdefault(entry.name, entry) != entry:
                raise PipelineError(f"{path}: arm {arm.name} gives eval_data {entry.name!r} another meaning than an "
                                    "earlier entry of that name: name them apart")
    for n, arm in enumerate(arms):  # pseudo-labels come from an arm trained before, with the same seeds
        earlier = {a.name: a for a in arms[:n]}
        for ref in _pseudo_refs(arm):
            where = "is not in the file" if ref not in names else ("is this arm" if ref == arm.name else "comes later")
            if ref not in earlier:
                raise PipelineError(f"{path}: arm {arm.name} takes pseudo-labels from arm {ref!r}, which {where}: "
                                    "name an arm given earlier in the file")
            missing = sorted(set(arm.seeds) - set(earlier[ref].seeds))
            if missing:
                raise PipelineError(f"{path}: arm {arm.name} takes pseudo-labels from arm {ref!r}, which has no run "
                                    f"with seed {missing[0]}: give both arms the same seeds")
    exp = Experiment(path, out, shared, arms, prepare, forced)
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


def arm_config(exp: Experiment, arm: Arm, seed: int, data_path: str):
    merged = copy.deepcopy(exp.shared)
    for section, values in [*arm.overrides.items(), *exp.forced.items()]:
        merged.setdefault(section, {}).update(
            {k: str(_pseudo_path(exp, _pseudo_ref(v), seed)) if _pseudo_ref(v) else v for k, v in values.items()}
            if isinstance(values, dict) else values)
    merged.setdefault("data", {})["path"] = str(data_path)
    merged.setdefault("run", {}).update(out=str(_run_folder(exp, arm.name, seed)), seed=seed)
    origin = f"{exp.path}: arm {arm.name}"
    cfg = TrainConfig.from_dict(merged, origin=origin)
    try:
        TRAINERS.lookup(cfg.method.name).complete_config(cfg)  # as `pipeline train` will: the same config.toml
        if cfg.eval.smoothing:
            Smoothing.parse(cfg.eval.smoothing)
        if cfg.eval.certify:
            certify_spec(cfg.eval.certify)
            if not (cfg.eval.smoothing or cfg.eval.noise_sigma):
                raise PipelineError("eval.certify needs the noise sigma: set eval.noise_sigma or eval.smoothing")
        cfg.validate()
        check_rounds_land(cfg)
        return cfg
    except PipelineError as exc:
        raise PipelineError(f"{origin}: {exc}") from None


CERTIFIED_COLUMNS = ("0.25", "0.5")


def certify_spec(text: str | dict) -> dict:
    """"n0=100,n=10000,alpha=0.001[,limit=N][,batch=B]" of [eval] certify."""
    kinds = {"n0": int, "n": int, "alpha": float, "limit": int, "batch": int}
    return {"n0": 100, "n": 100_000, "alpha": 0.001,
            **parse_kv(text, "eval.certify", kinds, "n0=100,n=10000,limit=500")}
