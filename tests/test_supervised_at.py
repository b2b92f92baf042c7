"""Supervised adversarial training (pgd-at, trades, mart): losses against hand computations in numpy, the
per-sample scores against their definitions, one epoch of each on digits, resume equality, selection."""

import json

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.losses import mart_loss_per_sample, trades_loss_per_sample
from pipeline.trainers import create_trainer, load_config
from pipeline.trainers.supervised import per_sample_scores

from test_train import tiny_cfg

LOGITS_NAT = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
LOGITS_ADV = np.array([[0.5, 1.5, -0.5], [1.0, -0.2, 0.3], [-0.5, 1.0, 1.2], [0.3, -0.3, 0.1]])
LABELS = np.array([0, 2, 1, 1])


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _t(a):
    return torch.tensor(a, dtype=torch.float32)


def test_trades_loss_by_hand():
    p, q = _softmax(LOGITS_NAT), _softmax(LOGITS_ADV)
    ce = -np.log(p[np.arange(4), LABELS])
    kl = (p * np.log(p / q)).sum(1)
    got = trades_loss_per_sample(_t(LOGITS_NAT), _t(LOGITS_ADV), torch.tensor(LABELS), beta=6.0)
    np.testing.assert_allclose(got.numpy(), ce + 6.0 * kl, rtol=1e-5)


def test_mart_loss_by_hand():
    p, q = _softmax(LOGITS_NAT), _softmax(LOGITS_ADV)
    want = []
    for i, y in enumerate(LABELS):
        others = [k for k in range(3) if k != y]
        wrong = max(others, key=lambda k: q[i, k])  # the most likely wrong class of the adversarial image
        bce = -np.log(q[i, y]) - np.log(1.0001 - q[i, wrong] + 1e-12)
        kl = sum(p[i, k] * (np.log(p[i, k]) - np.log(q[i, k] + 1e-12)) for k in range(3))
        want.append(bce + 6.0 * kl * (1.0000001 - p[i, y]))
    got = mart_loss_per_sample(_t(LOGITS_NAT), _t(LOGITS_ADV), torch.tensor(LABELS), beta=6.0)
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-5)


def test_scores_equal_their_definitions():
    feats = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    s = per_sample_scores(_t(LOGITS_NAT), _t(LOGITS_ADV), feats, torch.tensor(LABELS))
    p, q = _softmax(LOGITS_NAT), _softmax(LOGITS_ADV)
    onehot = np.eye(3)[LABELS]
    np.testing.assert_allclose(s["el2n"].numpy(), np.linalg.norm(p - onehot, axis=1), rtol=1e-5)
    margin = [LOGITS_NAT[i, y] - max(LOGITS_NAT[i, k] for k in range(3) if k != y) for i, y in enumerate(LABELS)]
    np.testing.assert_allclose(s["margin"].numpy(), margin, rtol=1e-5)
    assert s["correct_adv"].tolist() == [float(LOGITS_ADV[i].argmax() == y) for i, y in enumerate(LABELS)]
    # the linear head's per-sample gradient norm, by autograd
    w = torch.zeros(3, 5, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    for i in range(4):
        out = feats[i] @ w.t() + b + _t(LOGITS_ADV[i])  # logits = the fixed ones at w = 0, b = 0
        gw, gb = torch.autograd.grad(torch.nn.functional.cross_entropy(out[None], torch.tensor([LABELS[i]])), [w, b])
        assert float(s["grad_norm"][i]) == pytest.approx(float(torch.cat([gw.flatten(), gb]).norm()), rel=1e-5)


@pytest.mark.parametrize("method", ["pgd-at", "trades", "mart"])
def test_one_epoch_of_each_logs_and_evaluates_directly(digits_set, tmp_path, method):
    from pipeline.evaluation import evaluate

    run = tmp_path / method
    t = create_trainer(tiny_cfg(digits_set.root, run, **{"method.name": method, "optim.epochs": 1,
                                                         "attack.eps": 0.1}), progress=False)
    assert t.spec["branches"] == ["nat"] and t.spec["heads"]["logits"]["out"] == 10
    t.fit()
    epoch = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in ln][-1]
    assert np.isfinite(epoch["loss"]) and 0 <= epoch["accuracy_adv"] <= 1 and epoch["attack_s"] > 0
    r = evaluate(digits_set.root, run / "checkpoints" / "last.pt", protocol="direct", attack="pgd20", limit=64,
                 eps=0.1, progress=False)
    assert 0 <= r["pgd20"] <= r["clean"] <= 1


def test_mart_resumes_exactly_and_selects_with_rcs(digits_set, tmp_path):
    over = {"method.name": "mart", "attack.eps": 0.1}
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **over), progress=False).fit()
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "b", **over), progress=False).fit(stop_after=1)
    create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False).fit()
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sel = {**over, "select.selector": "rcs", "select.fraction": 0.3, "select.warmup": 1, "select.every": 1,
           "select.sync": True}
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "c", **sel), progress=False).fit()
    recs = [json.loads(ln) for ln in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["kind"] == "selection"]
    last = [r for r in recs if r["kind"] == "epoch"][-1]
    assert rounds and last["subset_round"] == rounds[0]["round"] and last["images"] < 1000


def test_pgd_at_with_craig_style_facility_uses_weights(digits_set, tmp_path):
    """facility on last-layer gradient proxies, per class, its weights in the loss (CRAIG-style)."""
    from pipeline.shards.manifest import Manifest

    sel = {"method.name": "pgd-at", "attack.eps": 0.1, "attack.steps": 1, "select.selector": "facility",
           "select.fraction": 0.2, "select.warmup": 1, "select.every": 1, "select.sync": True,
           "select.params": "per_class=true,proxy=gradients"}
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "f", **sel), progress=False).fit()
    m = Manifest.load(tmp_path / "f" / "manifests" / "round-0001.json")
    labels = dict(zip(digits_set.ids("train").tolist(), digits_set.labels("train").tolist()))
    assert len(set(labels[i] for i in m.ids.tolist())) == 10  # every class represented
    assert m.weights is not None and m.weights.sum() == pytest.approx(digits_set.count("train"), rel=0.02)
