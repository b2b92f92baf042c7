"""Dynamic selection inside training (issue 38): the selective attack (attack.fraction, attack.select) and
InfoBatch for the ACL family, against hand computations, and resumed mid-run like every trainer."""

import json

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.losses import nt_xent, rescaled_mean, weighted_mean
from pipeline.shards.manifest import Manifest
from pipeline.trainers import create_trainer, load_config
from pipeline.trainers.selective import SelectiveAttack, attacked_count

from test_train import tiny_cfg


def _records(run, kind="epoch"):
    return [r for r in (json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_the_rules_pick_what_their_scores_say():
    ids = np.arange(100, 110)
    sa = SelectiveAttack(0.3, "divergence", ids, seed=0)
    first = sa.choose(ids, step=0)
    assert len(first) == 3 and len(set(first)) == 3  # nothing scored yet: 3 at random
    np.testing.assert_array_equal(first, sa.choose(ids, step=0))  # the same seed and step: the same samples
    # samples 100..105 scored (102 highest, then 104, 101); 106..109 never attacked, so never scored
    sa.observe(ids[:6], None, {"divergence": torch.tensor([0.1, 0.5, 0.9, 0.2, 0.7, 0.0])})
    assert set(ids[:6][sa.choose(ids[:6], step=1)]) == {102, 104}  # round(0.3 x 6) = 2, the highest
    assert set(ids[:9][sa.choose(ids[:9], 1)]) == {106, 107, 108}  # never scored: before all
    picked = set(ids[sa.choose(ids, step=2)])  # unscored first: three of the four never attacked
    assert len(picked) == 3 and picked <= {106, 107, 108, 109}
    # only attacked positions update a score: position 0's new value is ignored, position 2's taken
    sa.observe(ids[:3], np.array([2]), {"divergence": torch.tensor([9.0, 9.0, 0.05])})
    np.testing.assert_allclose(sa.book.lookup("divergence", ids[:3]), [0.1, 0.5, 0.05])
    assert attacked_count(128, 0.25) == 32 and attacked_count(3, 0.1) == 1 and attacked_count(5, 1.0) == 5
    rnd = SelectiveAttack(0.5, "random", ids, seed=4)
    picks = [tuple(rnd.choose(ids, s)) for s in range(20)]
    assert len(set(picks)) > 10 and all(len(p) == 5 for p in picks)  # a fresh draw every step


def test_acl_attacks_only_the_chosen_samples_with_the_whole_batch_loss(digits_set, tmp_path):
    """One PGD step by hand: a uniform start from the trainer's generator, the gradient of the whole batch's
    NT-Xent with the other views unperturbed, eval mode and the adversarial branch. The unattacked samples'
    adversarial views are their natural views, bit for bit."""
    cfg = tiny_cfg(digits_set.root, tmp_path / "r", **{"attack.fraction": 0.25, "attack.steps": 1,
                                                       "attack.eps": 0.1})
    with create_trainer(cfg, progress=False) as t:
        torch.manual_seed(0)
        views = torch.rand(16, 1, 8, 8)
        positions = torch.tensor([1, 5])
        rows = torch.tensor([1, 5, 9, 13])
        state = t.gen.get_state()
        adv = t.attack_some(views, positions)
        t.gen.set_state(state)
        start = (torch.rand(views[rows].shape, generator=t.gen) * 2 - 1) * 0.1
        delta = ((views[rows] + start).clamp(0, 1) - views[rows]).requires_grad_(True)
        t.model.eval()
        x = views.clone()
        x[rows] = views[rows] + delta
        loss = nt_xent(t.model(x, "adv", heads=("proj",))["proj"], cfg.acl.temperature)
        (grad,) = torch.autograd.grad(loss, delta)
        t.model.train()
        expect = ((delta.detach() + 0.025 * grad.sign()).clamp(-0.1, 0.1) + views[rows]).clamp(0, 1)
        torch.testing.assert_close(adv[rows], expect, rtol=0, atol=1e-6)
        others = torch.ones(16, dtype=torch.bool)
        others[rows] = False
        assert torch.equal(adv[others], views[others])
        assert (adv[rows] - views[rows]).abs().max() > 0


@pytest.mark.parametrize("method,rule", [("acl", "divergence"), ("pgd-at", "loss")])
def test_a_selective_run_counts_what_it_attacked_and_resumes_exactly(digits_set, tmp_path, method, rule):
    over = {"method.name": method, "attack.fraction": 0.25, "attack.select": rule, "attack.eps": 0.1,
            "attack.steps": 1, "optim.epochs": 2, "run.checkpoint_every_steps": 7}
    with create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **over), progress=False) as t:
        t.fit()
    epochs = _records(tmp_path / "a")
    batch = 64 if method == "acl" else 64
    steps = epochs[0]["steps"]
    assert epochs[0]["images"] == steps * batch
    assert epochs[0]["images_attacked"] == steps * attacked_count(batch, 0.25)  # 16 of every 64
    book = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["attack_selection"]
    scored = (~torch.isnan(book[f"value:{rule}"])).sum()
    assert 0 < scored < len(book["ids"])  # only attacked samples carry a score
    # stopped inside the first epoch (a step checkpoint) and resumed: the same weights
    with create_trainer(tiny_cfg(digits_set.root, tmp_path / "b", **over), progress=False) as t:
        t.fit(stop_after=1)
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ck["epoch"] == 1 and len(ck["attack_selection"]["ids"]) == len(book["ids"])
    with create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False) as t:
        t.fit()
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _records(tmp_path / "b")[-1]["images_attacked"] == epochs[-1]["images_attacked"]


def test_methods_without_a_selective_attack_refuse_a_fraction(digits_set, tmp_path):
    cfg = tiny_cfg(digits_set.root, tmp_path / "r", **{"method.name": "ascl", "attack.fraction": 0.5})
    with pytest.raises(PipelineError, match="method 'ascl' does not attack selectively"):
        create_trainer(cfg, progress=False)
    cfg = tiny_cfg(digits_set.root, tmp_path / "r", **{"attack.fraction": 0.5})
    with pytest.raises(PipelineError, match="attack.select"):
        cfg.set("attack.select", "hardest")
        create_trainer(cfg, progress=False)


def test_infobatch_weights_rescale_the_batch_mean():
    """InfoBatch's loss is mean(w l) over the batch (its code's loss.mul(weights).mean()); the duplicate
    weighting sum(w l) / sum(w) of facility's weights would undo the 1/(1 - r) rescaling."""
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([2.0, 1.0, 2.0, 1.0])
    assert float(rescaled_mean(losses, w)) == pytest.approx((2 + 2 + 6 + 4) / 4)
    assert float(weighted_mean(losses, w)) == pytest.approx((2 + 2 + 6 + 4) / 6)


def test_infobatch_for_acl_prunes_rescales_anneals_and_resumes(digits_set, tmp_path):
    over = {"select.selector": "infobatch", "select.params": "r=0.5,anneal=0.4", "optim.epochs": 3,
            "attack.eps": 0.1, "attack.steps": 1}
    with create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **over), progress=False) as t:
        t.fit()
        # the loop's reduction of a pruned epoch's batch is mean(w x loss), by hand
        t.subset = Manifest.load(tmp_path / "a" / "manifests" / "round-0001.json")
        losses, w = torch.tensor([0.5, 1.5, 2.5]), torch.tensor([2.0, 1.0, 2.0])
        assert float(t._reduce(losses, w)) == pytest.approx((1.0 + 1.5 + 5.0) / 3)
    epochs = _records(tmp_path / "a")
    m = Manifest.load(tmp_path / "a" / "manifests" / "round-0001.json")
    full = digits_set.count("train")
    assert m.extra["weighting"] == "rescale" and set(np.unique(m.weights)) <= {1.0, 2.0}
    assert 0.5 * full < len(m) < full  # about a quarter dropped: half of the low-loss half
    assert epochs[0]["subset_round"] is None and epochs[1]["subset_round"] == 1
    assert epochs[2]["subset_round"] is None  # the annealed last epoch: all data
    assert epochs[1]["images"] < epochs[0]["images"] and epochs[1]["images_attacked"] == epochs[1]["images"]
    with create_trainer(tiny_cfg(digits_set.root, tmp_path / "b", **over), progress=False) as t:
        t.fit(stop_after=2)
    with create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False) as t:
        t.fit()
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
