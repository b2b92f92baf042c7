"""Methods beside ACL: SimCLR (one branch, no attack), and the pseudo-labels AdvCL trains on."""

import json

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import DataError
from pipeline.losses import nt_xent
from pipeline.pseudolabels import PseudoLabels, kmeans_labels, make_pseudo_labels
from pipeline.trainers import create_trainer, load_config

from test_train import tiny_cfg


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def simclr_run(digits_set, tmp_path_factory):
    run = tmp_path_factory.mktemp("simclr")
    create_trainer(tiny_cfg(digits_set.root, run, **{"method.name": "simclr", "optim.lr": 0.3}), progress=False).fit()
    return run


def test_simclr_is_one_branch_no_attack_and_resumes_exactly(digits_set, simclr_run, tmp_path):
    ckpt = load_checkpoint(simclr_run / "checkpoints" / "last.pt")
    assert ckpt["model_spec"]["branches"] == ["nat"] and set(ckpt["model_spec"]["roles"].values()) == {"nat"}
    epochs = [json.loads(ln) for ln in (simclr_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert len(epochs) == 2 and "loss_nt_xent" in epochs[0] and epochs[0].get("attack_s", 0) == 0
    cfg = tiny_cfg(digits_set.root, tmp_path / "b", **{"method.name": "simclr", "optim.lr": 0.3})
    create_trainer(cfg, progress=False).fit(stop_after=1)
    create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False).fit()
    a, b = _weights(simclr_run), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_simclr_step_loss_is_nt_xent_of_the_views(digits_set, tmp_path):
    """The step's per-sample losses are NT-Xent of the two views through the one branch (recomputed here
    from the same generator state)."""
    t = create_trainer(tiny_cfg(digits_set.root, tmp_path / "s", **{"method.name": "simclr"}), progress=False)
    batch = next(iter(digits_set.loader("train", backend="indexed", batch_size=16, shuffle=False)))
    state = t.gen.get_state()
    rec = t.training_step(batch, 0)
    t.gen.set_state(state)
    views = torch.cat([t.augment(batch.images, t.gen), t.augment(batch.images, t.gen)])
    expected = nt_xent(t.model(views, "nat")["proj"], 0.5, reduction="sample")
    assert torch.allclose(rec.losses, expected, atol=1e-5) and rec.losses.shape == (16,)


def test_pseudo_labels_seeded_exact_counts_and_stale_file_refused(digits_set, simclr_run, tmp_path):
    ckpt = simclr_run / "checkpoints" / "last.pt"
    a = make_pseudo_labels(digits_set.root, ckpt, (2, 10, 50), seed=3, progress=False)
    b = make_pseudo_labels(digits_set.root, ckpt, (2, 10, 50), seed=3, progress=False)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.ids, np.sort(digits_set.ids("train")))
    for i, k in enumerate(a.counts):
        assert len(np.unique(a.labels[:, i])) == k  # every cluster of each count holds samples
    header = a.save(tmp_path / "pl")
    back = PseudoLabels.load(header, digits_set.fingerprint)
    pick = a.ids[[5, 0, 17]]
    assert torch.equal(back.lookup(torch.from_numpy(pick)), torch.from_numpy(a.labels[[5, 0, 17]].astype(np.int64)))
    with pytest.raises(DataError, match="fingerprint .* but the data here has other"):
        PseudoLabels.load(header, "other")
    with pytest.raises(DataError, match="has none"):
        back.lookup(np.array([10 ** 9]))
    (tmp_path / json.loads(header.read_text())["labels_file"]).write_bytes(np.save.__doc__.encode()[:10])
    with pytest.raises(DataError, match="labels array"):
        PseudoLabels.load(header)


def test_kmeans_separates_obvious_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8, dtype=np.float32) * 10
    x = np.concatenate([c + rng.normal(0, 0.1, (50, 8)).astype(np.float32) for c in centres])
    labels = kmeans_labels(x, 4, seed=0)
    truth = np.repeat(np.arange(4), 50)
    # the same partition up to renaming: each true group maps to exactly one cluster and vice versa
    assert all(len(np.unique(labels[truth == g])) == 1 for g in range(4)) and len(np.unique(labels)) == 4


# -- losses and views ---------------------------------------------------------------------------------------

def test_multiview_contrastive_equals_a_direct_loop():
    """4 views, AdvCL's scale: each anchor's mean over its 3 positives of -log softmax, times the scale."""
    import torch.nn.functional as F
    from pipeline.losses import multiview_contrastive

    torch.manual_seed(1)
    b, v, t, scale = 3, 4, 0.5, 0.5 / 0.07
    z = torch.randn(b * v, 6)
    zn = F.normalize(z, dim=1)
    rows = []
    for a in range(b * v):
        den = sum(torch.exp(zn[a] @ zn[k] / t) for k in range(b * v) if k != a)
        pos = [p for p in range(b * v) if p != a and p % b == a % b]
        rows.append(-scale * sum(torch.log(torch.exp(zn[a] @ zn[p] / t) / den) for p in pos) / len(pos))
    rows = torch.stack(rows)
    got = multiview_contrastive(z, v, t, scale, reduction="rows")
    torch.testing.assert_close(got, rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(multiview_contrastive(z, v, t, scale, reduction="sample"), rows.view(v, b).mean(0))
    assert float(multiview_contrastive(z, v, t, scale)) == pytest.approx(float(rows.mean()), rel=1e-5)


def test_high_pass_view():
    from pipeline.augment import high_pass

    const = torch.full((2, 3, 8, 8), 0.7)
    assert torch.allclose(high_pass(const, 2), torch.zeros_like(const), atol=1e-6)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 1, 8, 8) - 0.5
    torch.testing.assert_close(high_pass(checker, 2), checker, rtol=0, atol=1e-6)  # all at the Nyquist corner
    # against the definition on a 6x6 image: explicit DFT sums, frequencies (u, v) dropped when their
    # fftshifted position (u + 3) mod 6, (v + 3) mod 6 lies within radius 2 of the centre (3, 3)
    rng = np.random.default_rng(0)
    x = rng.random((6, 6))
    n, r = 6, 2.0
    m = np.arange(n)
    w = np.exp(-2j * np.pi * np.outer(m, m) / n)
    spec = w @ x @ w.T
    for u in range(n):
        for v in range(n):
            su, sv = (u + n // 2) % n, (v + n // 2) % n
            if np.hypot(su - n / 2, sv - n / 2) < r:
                spec[u, v] = 0
    direct = (np.conj(w) @ spec @ np.conj(w).T / n ** 2).real
    got = high_pass(torch.from_numpy(x).float()[None, None], r)[0, 0].double().numpy()
    np.testing.assert_allclose(got, direct, atol=1e-5)


# -- AdvCL --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pseudo_file(digits_set, simclr_run, tmp_path_factory):
    pl = make_pseudo_labels(digits_set.root, simclr_run / "checkpoints" / "last.pt", (2, 10), seed=0, progress=False)
    return pl.save(tmp_path_factory.mktemp("pl") / "pl")


def advcl_cfg(data, out, pseudo, **over):
    return tiny_cfg(data, out, **{"method.name": "advcl", "advcl.pseudo_labels": str(pseudo), **over})


def test_advcl_joint_attack_raises_both_terms_in_the_ball_with_train_mode_statistics(digits_set, pseudo_file, tmp_path):
    from pipeline.augment import to_float
    from pipeline.trainers.advcl import NORMAL, PGD_CE, PGD_CL, advcl_views

    t = create_trainer(advcl_cfg(digits_set.root, tmp_path / "a", pseudo_file, **{"attack.steps": 3}), progress=False)
    batch = next(iter(digits_set.loader("train", backend="indexed", batch_size=64, shuffle=False)))
    targets = t.pseudo.lookup(batch.ids)
    x1, x2, x, hf = advcl_views(batch.images, t.gen, t.augment, t.radius)
    t._views = (x1, x2, hf)
    from pipeline.models.multibn import multibn_layers

    layer = multibn_layers(t.model.encoder)[0]
    before = {b: int(layer.bns[b].num_batches_tracked) for b in (NORMAL, PGD_CL, PGD_CE)}
    x_cl, x_ce = t.attack([x, x], targets)
    after = {b: int(layer.bns[b].num_batches_tracked) for b in (NORMAL, PGD_CL, PGD_CE)}
    # train mode, as the reference: each of the 3 steps passes the 3 natural views, x_cl and x_ce
    assert after[NORMAL] - before[NORMAL] == 3 * 3 and after[PGD_CL] - before[PGD_CL] == 3
    assert after[PGD_CE] - before[PGD_CE] == 3
    for adv in (x_cl, x_ce):
        assert (adv - x).abs().max() <= t.budget.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    t.model.eval()  # compare the terms with fixed statistics
    with torch.no_grad():
        _, con0, ce0 = t.loss(t._attack_forward(x, x), targets, parts=True)
        _, con1, ce1 = t.loss(t._attack_forward(x_cl, x_ce), targets, parts=True)
    assert con1.mean() > con0.mean() and ce1.mean() > ce0.mean()
    assert to_float(batch.images).shape == x.shape


def test_advcl_model_loss_scale_and_resume(digits_set, pseudo_file, tmp_path):
    cfg = advcl_cfg(digits_set.root, tmp_path / "a", pseudo_file)
    t = create_trainer(cfg, progress=False)
    spec = t.spec
    assert spec["branches"] == ["normal", "pgd", "pgd_ce"] and spec["roles"]["eval"] == "pgd"
    assert spec["heads"]["proj"]["shared_bn"] and {"cluster_2", "cluster_10"} <= set(spec["heads"])
    assert cfg.optim.optimizer == "sgd" and cfg.optim.lr == 0.1  # tiny_cfg's explicit settings win over defaults
    assert t.scale == pytest.approx(0.5 / 0.07)
    plain = create_trainer(advcl_cfg(digits_set.root, tmp_path / "p", pseudo_file,
                                     **{"advcl.scale_temperature": False}), progress=False)
    assert plain.scale == 1.0
    t.fit()
    epochs = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert len(epochs) == 2 and {"loss_contrastive", "loss_pseudo"} <= set(epochs[0]) and epochs[0]["attack_s"] > 0
    b = advcl_cfg(digits_set.root, tmp_path / "b", pseudo_file)
    create_trainer(b, progress=False).fit(stop_after=1)
    create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False).fit()
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_advcl_needs_pseudo_labels_of_this_data(digits_set, tmp_path):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="pipeline pseudo-labels"):
        create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **{"method.name": "advcl"}), progress=False)


def test_method_defaults_apply_only_to_unset_settings():
    from pipeline.trainers import TRAINERS, TrainConfig

    cfg = TrainConfig()
    cfg.set("method.name", "advcl")
    cfg.set("optim.lr", 0.3)
    cfg.apply_defaults(TRAINERS["advcl"].config_defaults)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.3, 1e-4)


# -- ASCL ---------------------------------------------------------------------------------------------------

def test_ascl_masks_equal_a_hand_written_loop_and_fractions_match():
    from pipeline.trainers.ascl import ascl_loss, ascl_masks

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, 16))
    preds = torch.from_numpy(rng.integers(0, 3, 16))
    n = len(labels)
    for rule in ("all", "hard", "soft", "leaking"):
        pos, legal = ascl_masks(labels, preds, rule)
        for i in range(n):
            for j in range(n):
                y_i, y_j, p_i, p_j = int(labels[i]), int(labels[j]), int(preds[i]), int(preds[j])
                if i == j:
                    want_pos = want_legal = False
                elif rule == "all":
                    want_pos, want_legal = y_i == y_j, True
                elif rule == "hard":  # negatives the model predicts as the anchor's class
                    want_pos, want_legal = y_i == y_j, y_i == y_j or p_j == y_i
                elif rule == "soft":  # negatives predicted like the anchor
                    want_pos, want_legal = y_i == y_j, y_i == y_j or p_j == p_i
                else:  # leaking: only what is predicted like the anchor takes part
                    want_pos, want_legal = y_i == y_j and p_i == p_j, p_i == p_j
                assert (bool(pos[i, j]), bool(legal[i, j])) == (want_pos, want_legal), (rule, i, j)
        z = torch.randn(n, 5)
        _, kept = ascl_loss(z, labels, preds, rule, 0.2)
        all_pos = sum(int(labels[i] == labels[j]) for i in range(n) for j in range(n) if i != j)
        negs = [(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]]
        assert kept["positives_kept"] == pytest.approx(int(pos.sum()) / all_pos)
        assert kept["negatives_kept"] == pytest.approx(sum(bool(legal[i, j]) for i, j in negs) / len(negs))


def test_ascl_loss_equals_the_definition():
    """Anchor i: -mean over positives of log(exp(s_ij) / sum over legal k of exp(s_ik)), s = -linf / T."""
    import torch.nn.functional as F
    from pipeline.trainers.ascl import ascl_loss, ascl_masks

    torch.manual_seed(0)
    labels, preds = torch.tensor([0, 0, 1, 1, 0, 2]), torch.tensor([0, 1, 1, 1, 0, 0])
    z = torch.randn(6, 4)
    zn = F.normalize(z, dim=1)
    got, _ = ascl_loss(z, labels, preds, "leaking", 0.2)
    pos, legal = ascl_masks(labels, preds, "leaking")
    for i in range(6):
        s = [-(zn[i] - zn[k]).abs().max() / 0.2 for k in range(6)]
        den = sum(torch.exp(s[k]) for k in range(6) if legal[i, k])
        ps = [j for j in range(6) if pos[i, j]]
        want = -sum(torch.log(torch.exp(s[j]) / den) for j in ps) / len(ps) if ps else torch.tensor(0.0)
        assert float(got[i]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def test_ascl_trains_logs_fractions_resumes_and_evaluates_directly(digits_set, tmp_path):
    from pipeline.evaluation import evaluate
    from pipeline.trainers.ascl import scaled_milestones

    assert scaled_milestones(120) == [100, 105, 110] and scaled_milestones(12) == [10, 11]
    over = {"method.name": "ascl", "optim.schedule": "step"}
    a = create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **over), progress=False)
    assert a.spec["heads"]["logits"]["out"] == 10 and a.cfg.optim.milestones == [2]
    a.fit()
    epochs = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert 0 <= epochs[-1]["positives_kept"] <= 1 and 0 <= epochs[-1]["negatives_kept"] <= 1
    assert {"loss_ascl", "loss_kl", "loss_ce_adv"} <= set(epochs[-1])
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "b", **over), progress=False).fit(stop_after=1)
    create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False).fit()
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    r = evaluate(digits_set.root, ckpt, protocol="direct", attack="clean", limit=100, progress=False)
    # the model's own classifier, by hand
    from pipeline.checkpoint import load_model
    from pipeline.augment import to_float

    model, _ = load_model(ckpt)
    model.eval()
    ids = digits_set.ids("test")[:100]
    correct = 0
    for b in digits_set.loader("test", ids, batch_size=50, shuffle=False):
        with torch.no_grad():
            correct += int((model(to_float(b.images), "nat", heads=("logits",))["logits"].argmax(1) == b.labels).sum())
    assert r["clean"] == pytest.approx(correct / 100) and r["finetune_losses"] == []


def test_direct_protocol_refuses_a_model_without_a_classifier(digits_set, simclr_run):
    from pipeline.errors import PipelineError
    from pipeline.evaluation import evaluate

    with pytest.raises(PipelineError, match="own classifier"):
        evaluate(digits_set.root, simclr_run / "checkpoints" / "last.pt", protocol="direct", attack="clean")


# -- selection for every method -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["simclr", "advcl", "ascl"])
def test_rcs_selects_for_every_method(digits_set, pseudo_file, tmp_path, method):
    from pipeline.shards.manifest import Manifest

    """simclr overlapped (its epochs on digits last under a second, a round several: 8 epochs leave time for
    one), the others waiting for each round; the proxies are the checkpoint's method's."""
    run = tmp_path / method
    overlapped = method == "simclr"
    over = {"method.name": method, "optim.epochs": 8 if overlapped else 3, "select.selector": "rcs",
            "select.fraction": 0.3, "select.warmup": 1, "select.every": 1, "select.sync": not overlapped}
    if method == "advcl":
        over["advcl.pseudo_labels"] = str(pseudo_file)
    create_trainer(tiny_cfg(digits_set.root, run, **over), progress=False).fit()
    rounds = [Manifest.load(p) for p in sorted((run / "manifests").glob("round-*.json"))]
    assert rounds and all(r.extra["selection_settings"]["method"] == method for r in rounds)
    assert all(len(r.ids) == round(0.3 * r.extra["pool_size"]) for r in rounds)
    epochs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "epoch" and e.get("subset_round") for e in epochs)
