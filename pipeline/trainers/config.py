"""Training configuration: typed sections (ffcv-imagenet style), loadable from TOML, overridable per key.

    [data]    path, split, batch_size, workers, backend, manifest, manifests
    [model]   arch, head, head_width, proj_dim
    [method]  name, temperature, min_crop_scale, dynacl_period, dynacl_swap
    [attack]  eps, step, steps        (eps/step 0 = pick by data: 8/255 and 2/255 for colour, 0.3 and eps/4 grey)
    [optim]   optimizer, lr, momentum, weight_decay, epochs, warmup_epochs
    [run]     out, seed, device, bf16, channels_last, compile, checkpoint_every, log_every, deterministic
    [select]  selector, fraction, warmup, every, sync, params, attack_steps, threads

`pipeline train --config FILE --set optim.lr=0.5 --epochs 20` applies FILE, then each override in turn. The
effective configuration is written to RUN/config.toml.
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


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    head: str = "mlp3"
    head_width: int = 512
    proj_dim: int = 512


@dataclass
class MethodConfig:
    name: str = "acl"
    temperature: float = 0.5
    min_crop_scale: float = 0.08  # smallest area of RandomResizedCrop (raise it for tiny images)
    dynacl_period: int = 50  # DynACL: epochs between augmentation-strength steps
    dynacl_swap: float = 2 / 3  # DynACL: how far the loss weight moves towards the adversarial term


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
    warmup: int = 0  # epochs on the full data before the first selection
    every: int = 1  # epochs between selections
    sync: bool = False  # wait for each selection (the paper's behaviour) instead of overlapping it
    params: str = ""  # selector parameters, "k=20,unit=batch"
    attack_steps: int = 1  # PGD steps for the candidates' adversarial views (1 keeps RCS under half an epoch)
    threads: int = 1  # torch threads of the background selection process


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        sec = getattr(self, section, None) if section in {f.name for f in fields(self)} else None
        if sec is None:
            raise PipelineError(f"{origin}: unknown section {section!r} (sections: {', '.join(f.name for f in fields(self))})")
        types = {f.name: f.type for f in fields(sec)}
        if key not in types:
            raise PipelineError(f"{origin}: unknown setting {dotted!r} (in [{section}]: {', '.join(types)})")
        setattr(sec, key, _coerce(value, types[key], dotted, origin))

    def apply_overrides(self, items: list[str]) -> None:
        for item in items:
            if "=" not in item:
                raise PipelineError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=0.5")
            k, v = item.split("=", 1)
            self.set(k.strip(), v.strip())

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(tomli_w.dumps(self.to_dict()).encode())


def _coerce(value, type_name: str, key: str, origin: str):
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
        return str(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{origin}: {key} = {value!r} is not a valid {kind}") from None


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: malformed TOML ({exc})") from exc
    return TrainConfig.from_dict(raw, origin=str(path))
