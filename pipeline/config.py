"""Training configuration: typed sections (ffcv-imagenet style), each setting declared once.

A setting is a dataclass field made by `setting(default, help, check=..., flag=...)`: its type (the field's
annotation), default, help text, rule and command-line flag live together, and everything else is derived
from that one declaration: `--set` and TOML coercion, the one-line error of a bad value (`check_value`), the
flags' help texts (`setting_help`), the written RUN/config.toml and the settings table of docs/SETTINGS.md
(`settings_markdown`; a test keeps the file in step). Fixed sections:

    [data] [model] [method] [attack] [optim] [run] [select] [eval]

and each method's own ([acl], [dynacl], ...), declared next to its trainer with `@register_section("acl")`
and validated like the fixed ones. `pipeline train --config FILE --set optim.lr=0.5 --epochs 20` applies
FILE, then each override in turn. Structured settings (`select.params`, `eval.smoothing`, `eval.certify`)
take `k=v,k=v` or a TOML table (`select.params = {k = 20, unit = "batch"}`), kept as the `k=v` text.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomli_w

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError
from pipeline.kv import format_kv, parse_kv
from pipeline.loggers import ALWAYS, LOGGERS
from pipeline.models import arch_choices, is_known_arch
from pipeline.redact import redacted
from pipeline.registry import Registry
from pipeline.shards.cache import parse_size
from pipeline.shards.crops import parse_crop
from pipeline.shards.storage import DataSource, ReadOptions
from pipeline.validate import parse_toml

# Rules: (test, what the value must be).
POSITIVE = (lambda v: v > 0, "must be > 0")
NONNEG = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_ONE = (lambda v: v >= 1, "must be at least 1")
WIDTH = (lambda v: 1 <= v <= 1 << 16, "must be between 1 and 65536 (a layer's width; wider ones exceed memory)")


def within(lo, hi, closed_lo: bool = True, closed_hi: bool = False):
    lo_ok = (lambda v: v >= lo) if closed_lo else (lambda v: v > lo)
    hi_ok = (lambda v: v <= hi) if closed_hi else (lambda v: v < hi)
    shown = f"{'[' if closed_lo else '('}{lo}, {hi}{']' if closed_hi else ')'}"
    return (lambda v: lo_ok(v) and hi_ok(v)), f"must be in {shown}"


def one_of(*choices):
    shown = ["empty" if c == "" else str(c) for c in choices]
    return (lambda v: v in choices), f"must be {', '.join(shown[:-1])} or {shown[-1]}"


def _parses(parse, shape: str):
    def test(v):
        try:
            parse(v)
            return True
        except PipelineError:
            return False
    return test, f"must be {shape}"


def setting(default, help: str = "", *, check=None, flag: str | None = None, table: bool = False):
    """A config field: `check` a rule (test, text); `flag` the command-line option that sets it; `table`: the
    value may be a TOML table (kept as its `k=v` text)."""
    meta = {"help": help, "check": check, "flag": flag, "table": table}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_READ = ReadOptions()


def _measure_limits(text) -> dict[str, int]:
    limits = parse_kv(text, "eval.limits")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in limits.values()):
        raise PipelineError(f"eval.limits = {text!r}: each value is a count of test samples, at least 1")
    return limits


def parse_resize(value) -> str | int:
    """eval.resize: "auto", "none" or a size in pixels (a whole number, or its digits)."""
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return text
    size = value if isinstance(value, int) and not isinstance(value, bool) else int(text) if text.isdigit() else 0
    if not 1 <= size <= 4096:
        raise PipelineError(f"eval.resize {value!r}: must be auto, none or an image size in pixels (1-4096), e.g. 32")
    return size


@dataclass
class DataConfig:
    path: str = setting("", "Shard-set folder, or its s3://, gs:// or http(s):// prefix.", flag="--data")
    split: str = setting("train", "Split to train on.")
    batch_size: int = setting(512, "Samples per step (per process).", check=AT_LEAST_ONE, flag="--batch-size")
    workers: int = setting(2, "Loader workers (0: read in the training process).", check=NONNEG, flag="--workers")
    worker_kind: str = setting("auto", "Loader workers as processes or as threads of the training process (the same "
                               "batches in the same order); auto: threads for images of 64 px and more, where "
                               "handing a batch from a process over costs more than the GIL.",
                               check=one_of("auto", "process", "thread"))
    backend: str = setting("auto", "Loader: auto | stream | indexed | ffcv.",
                           check=one_of("auto", "stream", "indexed", "ffcv"))
    manifest: str = setting("", "Train on this subset manifest.", flag="--manifest")
    manifests: str = setting("", "At each epoch, train on the newest valid manifest of this folder.",
                             flag="--manifests")
    use_weights: bool = setting(True, "Weight per-sample losses by a manifest's weights when it has them.")
    crop: str = setting("", "random-resized:SIZE[,scale=LO-HI][,ratio=LO-HI]: crop while decoding (one-view methods).",
                        check=_parses(parse_crop, "empty, none or random-resized:SIZE[,scale=LO-HI][,ratio=LO-HI]"))
    decode: str = setting("auto", "auto | cpu | device: JPEGs decoded on the GPU (nvJPEG) where torchvision can.",
                          check=one_of("auto", "cpu", "device"))
    read_gap: str = setting(_READ.max_gap, "Read neighbouring samples in one range across gaps up to this size "
                            "(auto: 16KiB from a folder, 4KiB from a URL).",
                            check=_parses(lambda v: v == "auto" or parse_size(v), "auto or a size such as 4KiB"))
    cache_dir: str = setting(_READ.cache_dir, "Local cache of a remote shard set's samples (empty: "
                             "$XDG_CACHE_HOME/pipeline/shards, else ~/.cache/pipeline/shards).")
    cache_limit: str = setting(_READ.cache_limit, "Disk the cache may take (10GB, 512MiB; 0: no cache); the least "
                               "recently read shards are evicted past it.",
                               check=_parses(parse_size, "a size such as 10GB, 512MiB or 0"))
    retries: int = setting(_READ.retries, "Retries of a failing remote read (timeouts, 5xx, dropped connections), "
                           "with exponential backoff.", check=NONNEG)
    timeout: float = setting(_READ.timeout, "Seconds a remote read may take before it counts as failed.",
                             check=POSITIVE)

    def source(self) -> DataSource:
        """Where the shard set is and how to read it."""
        return DataSource(self.path, ReadOptions(self.read_gap, self.cache_dir, self.cache_limit, self.retries,
                                                 self.timeout))


@dataclass
class ModelConfig:
    arch: str = setting("resnet18", "Encoder: a registered arch, wrn-DEPTH-WIDTH, module:PACKAGE.MODULE:FUNCTION (a model "
                        "of your own), an installed package's entry point, timm:NAME or torchvision:NAME.", flag="--arch")
    head_width: int = setting(512, "Hidden width of the projection head.", check=WIDTH)
    proj_dim: int = setting(512, "Output width of the projection head.", check=WIDTH)


@dataclass
class MethodConfig:
    name: str = setting("acl", "Training method (pipeline.trainers registry).", flag="--method")


@dataclass
class AttackConfig:
    eps: float = setting(0.0, "l_inf budget (0: 8/255 colour, 0.3 grey).", check=NONNEG)
    step: float = setting(0.0, "PGD step (0: eps / 4).", check=NONNEG)
    steps: int = setting(5, "PGD steps of the training attack.", check=AT_LEAST_ONE)
    fraction: float = setting(1.0, "Selective attack: adversarial views for this share of each batch only; the "
                                   "others enter the adversarial branch unperturbed (the loss keeps its form).",
                              check=within(0, 1, False, True), flag="--attack-fraction")
    select: str = setting("random", "Which samples of a batch are attacked when attack.fraction < 1: random, or "
                                    "the highest divergence or loss at their last attacked visit.",
                          flag="--attack-select")


@dataclass
class OptimConfig:
    optimizer: str = setting("lars", "lars | sgd.", check=one_of("lars", "sgd"), flag="--optimizer")
    lr: float = setting(5.0, "Peak learning rate.", check=POSITIVE, flag="--lr")
    momentum: float = setting(0.9, "Momentum.", check=within(0, 1))
    weight_decay: float = setting(1e-6, "Weight decay.", check=NONNEG)
    epochs: int = setting(1000, "Training epochs.", check=AT_LEAST_ONE, flag="--epochs")
    warmup_epochs: int = setting(10, "Linear warm-up epochs.", check=NONNEG)
    schedule: str = setting("cosine", "cosine | step.", check=one_of("cosine", "step"))
    milestones: list = setting([], "Step schedule: epochs where lr is multiplied by gamma.",
                               check=(lambda v: all(m >= 0 for m in v), "must be epochs >= 0"))
    gamma: float = setting(0.1, "Step schedule factor.", check=POSITIVE)
    lars_eta: float = setting(0.001, "LARS trust coefficient.", check=POSITIVE)
    lars_exclude_1d: bool = setting(False, "Biases and BN get plain SGD (the references adapt every parameter).")


@dataclass
class RunConfig:
    out: str = setting("", "Run folder.", flag="--out")
    seed: int = setting(0, "Seed of sampling, augmentation, attack starts and selection.", flag="--seed")
    device: str = setting("auto", "auto | cpu | cuda.", check=one_of("auto", "cpu", "cuda"), flag="--device")
    bf16: bool = setting(True, "Autocast to bfloat16 on CUDA.")
    channels_last: bool = setting(True, "channels_last memory format on CUDA.")
    compile: bool = setting(False, "torch.compile the training forward.")
    checkpoint_every: int = setting(50, "Keep an epoch-NNNN.pt every N epochs (0: only last.pt).", check=NONNEG)
    checkpoint_every_steps: int = setting(0, "Also write last.pt every N steps inside an epoch (0: at epoch ends "
                                          "only); --resume then goes on at the next batch.", check=NONNEG)
    log_every: int = setting(10, "A step record every N steps (0: none).", check=NONNEG)
    loggers: list[str] = setting(["jsonl"], "Where curves go: jsonl (RUN/metrics.jsonl, always), tensorboard, wandb, csv "
                                       "(pipeline.loggers; the others need pipeline[loggers]).",
                            check=(lambda v: isinstance(v, list) and all(n == ALWAYS or n in LOGGERS for n in v),
                                   "a list of jsonl, tensorboard, wandb, csv"))
    wandb_project: str = setting("pipeline", "W&B project (run.loggers = [..., \"wandb\"]).")
    wandb_mode: str = setting("offline", "W&B mode: offline (files under RUN/wandb, `wandb sync` later), online, "
                                         "disabled; the WANDB_MODE variable overrides it.",
                              check=one_of("offline", "online", "disabled"))
    deterministic: bool = setting(False, "torch.use_deterministic_algorithms.")


@dataclass
class SelectConfig:
    selector: str = setting("", "Select subsets during training (empty: train on the data or manifests given).",
                            flag="--selector")
    fraction: float = setting(0.1, "Subset size as a share of the pool.", check=within(0, 1, False, True),
                              flag="--fraction")
    warmup: int = setting(-1, "Epochs on the full data before the first selection (-1: 10% of the epochs).",
                          check=(lambda v: v >= -1, "must be >= 0 (or -1: 10% of the epochs)"), flag="--warmup")
    every: int = setting(0, "Epochs between selections (0: 2% of the epochs, at least 1).", check=NONNEG,
                         flag="--select-every")
    sync: bool = setting(False, "Wait for each selection (the paper's behaviour) instead of overlapping it: lag 0.",
                         flag="--sync/--overlap")
    lag: int = setting(1, "Epochs from a round's snapshot to the first epoch that trains on its subset (the "
                          "trainer waits if the round is late): runs reproduce whatever the timing.", check=NONNEG,
                       flag="--select-lag")
    params: str = setting("", "Selector parameters, k=20,unit=batch or preset=reference (or a table).", table=True,
                          check=_parses(lambda v: parse_kv(v, "select.params"), "KEY=VALUE,KEY=VALUE"))
    proxies: str = setting("auto", "recorded: rounds use the rows training recorded (selectors/recorded.py), fresh "
                                   "ones only for the rest and U; fresh: each round passes the candidates through its "
                                   "snapshot; auto: recorded where the selector, method and run can, else fresh.",
                           check=one_of("auto", "fresh", "recorded"))
    row_epochs: int = setting(2, "Recorded rows: each sample's last K records are kept and averaged, as K draws.",
                              check=AT_LEAST_ONE)
    row_age: int = setting(-1, "Recorded rows: use rows at most this many epochs old (-1: any age).",
                           check=(lambda v: v >= -1, "must be >= 0 (or -1: any age)"))
    threads: int = setting(1, "Torch threads of the background selection process.", check=AT_LEAST_ONE)
    processes: int = setting(-1, "Processes per selection round (one process group, the proxy pass shared); 0: in "
                                 "the trainer's process, blocking it; -1: 0 for random and recorded rows, else 1.",
                             check=(lambda v: v >= -1, "must be >= 0 (or -1: automatic)"))
    device: str = setting("", "Where rounds run: empty the trainer's device; cuda:7; cuda:6,cuda:7 one per process.")
    workers: int = setting(0, "Loader workers of each selection process.", check=NONNEG)
    nice: int = setting(10, "Scheduling priority of background rounds (higher yields to training).")
    validation_fraction: float = setting(0.01, "RCS's held-out U: chosen once per run, never trained on.",
                                         check=within(0, 0.5, False))
    fallback: str = setting("", "random: once a round costs more than its subset saves, select at random from then on.",
                            check=one_of("", "random"))

    def schedule(self, epochs: int) -> tuple[int, int]:
        """(warm-up epochs, epochs between selections), resolving the automatic defaults."""
        warmup = self.warmup if self.warmup >= 0 else int(round(0.1 * epochs))
        every = self.every if self.every > 0 else max(1, int(round(0.02 * epochs)))
        return warmup, every


@dataclass
class EvalConfig:
    protocol: str = setting("slf", "Finetuning protocol (pipeline.evaluation registry).", flag="--protocol")
    recipe: str = setting("", "acl | dynacl | advcl; empty: the checkpoint's method.", flag="--recipe")
    attack: str = setting("pgd20", "Comma-separated measures (pipeline.evaluation.measures registry).", flag="--attack")
    eps: float = setting(0.0, "l_inf budget [default 0: the checkpoint's training eps; else 8/255 colour, 0.3 grey].",
                         check=NONNEG, flag="--eps")
    step: float = setting(0.0, "PGD step [default 0: eps / 4].", check=NONNEG, flag="--step")
    steps: int = setting(20, "PGD steps [default 20].", check=AT_LEAST_ONE, flag="--steps")
    epochs: int = setting(0, "Finetuning epochs [default 0: the recipe's].", check=NONNEG, flag="--epochs")
    lr: float = setting(0.0, "Finetuning learning rate [default 0: the recipe's].", check=NONNEG, flag="--lr")
    batch_size: int = setting(0, "Finetuning batch size [default 0: the recipe's].", check=NONNEG, flag="--batch-size")
    limit: int = setting(0, "Evaluate on the first N test samples only [default 0: all].", check=NONNEG, flag="--limit")
    limits: str = setting("", "Per measure, the first N test samples (autoattack=1000): a costly attack on a subset, "
                              "the others on eval.limit.", table=True,
                          check=_parses(lambda v: _measure_limits(v), "MEASURE=N,MEASURE=N with N >= 1"))
    test_batch_size: int = setting(256, "Test images per batch of the measures. AutoAttack works batch by batch: one "
                                   "batch of a 1,000-image test subset ran about 5x faster on 2 CPU cores than "
                                   "batches of 256 (memory grows with it).", check=AT_LEAST_ONE,
                                   flag="--test-batch-size")
    seed: int = setting(0, "Finetuning and attack seed.", flag="--seed")
    resize: str = setting("auto", "The size the encoder sees the evaluation data at: auto (resized to the "
                          "checkpoint's pre-training size where it differs: transfer to data of another size), "
                          "none (as stored), or N (N x N pixels). Recorded in results.json.",
                          check=_parses(parse_resize, "auto, none or a size in pixels"), flag="--resize")
    noise_sigma: float = setting(0.0, "Finetune with Gaussian noise N(0, S^2) on every input: the base classifier of "
                                 "a smoothed one [default 0: none].", check=NONNEG, flag="--noise-sigma")
    smoothing: str = setting("", "sigma=S,n=N,alpha=A[,eot=M]: measure the smoothed classifier (majority of N noisy "
                             "draws, abstain unless the binomial test passes at A); attacks target the randomized "
                             "model, eot-pgd20 with M draws per step [default M: N].", table=True, flag="--smoothing")
    certify: str = setting("", "n0=N0,n=N,alpha=A,limit=L: `pipeline experiment` certifies the classifier too.",
                           table=True)


FIXED = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig, "attack": AttackConfig,
         "optim": OptimConfig, "run": RunConfig, "select": SelectConfig, "eval": EvalConfig}
SECTIONS: Registry[type] = Registry("config section")  # method sections: @register_section next to each trainer
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {}  # method name -> the sections it reads

# Settings that lived under [method] before methods had sections of their own.
MOVED = {"method.temperature": "acl.temperature", "method.min_crop_scale": "acl.min_crop_scale",
         "method.dynacl_period": "dynacl.period", "method.dynacl_swap": "dynacl.swap",
         "model.head": "(the method's model spec)", "select.attack_steps": "select.params attack_steps=N"}


def register_section(name: str):
    return SECTIONS.register(name)


# Settings whose values are names in a registry: key -> (the names, comma-separated list?, empty allowed?).
# The layer that owns the registry declares it (`declare_choices`), so the config layer imports none above it.
_CHOICES: dict[str, tuple] = {}


def declare_choices(key: str, names, many: bool = False, empty_ok: bool = False, also=None) -> None:
    """`key` takes one of `names()` (or, `many`, several, comma-separated); `also(value)` accepts values of a
    pattern the names only describe (wrn-DEPTH-WIDTH)."""
    _CHOICES[key] = (names, many, empty_ok, also)


declare_choices("model.arch", lambda: arch_choices().split(", "), also=is_known_arch)


def all_sections() -> list[str]:
    return [*FIXED, *SECTIONS]


def _declaration(key: str):
    section, _, name = key.partition(".")
    cls = FIXED.get(section) or (SECTIONS[section] if section in SECTIONS else None)
    return next((f for f in fields(cls) if f.name == name), None) if cls else None


def flagged_settings(exclude=()) -> dict[str, str]:
    """{key: flag} of every fixed setting a command-line flag sets (`pipeline train`'s options)."""
    return {f"{name}.{f.name}": f.metadata["flag"] for name, cls in FIXED.items() if name not in exclude
            for f in fields(cls) if f.metadata.get("flag")}


def setting_help(key: str) -> str:
    f = _declaration(key)
    return f.metadata.get("help", "") if f is not None else ""


def check_value(key: str, value) -> None:
    """One line naming the setting (and its flag) when `value` breaks the rule declared for `key`."""
    f = _declaration(key)
    rule = f.metadata.get("check") if f is not None else None
    flag = f" ({f.metadata['flag']})" if f is not None and f.metadata.get("flag") else ""
    if rule is not None and not rule[0](value):
        raise PipelineError(f"{key} = {value!r}{flag}: {rule[1]}")
    if key in _CHOICES and isinstance(value, str):
        names, many, empty_ok, also = _CHOICES[key]
        known = list(names())
        given = [v.strip() for v in value.split(",")] if many else [value]
        bad = next((v for v in given if v not in known and not (empty_ok and v == "") and not (also and also(v))),
                   None)
        if bad is not None:
            raise PipelineError(f"{key} = {bad!r}{flag}: choose one of {', '.join(known)}")


def settings_markdown() -> str:
    """The settings table of docs/SETTINGS.md, from the declarations (fixed sections, then the methods')."""
    lines = ["# Settings", "", "Generated from the declarations in `pipeline/config.py` and the methods' sections "
             "(`python scripts/settings_doc.py`); a test keeps this file in step.", ""]
    for name in all_sections():
        cls = FIXED.get(name) or SECTIONS[name]
        users = [m for m, secs in METHOD_SECTIONS.items() if name in secs]
        lines += [f"## [{name}]" + (f" (read by {', '.join(users)})" if users else ""), "",
                  "| setting | type | default | flag | rule | meaning |", "| --- | --- | --- | --- | --- | --- |"]
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rule = f.metadata.get("check")
            cells = [f"`{name}.{f.name}`", _kind(f.type), f"`{default!r}`", f.metadata.get("flag") or "",
                     rule[1] if rule else "", f.metadata.get("help", "")]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


class TrainConfig:
    def __init__(self):
        for name, cls in FIXED.items():
            setattr(self, name, cls())
        self.sections = {name: cls() for name, cls in SECTIONS.items()}
        self.explicit: set[str] = set()  # keys set from a file, a flag or --set (method defaults skip them)

    def __getattr__(self, name):  # method sections read like fixed ones: cfg.acl.temperature
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def section(self, name: str):
        if name in FIXED:
            return getattr(self, name)
        if name not in self.sections and name in SECTIONS:
            self.sections[name] = SECTIONS[name]()
        return self.sections.get(name)

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in FIXED}
        for name in METHOD_SECTIONS.get(self.method.name, ()):
            out[name] = dataclasses.asdict(self.section(name))
        return out

    @classmethod
    def from_dict(cls, d: dict, origin: str = "config") -> "TrainConfig":
        cfg = cls()
        for section, values in d.items():
            if not isinstance(values, dict):
                raise PipelineError(f"{origin}: [{section}] must be a table of settings")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, origin)
        return cfg

    def set(self, dotted: str, value, origin: str = "--set") -> None:
        section, _, key = dotted.partition(".")
        if dotted in MOVED:
            raise PipelineError(f"{origin}: {dotted} is now {MOVED[dotted]}")
        sec = self.section(section)
        if sec is None:
            names = ", ".join([*FIXED, *SECTIONS])
            raise PipelineError(f"{origin}: unknown section {section!r} (sections: {names})")
        declared = {f.name: f for f in fields(sec)}
        if key not in declared:
            raise PipelineError(f"{origin}: unknown setting {dotted!r} (in [{section}]: {', '.join(declared)})")
        f = declared[key]
        if isinstance(value, dict) and f.metadata.get("table"):
            value = format_kv(parse_kv(value, dotted))
        setattr(sec, key, _coerce(value, f.type, dotted, origin))
        self.explicit.add(dotted)

    def apply_defaults(self, defaults: dict) -> None:
        """A method's reference settings for every key nobody set explicitly."""
        for dotted, value in defaults.items():
            if dotted not in self.explicit:
                section, _, key = dotted.partition(".")
                setattr(self.section(section), key, value)

    def validate(self) -> "TrainConfig":
        """Apply every rule once, up front (the method's sections too): a bad value is one line before any work."""
        for name in [*FIXED, *METHOD_SECTIONS.get(self.method.name, ())]:
            sec = self.section(name)
            for f in fields(sec):
                check_value(f"{name}.{f.name}", getattr(sec, f.name))
        return self

    def apply_overrides(self, items: list[str]) -> None:
        for item in items:
            if "=" not in item:
                raise PipelineError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=0.5")
            k, v = item.split("=", 1)
            self.set(k.strip(), override_value(v.strip()))

    def to_record(self) -> dict:
        """`to_dict` as it is written down (config.toml, checkpoints, loggers): URLs without their secrets."""
        return redacted(self.to_dict())

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(tomli_w.dumps(self.to_record()).encode())


def _kind(type_name) -> str:
    return type_name if isinstance(type_name, str) else type_name.__name__


def override_value(text: str):
    """A --set value read as the config file reads it where it is a TOML list, table or quoted string
    (`run.loggers=["jsonl","tensorboard"]`, `run.name="a b"`); anything else stays text, parsed by the setting's
    type as before (`optim.milestones=40,60`, `model.arch=wrn-16-2`, numbers, true/false)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return value if isinstance(value, (str, list, dict)) else text


def _coerce(value, type_name, key: str, origin: str):
    kind = _kind(type_name)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
            if not -2**63 <= out < 2**63:
                raise ValueError
            return out
        if kind == "float":
            if isinstance(value, bool) or not math.isfinite(out := float(value)):
                raise ValueError
            return out
        if kind in ("list", "list[str]"):  # of ints (list) or names: "40,60", "tensorboard,csv" or a TOML list
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return [int(v) for v in items] if kind == "list" else [str(v).strip() for v in items]
        return str(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{origin}: {key} = {value!r} is not a valid {kind}") from None


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such config file")
    try:
        raw = parse_toml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text; save the config file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: malformed TOML ({exc})") from exc
    return TrainConfig.from_dict(raw, origin=str(path))

