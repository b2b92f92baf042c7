"""Models built from a spec: an encoder with multi-branch batch norm plus named heads; forward returns a dict.

A spec is a plain dict that travels inside checkpoints, so evaluation and selection rebuild the exact model:
    {"arch": "resnet18", "in_channels": 3, "stem": "cifar", "image_size": 32,
     "branches": ["nat", "adv"],                                   batch-norm branches, declared by the method
     "roles": {"natural": "nat", "adversarial": "adv", "eval": "adv"},   which branch serves which purpose
     "heads": {"proj": {"kind": "mlp3", "width": 512, "out": 512}}}      named heads on the encoder features
A head with "shared_bn": true normalises every branch with one set of statistics (AdvCL's projection head).
Code outside a method's own module never names a branch: it asks the spec for a role (`model.branch("eval")`).
"""

from __future__ import annotations

from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.backbones import BACKBONES, builtin_encoder
from pipeline.models.custom import ENTRY_POINT_GROUP, entry_point_names, foreign_encoder, is_foreign, trust
from pipeline.models.heads import HEADS
from pipeline.models.multibn import SHARED, MultiBatchNorm, convert_batchnorm, set_branch, use_branch

ROLES = ("natural", "adversarial", "eval")


class Model(nn.Module):
    """encoder -> "features"; each head -> its own output. `forward(x, branch)` returns {name: tensor}."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module], spec: dict):
        super().__init__()
        self.encoder, self.heads, self.spec = encoder, nn.ModuleDict(heads), dict(spec)

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def branch(self, role: str) -> str:
        """The batch-norm branch that plays `role` (natural, adversarial, eval) in this model's method."""
        roles = self.spec["roles"]
        if role not in roles:
            raise KeyError(f"the model declares no {role!r} branch (roles: {', '.join(roles)})")
        return roles[role]

    def features(self, x, branch: str | None = None):
        if branch is not None:
            set_branch(self, branch)
        return self.encoder(x)

    def forward(self, x, branch: str | None = None, heads=None) -> dict:
        f = self.features(x, branch)
        names = self.heads.keys() if heads is None else heads
        return {"features": f, **{name: self.heads[name](f) for name in names}}


def arch_choices() -> str:
    """Every accepted form of `model.arch`, for help texts and error messages."""
    installed = entry_point_names()
    return ", ".join([*BACKBONES.names(), "wrn-DEPTH-WIDTH", "module:PACKAGE.MODULE:FUNCTION", "timm:NAME",
                      "torchvision:NAME", *installed])


def is_known_arch(arch: str) -> bool:
    return builtin_encoder(arch) is not None or is_foreign(arch)


def check_arch(arch: str) -> None:
    if not isinstance(arch, str) or not is_known_arch(arch):
        raise PipelineError(f"model arch {arch!r}: choose one of {arch_choices()}")


def model_spec(arch: str, in_channels: int, image_size: int, heads: dict | None = None,
               branches=("nat", "adv"), roles: dict | None = None) -> dict:
    """A spec with validated names. `heads` maps a name to {"kind", "width", "out"} (default: ACL's head)."""
    check_arch(arch)
    heads = heads if heads is not None else {"proj": {"kind": "mlp3", "width": 512, "out": 512}}
    for name, h in heads.items():
        if h.get("kind") not in HEADS:
            raise PipelineError(f"head {name!r} kind {h.get('kind')!r}: choose one of {HEADS.choices(', ')}")
    branches = list(branches)
    roles = dict(roles) if roles is not None else {"natural": branches[0], "adversarial": branches[-1],
                                                   "eval": branches[-1]}
    unknown = {r: b for r, b in roles.items() if b not in branches}
    if unknown:
        raise PipelineError(f"model roles {unknown} name branches the model does not have ({branches})")
    return {"arch": arch, "in_channels": in_channels, "stem": "cifar" if image_size <= 64 else "imagenet",
            "image_size": image_size,
            "branches": branches, "roles": roles, "heads": {k: dict(v) for k, v in heads.items()}}


def upgrade_spec(spec: dict) -> dict:
    """Specs written before named heads (issue 3: one "head" and two fixed branches) in today's form."""
    if "heads" in spec:
        return spec
    branches = list(spec.get("branches", ("nat", "adv")))
    return {"arch": spec["arch"], "in_channels": spec["in_channels"], "stem": spec["stem"], "branches": branches,
            "roles": {"natural": branches[0], "adversarial": branches[-1], "eval": branches[-1]},
            "heads": {"proj": {"kind": spec.get("head", "mlp3"), "width": spec.get("head_width", 512),
                               "out": spec.get("proj_dim", 512)}}}


def upgrade_state(state: dict) -> dict:
    """Weights saved with a single `head` module under today's name for it, `heads.proj`."""
    if not any(k.startswith("head.") for k in state):
        return state
    return {("heads.proj." + k[5:] if k.startswith("head.") else k): v for k, v in state.items()}


def build_encoder(spec: dict, branches) -> nn.Module:
    """The spec's encoder with `branches`: a built-in one, or one from outside the package (models/custom.py;
    its dry forward needs the image size: 32 for specs written before it was recorded)."""
    make = builtin_encoder(spec["arch"])
    if make is not None:
        return make(in_channels=spec["in_channels"], stem=spec["stem"], branches=branches)
    return foreign_encoder(spec["arch"], branches, spec["in_channels"], int(spec.get("image_size") or 32))


def create_model(spec: dict) -> Model:
    spec = upgrade_spec(spec)
    branches = tuple(spec["branches"])
    encoder = build_encoder(spec, branches)
    heads = {name: HEADS[h["kind"]](encoder.feature_dim, h["width"], h["out"],
                                    branches=(SHARED,) if h.get("shared_bn") else branches)
             for name, h in spec["heads"].items()}
    return Model(encoder, heads, spec)


__all__ = ["ENTRY_POINT_GROUP", "Model", "MultiBatchNorm", "ROLES", "arch_choices", "build_encoder", "check_arch",
           "convert_batchnorm", "create_model", "is_known_arch", "model_spec", "set_branch", "trust", "upgrade_spec",
           "upgrade_state", "use_branch"]
