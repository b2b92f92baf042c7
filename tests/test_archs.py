"""The field's architectures (WideResNets, PreAct-ResNet-18) and models of one's own (`--arch module:...`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.models import MultiBatchNorm, convert_batchnorm, create_model, model_spec
from pipeline.pseudolabels import PseudoLabels
from pipeline.trainers import TRAINERS, create_trainer

from test_train import tiny_cfg

PLUGINS = str(Path(__file__).resolve().parent / "plugins")
ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ("acl", "dynacl", "simclr", "advcl", "ascl", "pgd-at", "trades", "mart")


def _bn(c):  # one branch's batch norm: weight and bias
    return 2 * c


def wrn_parameters(depth, width, classes=10):
    """A WideResNet's parameters counted by hand from the TRADES/RobustBench definition: 3x3 stem of 16,
    (depth - 4) / 6 pre-activation blocks per stage, a 1x1 shortcut where the width changes, final BN, fc."""
    n, total, cin = (depth - 4) // 6, 3 * 16 * 9, 16
    for cout in (16 * width, 32 * width, 64 * width):
        for j in range(n):
            c = cin if j == 0 else cout
            total += _bn(c) + 9 * c * cout + _bn(cout) + 9 * cout * cout + (c * cout if c != cout else 0)
        cin = cout
    return total + _bn(cin) + cin * classes + classes


def preact18_parameters(classes=10):
    """PreAct-ResNet-18 as in Rice et al.'s robust-overfitting code: 3x3 stem of 64, [2, 2, 2, 2] pre-activation
    blocks, 1x1 shortcuts, a final BN before pooling, fc."""
    total, cin = 3 * 64 * 9, 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for j in range(2):
            c = cin if j == 0 else cout
            stride = 2 if (i > 0 and j == 0) else 1
            total += _bn(c) + 9 * c * cout + _bn(cout) + 9 * cout * cout + (c * cout if (c != cout or stride > 1) else 0)
        cin = cout
    return total + _bn(cin) + cin * classes + classes


def _count(arch, classes=10):
    model = create_model(model_spec(arch, 3, 32, heads={}, branches=("nat",)))
    return sum(p.numel() for p in model.parameters()) + model.feature_dim * classes + classes


def test_parameter_counts_equal_the_reference_implementations():
    assert wrn_parameters(34, 10) == 46_160_474  # RobustBench's "46.2M" for WRN-34-10
    assert wrn_parameters(28, 10) == 36_479_194
    assert preact18_parameters() == 11_172_170  # "11.2M"; kuangliu's variant without the final BN: 11,171,146
    assert _count("wrn-34-10") == wrn_parameters(34, 10)
    assert _count("wrn-28-10") == wrn_parameters(28, 10)
    assert _count("wrn-16-4") == wrn_parameters(16, 4)  # any wrn-DEPTH-WIDTH
    assert _count("preact-resnet18") == preact18_parameters()
    two = create_model(model_spec("wrn-16-2", 3, 32, heads={}, branches=("nat", "adv")))
    assert sum(isinstance(m, MultiBatchNorm) and len(m.bns) == 2 for m in two.modules()) == 3 * 2 * 2 + 1


def test_bad_architecture_names_are_refused_with_the_forms():
    with pytest.raises(PipelineError, match="depth 6n"):
        create_model(model_spec("wrn-33-10", 3, 32))
    with pytest.raises(PipelineError, match=r"wrn-DEPTH-WIDTH.*module:PACKAGE"):
        model_spec("resnet-17", 3, 32)
    with pytest.raises(PipelineError, match="module:PACKAGE.MODULE:FUNCTION"):
        create_model(model_spec("module:own_model", 3, 32))


@pytest.fixture
def own_model(monkeypatch):
    """tests/plugins on the path (here and in subprocesses), PIPELINE_PLUGINS restored afterwards."""
    from pipeline.models import custom

    monkeypatch.syspath_prepend(PLUGINS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([PLUGINS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PIPELINE_PLUGINS", "")
    monkeypatch.setattr(custom, "_TRUSTED", set())
    yield
    sys.modules.pop("own_model", None)


def test_batchnorm_layers_in_nested_containers_become_multi_branch(own_model):
    import own_model as m

    net = m.make_net()
    before = [mod for mod in net.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        before[0].running_mean.fill_(0.5)
    converted = convert_batchnorm(net, ("nat", "adv"))
    multi = [mod for mod in converted.modules() if isinstance(mod, MultiBatchNorm)]
    assert len(before) == 3 and len(multi) == 3
    plain = [name for name, mod in converted.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    assert len(plain) == 6 and all(".bns." in name for name in plain)  # every one inside a MultiBatchNorm
    first = multi[0].bns
    assert first["nat"] is not first["adv"] and first["adv"].eps == 1e-3 and first["adv"].momentum == 0.2
    assert torch.equal(first["adv"].running_mean, torch.full((8,), 0.5))  # starts from the layer it replaced
    assert isinstance(multi[2].bns["nat"], nn.BatchNorm1d)


def test_own_model_trains_acl_with_two_branches_and_evaluates(own_model, digits_set, tmp_path):
    from pipeline.evaluation import evaluate

    run = tmp_path / "run"
    cfg = tiny_cfg(digits_set.root, run, **{"model.arch": "module:own_model:make_net", "optim.epochs": 1})
    trainer = create_trainer(cfg, progress=False)
    assert trainer.model.feature_dim == 24  # found by the dry forward
    trainer.fit()
    trainer.close()
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    state = ckpt["model"]
    nat, adv = state["encoder.body.stages.0.parts.norm.bn.bns.nat.running_mean"], \
        state["encoder.body.stages.0.parts.norm.bn.bns.adv.running_mean"]
    assert not torch.equal(nat, adv)  # natural and adversarial inputs were normalised apart
    assert ckpt["model_spec"]["image_size"] == 8
    result = evaluate(digits_set.root, run / "checkpoints" / "last.pt", "slf", "clean", epochs=1, lr=0.1,
                      limit=64, progress=False)
    assert 0.0 <= result["clean"] <= 1.0
    # a checkpoint alone never imports the code it names: a new process must be told to trust it
    code = (f"from pipeline.checkpoint import load_model\n"
            f"load_model({str(run / 'checkpoints' / 'last.pt')!r})\nprint('loaded')")
    env = {**os.environ, "PIPELINE_PLUGINS": ""}
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert refused.returncode != 0 and "PIPELINE_PLUGINS=own_model" in refused.stderr
    trusted = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env={**env, "PIPELINE_PLUGINS": "own_model"})
    assert trusted.returncode == 0 and "loaded" in trusted.stdout, trusted.stderr[-2000:]


def test_own_model_forms_and_their_errors(own_model):
    spec = model_spec("module:own_model:make_feature_map", 1, 8, branches=("nat", "adv"))
    from pipeline.models import trust

    trust(spec["arch"])
    assert create_model(spec).feature_dim == 16  # a feature map, pooled
    assert os.environ["PIPELINE_PLUGINS"] == "own_model"  # the processes this one starts trust it too
    with pytest.raises(PipelineError, match="not an nn.Module"):
        create_model(model_spec("module:own_model:not_a_module", 1, 8))
    with pytest.raises(PipelineError, match="no function"):
        create_model(model_spec("module:own_model:missing", 1, 8))
    with pytest.raises(PipelineError, match="forward of a 1 x 3 x 8 x 8 batch failed"):
        create_model(model_spec("module:own_model:make_net", 3, 8))  # a 1-channel net fed 3 channels
    trust("module:no_such_pkg.nets:make")
    with pytest.raises(PipelineError, match="cannot import 'no_such_pkg.nets'"):
        create_model(model_spec("module:no_such_pkg.nets:make", 1, 8))
    with pytest.raises(PipelineError, match="torchvision does not import|timm does not import"):
        create_model(model_spec("timm:resnet18", 3, 32))


def _pseudo_labels(ss, path):
    ids = ss.ids("train")
    import numpy as np

    ids = np.sort(ids)
    labels = np.stack([ids % 2, ids % 10], 1).astype(np.int32)
    return PseudoLabels(ids, labels, (2, 10), ss.fingerprint).save(path)


@pytest.mark.parametrize("arch", ["wrn-10-2", "preact-resnet18", "module:own_model:make_net"])
def test_every_method_trains_a_step_on_the_new_architectures(own_model, digits_set, tmp_path, arch):
    methods = [m for m in TRAINERS.names() if m in BUILT_IN]
    assert set(methods) == set(BUILT_IN)
    pseudo = _pseudo_labels(digits_set, tmp_path / "pl")
    batch = next(iter(digits_set.loader("train", backend="indexed", batch_size=8, shuffle=False)))
    for method in methods:
        over = {"model.arch": arch, "method.name": method, "attack.steps": 1, "run.deterministic": False}
        if method == "advcl":
            over["advcl.pseudo_labels"] = str(pseudo)
        t = create_trainer(tiny_cfg(digits_set.root, tmp_path / method / arch.replace(":", "_"), **over),
                           progress=False)
        before = [p.detach().clone() for p in t.model.parameters()]
        t.model.train()
        record = t.training_step(batch, 0)
        loss = record.losses.mean()
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        t.close()
        assert torch.isfinite(loss), (method, arch)
        moved = sum(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
        assert moved > len(before) // 2, (method, arch, moved, len(before))


def test_wrn_34_10_trains_an_acl_step(digits_set, tmp_path):
    """The full-size WideResNet once (46M parameters; 8 x 8 images keep the step to seconds)."""
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r", **{"model.arch": "wrn-34-10", "attack.steps": 1}),
                       progress=False)
    batch = next(iter(digits_set.loader("train", backend="indexed", batch_size=4, shuffle=False)))
    loss = t.training_step(batch, 0).losses.mean()
    loss.backward()
    t.close()
    assert torch.isfinite(loss) and t.model.feature_dim == 640
    json.dumps(t.spec)  # the spec travels in checkpoints as plain data
