"""Training configuration: typed sections (ffcv-imagenet style), loadable from TOML, overridable per key.

    [data]    path, split, batch_size, workers, backend, manifest, manifests, use_weights, crop, decode
    [model]   arch, head_width, proj_dim
    [method]  name                     (its own settings live in the method's sections: [acl], [dynacl], ...)
    [attack]  eps, step, steps         (0 = the budget rule of pipeline.attacks.budget)
    [optim]   optimizer, lr, momentum, weight_decay, epochs, warmup_epochs, schedule, milestones, gamma,
              lars_eta, lars_exclude_1d
    [run]     out, seed, device, bf16, channels_last, compile, checkpoint_every, log_every, deterministic
    [select]  selector, fraction, warmup, every, sync, params, threads, processes, device, workers, nice,
              validation_fraction, fallback
    [eval]    protocol, recipe, attack, eps, step, steps, epochs, lr, batch_size, limit, seed

A method declares its section next to its trainer with `@register_section("acl")`. `pipeline train --config
FILE --set optim.lr=0.5 --epochs 20` applies FILE, then each override in turn. The effective configuration
(with the sections of the chosen method) is written to RUN/config.toml.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomli_w

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError


@dataclass
class DataConfig:
    path: str = ""
    split: str = "train"
    batch_size: int = 512
    workers: int = 2
    backend: str = "auto"
    manifest: str = ""  # train on this subset
    manifests: str = ""  # take the newest valid manifest of this folder at each epoch boundary
    use_weights: bool = True  # weight per-sample losses by a manifest's weights when it has them
    crop: str = ""  # "random-resized:SIZE[,scale=LO-HI]": crop while decoding; for one-view methods (see docs)
    decode: str = "auto"  # auto | cpu | device: JPEGs decoded on the GPU (nvJPEG) where torchvision can


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    head_width: int = 512
    proj_dim: int = 512


@dataclass
class MethodConfig:
    name: str = "acl"


@dataclass
class AttackConfig:
    eps: float = 0.0
    step: float = 0.0
    steps: int = 5


@dataclass
class OptimConfig:
    optimizer: str = "lars"
    lr: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    epochs: int = 1000
    warmup_epochs: int = 10
    schedule: str = "cosine"  # cosine | step
    milestones: list = field(default_factory=list)  # step schedule: epochs where lr is multiplied by gamma
    gamma: float = 0.1
    lars_eta: float = 0.001
    lars_exclude_1d: bool = False  # the references adapt every parameter; True: biases and BN get plain SGD


@dataclass
class RunConfig:
    out: str = ""
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # autocast to bfloat16 on CUDA
    channels_last: bool = True  # on CUDA
    compile: bool = False
    checkpoint_every: int = 50
    log_every: int = 10
    deterministic: bool = False


@dataclass
class SelectConfig:
    selector: str = ""  # empty: train on the data (or manifests) given
    fraction: float = 0.1
    warmup: int = -1  # epochs on the full data before the first selection; -1: 10% of the epochs (the paper's)
    every: int = 0  # epochs between selections; 0: 2% of the epochs, at least 1 (the paper's proportion)
    sync: bool = False  # wait for each selection (the paper's behaviour) instead of overlapping it
    params: str = ""  # selector parameters, "k=20,unit=batch" or "preset=reference"
    threads: int = 1  # torch threads of the background selection process
    processes: int = 1  # processes per selection round (one process group, the proxy pass shared)
    device: str = ""  # where rounds run: "" the trainer's device; "cuda:7"; "cuda:6,cuda:7" one per process
    workers: int = 0  # loader workers of each selection process
    nice: int = 10  # scheduling priority of the background selection process (higher yields to training)
    validation_fraction: float = 0.01  # RCS's held-out U: chosen once per run, never trained on
    fallback: str = ""  # "random": once a round costs more than its subset saves, select at random from then on

    def schedule(self, epochs: int) -> tuple[int, int]:
        """(warm-up epochs, epochs between selections), resolving the automatic defaults."""
        warmup = self.warmup if self.warmup >= 0 else int(round(0.1 * epochs))
        every = self.every if self.every > 0 else max(1, int(round(0.02 * epochs)))
        return warmup, every


@dataclass
class EvalConfig:
    protocol: str = "slf"
    recipe: str = ""  # acl | dynacl | advcl; empty: the checkpoint's method
    attack: str = "pgd20"  # comma-separated measures: clean, pgd20, autoattack, autoattack-rand
    eps: float = 0.0
    step: float = 0.0
    steps: int = 20
    epochs: int = 0  # 0: the recipe's
    lr: float = 0.0
    batch_size: int = 0
    limit: int = 0  # evaluate on the first N test samples only (0: all)
    seed: int = 0
    noise_sigma: float = 0.0  # > 0: finetune with Gaussian noise augmentation (the base of a smoothed classifier)
    smoothing: str = ""  # "sigma=S,n=N,alpha=A[,eot=M]": measure the smoothed classifier (randomized smoothing)
    certify: str = ""  # "n0=N0,n=N,alpha=A,limit=L": `pipeline experiment` certifies the classifier too


def _crop_ok(text: str) -> bool:
    from pipeline.shards.crops import parse_crop

    try:
        parse_crop(text)
        return True
    except PipelineError:
        return False


# One place for the rules every command applies to a setting: (test, what it must be).
_POS, _NONNEG = (lambda v: v > 0, "must be > 0"), (lambda v: v >= 0, "must be >= 0")
_ONE = (lambda v: v >= 1, "must be at least 1")
RULES = {
    "data.batch_size": _ONE, "data.workers": _NONNEG,
    "data.backend": (lambda v: v in ("auto", "stream", "indexed", "ffcv"), "must be auto, stream, indexed or ffcv"),
    "data.decode": (lambda v: v in ("auto", "cpu", "device"), "must be auto, cpu or device"),
    "data.crop": (_crop_ok, "must be empty, none or random-resized:SIZE[,scale=LO-HI][,ratio=LO-HI]"),
    "model.head_width": _ONE, "model.proj_dim": _ONE,
    "attack.eps": _NONNEG, "attack.step": _NONNEG, "attack.steps": _ONE,
    "optim.optimizer": (lambda v: v in ("lars", "sgd"), "must be lars or sgd"),
    "optim.lr": _POS, "optim.momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"), "optim.weight_decay": _NONNEG,
    "optim.epochs": _ONE, "optim.warmup_epochs": _NONNEG, "optim.gamma": _POS, "optim.lars_eta": _POS,
    "optim.schedule": (lambda v: v in ("cosine", "step"), "must be cosine or step"),
    "optim.milestones": (lambda v: all(m >= 0 for m in v), "must be epochs >= 0"),
    "run.device": (lambda v: v in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
    "run.checkpoint_every": _NONNEG, "run.log_every": _NONNEG,
    "select.fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"), "select.threads": _ONE, "select.processes": _ONE,
    "select.workers": _NONNEG,
    "select.warmup": (lambda v: v >= -1, "must be >= 0 (or -1: 10% of the epochs)"), "select.every": _NONNEG,
    "select.validation_fraction": (lambda v: 0 < v < 0.5, "must be in (0, 0.5)"),
    "select.fallback": (lambda v: v in ("", "random"), "must be empty or random"),
    "eval.protocol": (lambda v: v in ("slf", "alf", "aff", "direct"), "must be slf, alf, aff or direct"),
    "eval.eps": _NONNEG, "eval.step": _NONNEG, "eval.steps": _ONE, "eval.epochs": _NONNEG, "eval.lr": _NONNEG,
    "eval.batch_size": _NONNEG, "eval.limit": _NONNEG, "eval.noise_sigma": _NONNEG,
}
FLAGS = {"data.path": "--data", "run.out": "--out", "method.name": "--method", "optim.epochs": "--epochs",
         "data.batch_size": "--batch-size", "optim.lr": "--lr", "data.workers": "--workers",
         "select.fraction": "--fraction", "select.warmup": "--warmup", "select.every": "--select-every",
         "run.device": "--device", "model.arch": "--arch", "optim.optimizer": "--optimizer", "eval.eps": "--eps",
         "eval.step": "--step", "eval.steps": "--steps", "eval.limit": "--limit", "eval.epochs": "--epochs"}


def check_value(key: str, value) -> None:
    """One line naming the setting (and its flag) when `value` breaks the rule for `key`."""
    rule = RULES.get(key)
    if rule is not None and not rule[0](value):
        flag = f" ({FLAGS[key]})" if key in FLAGS else ""
        raise PipelineError(f"{key} = {value!r}{flag}: {rule[1]}")


FIXED = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig, "attack": AttackConfig,
         "optim": OptimConfig, "run": RunConfig, "select": SelectConfig, "eval": EvalConfig}
SECTIONS: dict[str, type] = {}  # method sections, filled by @register_section next to each trainer
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {}  # method name -> the sections it reads

# Settings that lived under [method] before methods had sections of their own.
MOVED = {"method.temperature": "acl.temperature", "method.min_crop_scale": "acl.min_crop_scale",
         "method.dynacl_period": "dynacl.period", "method.dynacl_swap": "dynacl.swap",
         "model.head": "(the method's model spec)", "select.attack_steps": "select.params attack_steps=N"}


def register_section(name: str):
    def deco(cls):
        SECTIONS[name] = cls
        return cls
    return deco


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
        types = {f.name: f.type for f in fields(sec)}
        if key not in types:
            raise PipelineError(f"{origin}: unknown setting {dotted!r} (in [{section}]: {', '.join(types)})")
        setattr(sec, key, _coerce(value, types[key], dotted, origin))
        self.explicit.add(dotted)

    def apply_defaults(self, defaults: dict) -> None:
        """A method's reference settings for every key nobody set explicitly."""
        for dotted, value in defaults.items():
            if dotted not in self.explicit:
                section, _, key = dotted.partition(".")
                setattr(self.section(section), key, value)

    def validate(self) -> "TrainConfig":
        """Apply every rule once, up front: a bad value is one line before any work starts."""
        for name in FIXED:
            for f in fields(getattr(self, name)):
                check_value(f"{name}.{f.name}", getattr(getattr(self, name), f.name))
        return self

    def apply_overrides(self, items: list[str]) -> None:
        for item in items:
            if "=" not in item:
                raise PipelineError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=0.5")
            k, v = item.split("=", 1)
            self.set(k.strip(), v.strip())

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(tomli_w.dumps(self.to_dict()).encode())


def _coerce(value, type_name, key: str, origin: str):
    kind = type_name if isinstance(type_name, str) else type_name.__name__
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
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "list":  # of ints: "40,60" or a TOML list
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return [int(v) for v in items]
        return str(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{origin}: {key} = {value!r} is not a valid {kind}") from None


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text; save the config file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: malformed TOML ({exc})") from exc
    return TrainConfig.from_dict(raw, origin=str(path))
