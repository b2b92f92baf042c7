"""The method-neutral core: LARS, subset weights, schedules, the budget rule, recipes, AFF's branches, every
registered trainer and selector, the in-process scorer."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import budget
from pipeline.shards.manifest import Manifest
from pipeline.trainers import TRAINERS, StepRecord, create_trainer
from pipeline.config import SelectConfig
from pipeline.trainers.optim import LARS, build_optimizer

from test_train import tiny_cfg
from clirun import pipeline as pipeline_cli


def test_lars_step_equals_a_hand_computation():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
    gw, gb = torch.randn(4, 3), torch.randn(4)
    lr, wd, eta, mom = 5.0, 1e-6, 0.001, 0.9
    opt = LARS([w, b], lr=lr, momentum=mom, weight_decay=wd, eta=eta)
    w0 = w.detach().clone()
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # by hand, as the ACL/DynACL/RCS code: every parameter adapted, wd inside the trust ratio's denominator
    buf_w, ww = torch.zeros(4, 3), w0.clone()
    for _ in range(2):
        local = eta * ww.norm() / (gw.norm() + wd * ww.norm())
        buf_w = mom * buf_w + lr * local * (gw + wd * ww)
        ww = ww - buf_w
    torch.testing.assert_close(w.detach(), ww)
    # the bias starts at zero: its trust ratio is 1 (the reference's rule), so it moves by lr * g, then more
    bb = torch.zeros(4)
    buf_b = lr * (gb + wd * bb)
    bb = bb - buf_b
    local = eta * bb.norm() / (gb.norm() + wd * bb.norm())
    buf_b = mom * buf_b + lr * local * (gb + wd * bb)
    torch.testing.assert_close(b.detach(), bb - buf_b)


def test_lars_can_leave_one_dimensional_parameters_to_plain_sgd():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, "lars", 1.0, 0.0, 0.0, exclude_1d=True)
    model.weight.grad, model.bias.grad = torch.ones(2, 3), torch.ones(2)
    b0 = model.bias.detach().clone()
    opt.step()
    torch.testing.assert_close(model.bias.detach(), b0 - 1.0)  # lr * g, no trust ratio
    assert [g["lars"] for g in opt.param_groups] == [True, False]


def test_selection_schedule_defaults_follow_the_paper():
    s = SelectConfig()
    assert s.schedule(1000) == (100, 20)  # warm-up 100 and every 20 of 1000 epochs, as the RCS code on CIFAR
    assert s.schedule(30) == (3, 1)
    assert SelectConfig(warmup=0, every=5).schedule(30) == (0, 5)


def test_one_budget_rule():
    assert budget(3) == budget(3, 8 / 255, 2 / 255, 5)
    assert budget(1).eps == 0.3 and budget(1).step == pytest.approx(0.075)
    assert budget(1, eps=0.1, use="eval").step == pytest.approx(0.025) and budget(1, use="eval").steps == 20


def _weighted_set(digits_set, tmp_path):
    ids = digits_set.ids("train")[:4]
    m = Manifest.for_shardset(digits_set, "train", ids, weights=np.array([2, 0, 1, 1], np.float32))
    m.save(tmp_path / "w.json")
    return ids, tmp_path / "w.json"


def test_manifest_weights_weigh_the_loss_as_duplicates_and_removals(digits_set, tmp_path):
    ids, path = _weighted_set(digits_set, tmp_path)
    cfg = tiny_cfg(digits_set.root, tmp_path / "r", **{"data.manifest": str(path), "data.batch_size": 4})
    t = create_trainer(cfg, progress=False)
    batch = next(iter(t._loader_for(0)))
    by_id = dict(zip(batch.ids.tolist(), batch.weights.tolist()))
    assert by_id == {int(ids[0]): 2.0, int(ids[1]): 0.0, int(ids[2]): 1.0, int(ids[3]): 1.0}
    params = [p for p in t.model.parameters() if p.requires_grad]
    state, buffers = t.gen.get_state(), {k: v.clone() for k, v in t.model.state_dict().items()}
    rec = t.training_step(batch, 0)
    from pipeline.losses import weighted_mean

    g_weighted = torch.autograd.grad(weighted_mean(rec.losses, batch.weights), params)
    t.gen.set_state(state)
    t.model.load_state_dict(buffers)  # batch-norm statistics as before: the same attack
    rec = t.training_step(batch, 0)  # same views and attack: the same per-sample losses
    dup = [i for i, w in enumerate(batch.weights.tolist()) for _ in range(int(w))]  # sample 0 twice, sample 1 never
    g_dup = torch.autograd.grad(rec.losses[dup].mean(), params)
    for a, b in zip(g_weighted, g_dup):
        torch.testing.assert_close(a, b)


def test_the_loop_reduces_per_sample_losses_with_the_weights(digits_set, tmp_path):
    ids, path = _weighted_set(digits_set, tmp_path)
    for use in (True, False):
        cfg = tiny_cfg(digits_set.root, tmp_path / f"r{use}", **{
            "data.manifest": str(path), "data.batch_size": 4, "optim.epochs": 1, "optim.warmup_epochs": 0,
            "optim.momentum": 0.0, "optim.lr": 1.0, "optim.schedule": "step", "data.use_weights": use})
        t = create_trainer(cfg, progress=False)
        bias = t.model.heads["proj"].layers[0].bias
        coef = {int(i): float(k + 1) for k, i in enumerate(ids)}  # loss of sample i = coef_i * sum(bias)
        t.training_step = lambda batch, epoch: StepRecord(
            torch.stack([coef[int(i)] * bias.sum() for i in batch.ids]))
        before = bias.detach().clone()
        t.fit()
        c = np.array([coef[int(i)] for i in ids])
        w = np.array([2, 0, 1, 1]) if use else np.ones(4)
        expected = before - float((c * w).sum() / w.sum())  # sgd, lr 1, no decay on 1-d parameters
        torch.testing.assert_close(bias.detach(), expected)


def test_finetuning_recipes_are_the_benchmarks():
    from pipeline.evaluation.recipes import recipe_settings

    s = recipe_settings("acl", "aff", 10)
    assert (s.batch_size, s.lr, s.epochs, s.milestones, s.nesterov) == (128, 0.1, 100, [40, 60], False)
    s = recipe_settings("dynacl", "aff", 10)
    assert (s.epochs, s.milestones) == (25, [15, 20])
    s = recipe_settings("acl", "slf", 100)
    assert (s.batch_size, s.lr, s.epochs, s.milestones) == (512, 0.05, 25, [10, 20])
    assert recipe_settings("advcl", "alf", 10).milestones == [15, 20]
    assert recipe_settings("acl", "slf", 10, epochs=10).milestones == [4, 8]  # scaled with the epochs


def test_aff_passes_natural_inputs_through_the_natural_branch(digits_set):
    from pipeline.evaluation.protocols import AFF, LinearClassifier
    from pipeline.evaluation.recipes import recipe_settings
    from pipeline.losses import trades_kl
    from pipeline.models import create_model, model_spec

    torch.manual_seed(0)
    model = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 16, "out": 8}}))
    roles = {r: model.branch(r) for r in ("natural", "adversarial", "eval")}
    with torch.no_grad():  # make the branches differ
        for m in model.modules():
            if hasattr(m, "bns"):
                m.bns[roles["eval"]].weight.uniform_(0.5, 1.5)
    clf = LinearClassifier(model.encoder, model.feature_dim, 10, roles)
    torch.nn.init.normal_(clf.fc.weight)
    s = recipe_settings("acl", "aff", 10)
    s.train_steps = 0  # no ascent: x_adv is the 0.001 x N(0, 1) start, reproducible from the generator
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = AFF(clf, s, 0.1, 0.025, torch.Generator().manual_seed(5)).loss(x, y)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    clf.train()
    nat = clf(x, roles["natural"])
    hand = F.cross_entropy(nat, y) + 6.0 * trades_kl(clf(x_adv, roles["eval"]), nat)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    other = F.cross_entropy(clf(x, roles["eval"]), y)  # the wrong branch gives another value: the test can fail
    assert abs(other.item() - F.cross_entropy(nat, y).item()) > 1e-6


def test_autoattack_rand_is_the_eot_version():
    pytest.importorskip("pyautoattack", reason="attacks extra not installed")
    from pipeline.evaluation.measures import MEASURES

    m = MEASURES["autoattack-rand"](torch.nn.Linear(4, 3), budget(3), 3, 0, "cpu")
    st = m.settings()
    assert st["attacks"] == ["apgd-ce", "apgd-dlr"] and st["apgd_eot"] == 20 and st["version"] == "rand"


@pytest.mark.parametrize("method", sorted(TRAINERS))
def test_every_registered_trainer_takes_a_step(digits_set, tmp_path, method):
    import numpy as np

    from pipeline.pseudolabels import PseudoLabels

    ids = np.sort(digits_set.ids("train"))  # pseudo-labels for the methods that train on them (advcl)
    labels = np.stack([np.arange(len(ids)) % k for k in (2, 10)], 1).astype(np.int32)
    pseudo = PseudoLabels(ids, labels, (2, 10), digits_set.fingerprint).save(tmp_path / "pl")
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / method, **{"method.name": method,
                                                                       "advcl.pseudo_labels": str(pseudo)}),
                       progress=False)
    batch = next(iter(t._loader_for(0)))
    rec = t.training_step(batch, 0)
    assert rec.losses.shape == (len(batch.ids),) and torch.isfinite(rec.losses).all()
    rec.losses.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.parameters())


def test_every_registered_selector_selects(digits_set, tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.selectors import SELECTORS
    from pipeline.selectors.run import run_selection

    from test_selectors import _tiny_snapshot

    model = _tiny_snapshot(digits_set)
    save_checkpoint(tmp_path / "snap.pt", {"model_spec": model.spec, "model": model.state_dict()})
    pool = Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[:200])
    pool.save(tmp_path / "pool.json")
    for name in SELECTORS:
        m = run_selection(digits_set, name, 0.1, tmp_path / f"{name}.json", tmp_path / "snap.pt",
                          pool=tmp_path / "pool.json", seed=1)
        assert len(m) == 20 and set(m.ids) <= set(pool.ids), name


def test_in_process_scorer_keeps_the_highest_losses(digits_set, tmp_path):
    run = tmp_path / "scored"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 2, "select.selector": "loss", "select.fraction": 0.25,
                                           "select.warmup": 1, "select.every": 1})
    t = create_trainer(cfg, progress=False)
    seen = {}
    step = t.training_step

    def spy(batch, epoch):
        rec = step(batch, epoch)
        if epoch == 0:
            seen.update(zip(batch.ids.tolist(), rec.losses.detach().tolist()))
        return rec

    t.training_step = spy
    t.fit()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [e["subset_round"] for e in epochs] == [None, 1]
    m = Manifest.load(run / "manifests" / "round-0001.json")
    n = len(m)
    assert n == round(0.25 * digits_set.count("train"))
    # the kept samples are those with the highest epoch-1 losses (samples dropped by drop_last were never
    # scored and rank first)
    unseen = set(digits_set.ids("train").tolist()) - set(seen)
    ranked = [i for i, _ in sorted(seen.items(), key=lambda kv: -kv[1])]
    assert set(m.ids.tolist()) == (unseen | set(ranked[: n - len(unseen)]))


def test_a_manifest_folder_loads_each_round_once(digits_set, tmp_path, monkeypatch):
    from pipeline.shards import manifest as manifest_mod
    from pipeline.shards.manifest import round_path

    folder = tmp_path / "m"
    Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[:128], round=1).save(round_path(folder, 1))
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "r", **{"data.manifests": str(folder)}), progress=False)
    loads = []
    real = manifest_mod.Manifest.load.__func__
    monkeypatch.setattr(manifest_mod.Manifest, "load", classmethod(lambda cls, p: loads.append(p) or real(cls, p)))
    for epoch in range(3):
        assert len(t._loader_for(epoch).planner.rows) == 128
    assert len(loads) == 1
    Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[:256], round=2).save(round_path(folder, 2))
    assert len(t._loader_for(3).planner.rows) == 256 and len(loads) == 2


def test_cli_errors_name_the_flag_the_user_typed(digits_set, tmp_path):

    r = pipeline_cli("train", "--data", digits_set.root, "--out", tmp_path / "x",
                        "--selector", "rcs", "--fraction", "2")
    assert r.returncode != 0 and "select.fraction = 2.0 (--fraction)" in r.stderr and "Traceback" not in r.stderr
    r = pipeline_cli("train", "--data", digits_set.root, "--out", tmp_path / "y",
                        "--set", "method.temperature=0.2")
    assert r.returncode != 0 and "acl.temperature" in r.stderr
