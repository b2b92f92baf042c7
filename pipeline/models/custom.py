"""Encoders from outside the package: a model of one's own, an installed package's, timm's or torchvision's.

    model.arch = "module:PKG.MODULE:FUNCTION"   FUNCTION() returns any nn.Module
    model.arch = "NAME"                          a name an installed package registers in the `pipeline.models`
                                                 entry-point group (NAME = "PKG.MODULE:FUNCTION")
    model.arch = "timm:NAME" | "torchvision:NAME"   where those libraries import (GPU machines), without weights

Every batch-norm layer of the module, however nested, becomes a multi-branch one (module replacement, as
SyncBatchNorm.convert_sync_batchnorm does), so each method's branches work unchanged; the encoder's features are
the module's output, pooled over space when it is a feature map, their width found by one dry forward; the
method's heads go on top. Inputs reach the module normalised (pipeline.models.normalize), as every encoder's do.

Importing a module runs its code, so a name read from a checkpoint (`model_spec.arch`) is imported only when
the user trusts it: named in this process's own settings (the trainer calls `trust`) or in PIPELINE_PLUGINS
(which background selection rounds inherit). A checkpoint alone never imports code.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

import torch
from torch import nn

from pipeline.errors import PipelineError, user_code
from pipeline.models.multibn import convert_batchnorm
from pipeline.models.normalize import Normalize, default_stats
from pipeline.registry import PLUGINS_VARIABLE

ENTRY_POINT_GROUP = "pipeline.models"
PREFIXES = ("module:", "timm:", "torchvision:")
_TRUSTED: set[str] = set()


class ForeignEncoder(nn.Module):
    """normalise -> the module -> (global average pool of a feature map) -> flat features."""

    def __init__(self, body: nn.Module, branches, in_channels: int, image_size: int, arch: str = ""):
        super().__init__()
        self.normalize = Normalize(*default_stats(in_channels))
        self.body = convert_batchnorm(body, branches)
        was = self.body.training
        self.body.eval()  # the dry forward must not move running statistics
        try:
            with torch.no_grad():
                out = self.forward(torch.zeros(1, in_channels, image_size, image_size))
        except Exception as exc:  # the user's module: any error is theirs to see, named
            raise PipelineError(f"model.arch {arch}: a forward of a 1 x {in_channels} x {image_size} x "
                                f"{image_size} batch failed ({type(exc).__name__}: {exc})") from exc
        finally:
            self.body.train(was)
        self.feature_dim = int(out.shape[1])

    def forward(self, x):
        out = self.body(self.normalize(x))
        if isinstance(out, (tuple, list)):  # (features, extras) from models that return more
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        return torch.flatten(out, 1)


def _module_name(arch: str) -> str:
    return arch.removeprefix("module:").partition(":")[0]


def trust(arch: str) -> None:
    """The user named `arch` in their settings: its module may be imported, here and in the processes this one
    starts (selection rounds rebuild the model from snapshots)."""
    if not arch.startswith("module:"):
        return
    name = _module_name(arch)
    _TRUSTED.add(name)
    listed = [n.strip() for n in os.environ.get(PLUGINS_VARIABLE, "").split(",") if n.strip()]
    if name not in listed:
        os.environ[PLUGINS_VARIABLE] = ",".join([*listed, name])


def is_trusted(arch: str) -> bool:
    if not arch.startswith("module:"):
        return True  # installed packages' entry points, timm, torchvision: code the user installed
    name = _module_name(arch)
    listed = {n.strip() for n in os.environ.get(PLUGINS_VARIABLE, "").split(",")}
    return name in _TRUSTED or name in listed


def _entry_point(name: str):
    return next((ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def entry_point_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def is_foreign(arch: str) -> bool:
    """Whether `arch` names a module of one's own, an entry point, timm or torchvision (valid or not)."""
    return arch.startswith(PREFIXES) or _entry_point(arch) is not None


def _check_module_ref(arch: str) -> tuple[str, str]:
    module, _, function = arch.removeprefix("module:").partition(":")
    if not module or not function:
        raise PipelineError(f"model.arch {arch!r}: write module:PACKAGE.MODULE:FUNCTION (FUNCTION() returns the "
                            "nn.Module), e.g. module:mymodels.nets:make_encoder")
    return module, function


def _import_factory(arch: str, module: str, function: str):
    with user_code(f"model.arch {arch}: importing {module!r}", "fix the module or choose another arch"):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise PipelineError(f"model.arch {arch}: cannot import {module!r} ({exc}); put its folder on "
                                "PYTHONPATH or install its package") from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise PipelineError(f"model.arch {arch}: {module} has no function {function!r}")
    return fn


def _without_classifier(model: nn.Module) -> nn.Module:
    """A torchvision classifier's last layer replaced by the identity: its output is then the pooled features."""
    for attr in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return model
    return model


def foreign_body(arch: str) -> nn.Module:
    """The user's, the package's, timm's or torchvision's nn.Module for `arch`, as built (before conversion)."""
    if arch.startswith("module:"):
        module, function = _check_module_ref(arch)
        if not is_trusted(arch):
            raise PipelineError(f"model.arch {arch}: the checkpoint names code to import ({module}); it is imported "
                                f"only when you trust it: set {PLUGINS_VARIABLE}={module} for this command (train and select "
                               "also trust the --arch given on their own command line)")
        factory = _import_factory(arch, module, function)
        with user_code(f"model.arch {arch}: calling {module}.{function}()",
                       "the function must build the nn.Module with no arguments"):
            body = factory()
    elif arch.startswith("timm:"):
        try:
            import timm
        except Exception as exc:  # timm imports torchvision, which fails on a CPU-only torch
            raise PipelineError(f"model.arch {arch}: timm does not import here ({type(exc).__name__}: {exc}); "
                                "install timm (and a torchvision matching torch), or use another arch") from None
        with user_code(f"model.arch {arch}: timm.create_model", "check the model name (timm.list_models())"):
            body = timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=0)
    elif arch.startswith("torchvision:"):
        try:
            from torchvision import models
        except Exception as exc:
            raise PipelineError(f"model.arch {arch}: torchvision does not import here ({type(exc).__name__}: "
                                f"{exc}); on a CPU-only torch it cannot; use another arch") from None
        with user_code(f"model.arch {arch}: torchvision's get_model", "check the model name"):
            body = _without_classifier(models.get_model(arch.removeprefix("torchvision:"), weights=None))
    else:
        ep = _entry_point(arch)
        if ep is None:
            raise PipelineError(f"model.arch {arch!r}: no such model")
        with user_code(f"model.arch {arch}: the entry point {ep.value}", "fix its package or choose another arch"):
            body = ep.load()()
    if not isinstance(body, nn.Module):
        raise PipelineError(f"model.arch {arch}: its function returned {type(body).__name__}, not an nn.Module")
    return body


def foreign_encoder(arch: str, branches, in_channels: int, image_size: int) -> ForeignEncoder:
    return ForeignEncoder(foreign_body(arch), branches, in_channels, image_size, arch)
