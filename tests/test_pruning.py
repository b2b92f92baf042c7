"""In-process pruning: the pruner keeps exactly the fraction and the ids its order asks for, forgetting counts,
InfoBatch's rescaling keeps the expected gradient, resume equality, every trainer with every pruner."""

import json

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.shards.manifest import Manifest
from pipeline.trainers import create_trainer, load_config
from pipeline.trainers.pruning import PRUNERS, ScoreBook, infobatch_draw, infobatch_full_from, prune

from test_train import tiny_cfg

IDS = np.arange(100, 120)
SCORE = np.array([5, 1, 9, 3, 7, 0, 2, 8, 6, 4, 15, 11, 19, 13, 17, 10, 12, 18, 16, 14], dtype=float)


def test_prune_highest_lowest_and_unscored_first():
    assert prune(IDS, SCORE, 5, "highest").tolist() == [110, 112, 114, 117, 118]  # scores 15, 19, 17, 18, 16
    assert prune(IDS, SCORE, 3, "lowest").tolist() == [101, 105, 106]  # scores 1, 0, 2
    s = SCORE.copy()
    s[[0, 3]] = np.nan  # never scored: kept first
    assert prune(IDS, s, 4, "highest").tolist() == [100, 103, 112, 117]


def test_prune_stratified_takes_evenly_from_every_bin():
    rng = np.random.default_rng(0)
    keep = prune(IDS, SCORE, 8, "stratified", bins=4, rng=rng)
    assert len(keep) == 8 and len(set(keep.tolist())) == 8
    bins = np.digitize(SCORE[np.searchsorted(IDS, keep)], [4.5, 9.5, 14.5])  # 5 samples per score bin
    assert np.bincount(bins, minlength=4).tolist() == [2, 2, 2, 2]
    again = prune(IDS, SCORE, 8, "stratified", bins=4, rng=np.random.default_rng(0))
    assert again.tolist() == keep.tolist()  # seeded


def test_forgetting_counts_on_a_scripted_sequence():
    book = ScoreBook(np.array([1, 2, 3]))
    script = [[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]]  # correct under attack, per epoch
    for row in script:
        book.update(np.array([1, 2, 3]), {"correct_adv": np.array(row, dtype=float)})
    # id 1: 1->0 (epoch 2), 1->0 (epoch 4): 2; id 2: 1->0 at epoch 5: 1; id 3: 1->0 at 3, 1->0 at 5: 2
    assert book.score("forgetting").tolist() == [2, 1, 2]
    book.update(np.array([3, 1]), {"margin": np.array([0.5, -1.0])})
    s = book.score("margin")
    assert s[0] == 1.0 and np.isnan(s[1]) and s[2] == -0.5  # low margin ranks high


@pytest.mark.parametrize("epochs,anneal,pruned", [(10, 0.125, 9), (200, 0.125, 176), (8, 0.125, 8), (3, 0.4, 2),
                                                   (10, 0.0, 10)])
def test_infobatch_anneals_as_its_sampler(epochs, anneal, pruned):
    """InfoBatch's IBSampler prunes epoch i (0-based) while i <= delta x epochs, delta = 1 - anneal: the epochs
    pruned, counted by hand from that rule (0.875 x 10 = 8.75: 0..8; 0.875 x 200 = 175: 0..175; 0.875 x 8 = 7:
    all; 0.6 x 3 = 1.8: 0..1)."""
    assert min(infobatch_full_from(epochs, anneal), epochs) == pruned


def test_infobatch_rescaling_keeps_the_expected_gradient():
    """As InfoBatch's code: int(keep x n_low) of the n_low below-mean samples kept at random, weight 1/keep. The
    expected weighted gradient is the full one up to that floor: low-loss part x (k / n_low) / keep."""
    rng = np.random.default_rng(0)
    n = 40
    ids = np.arange(n)
    losses = rng.exponential(size=n)
    losses[3] = np.nan  # never scored: always kept
    grads = rng.normal(size=(n, 3))  # each sample's gradient
    low = losses < np.nanmean(losses)
    n_low = int(low.sum())
    full = grads[~low].sum(0) + grads[low].sum(0) * (int(0.5 * n_low) / n_low) / 0.5  # the floor, by hand
    assert n_low % 2 == 1  # an odd count: the floor is not nothing here (one sample of the expectation)
    draws = []
    for _ in range(20000):
        keep, w = infobatch_draw(ids, losses, 0.5, rng)
        draws.append((w[:, None] * grads[keep]).sum(0))
    draws = np.array(draws)
    se = draws.std(0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - full) < 4 * se + 1e-9)
    keep, w = infobatch_draw(ids, losses, 0.5, np.random.default_rng(1))
    assert set(ids[~low & ~np.isnan(losses)]) <= set(keep) and 3 in keep  # high-loss and unscored all kept
    assert set(np.unique(w)) <= {1.0, 2.0} and len(keep) == n - n_low + n_low // 2  # exactly half the low, floored
    # without the 1/(1-r) weights the estimate is biased low: the test above would catch a missing rescale
    unweighted = np.mean([grads[infobatch_draw(ids, losses, 0.5, rng)[0]].sum(0) for _ in range(2000)], 0)
    assert np.abs(unweighted - full).max() > 10 * se.max()


@pytest.mark.parametrize("method", ["pgd-at", "trades", "mart"])
@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_every_trainer_with_every_pruner(digits_set, tmp_path, method, pruner):
    params = "anneal=0.4" if pruner == "infobatch" else "order=stratified,bins=4" if pruner == "el2n" else ""
    cfg = tiny_cfg(digits_set.root, tmp_path / "r", **{
        "method.name": method, "attack.eps": 0.1, "attack.steps": 1, "optim.epochs": 3, "select.selector": pruner,
        "select.fraction": 0.3, "select.warmup": 1, "select.every": 1, "select.params": params})
    create_trainer(cfg, progress=False).fit()
    epochs = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in ln]
    full = digits_set.count("train")
    assert epochs[0]["subset_round"] is None
    if pruner == "infobatch":  # epoch 2 drops part of the low-loss half; epoch 3 is the annealed full epoch
        m = Manifest.load(tmp_path / "r" / "manifests" / "round-0001.json")
        assert 0.4 * full < len(m) < full and m.weights is not None and set(np.unique(m.weights)) <= {1.0, 2.0}
        assert epochs[2]["subset_round"] is None
    else:
        assert epochs[1]["subset_round"] == 1 and epochs[2]["subset_round"] == 2
        assert len(Manifest.load(tmp_path / "r" / "manifests" / "round-0002.json")) == round(0.3 * full)
        assert epochs[1]["images"] < 0.35 * full  # the pruned epoch read only the kept samples


def test_resume_with_a_pruner_equals_an_uninterrupted_run(digits_set, tmp_path):
    over = {"method.name": "trades", "attack.eps": 0.1, "attack.steps": 1, "optim.epochs": 3,
            "select.selector": "forgetting", "select.fraction": 0.4, "select.warmup": 1, "select.every": 1}
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "a", **over), progress=False).fit()
    create_trainer(tiny_cfg(digits_set.root, tmp_path / "b", **over), progress=False).fit(stop_after=2)
    create_trainer(load_config(tmp_path / "b" / "config.toml"), resume=True, progress=False).fit()
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("round-0001.json", "round-0002.json"):
        assert Manifest.load(tmp_path / "a" / "manifests" / name).ids.tolist() == \
            Manifest.load(tmp_path / "b" / "manifests" / name).ids.tolist()
