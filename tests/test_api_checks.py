"""The Python API checks what it is given as the CLI does (issue 39): each misuse is one error naming the
argument, raised at the call, never a traceback from deep inside, and no impossible value is accepted."""

import numpy as np
import pytest
import torch

import pipeline.api as pl
from pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def model(digits_set):
    return pl.create_model("smallcnn", digits_set, method="acl", model__head_width=16, model__proj_dim=8)


MISUSES = {
    "prepare-source-not-text": (lambda s, m, t: pl.prepare(123, t / "p"), "source = 123: give the source as text"),
    "prepare-unknown-option": (lambda s, m, t: pl.prepare("digits", t / "p", bogus=1), "unknown option 'bogus'"),
    "open-none": (lambda s, m, t: pl.open_shards(None), "path = None: give a path"),
    "loader-float-batch": (lambda s, m, t: pl.loader(s, batch_size=2.5), "batch size 2.5: a whole number >= 1"),
    "loader-negative-epoch": (lambda s, m, t: pl.loader(s, epoch=-1), "epoch -1: a whole number >= 0"),
    "loader-negative-seed": (lambda s, m, t: pl.loader(s, seed=-1), "seed -1: a whole number >= 0"),
    "loader-seed-beyond-int64": (lambda s, m, t: pl.loader(s, seed=2 ** 64), "below 2^63"),
    "loader-missing-device": (lambda s, m, t: pl.loader(s, device="cuda:7"), "device = 'cuda:7': no such CUDA"),
    "loader-float-ids": (lambda s, m, t: pl.loader(s, [0.5, 1.5]), "give sample ids"),
    "loader-not-shards": (lambda s, m, t: pl.loader(42), "shards = int: give a ShardSet"),
    "model-not-shards": (lambda s, m, t: pl.create_model("smallcnn", 42), "shards = int: give a ShardSet"),
    "model-negative-width": (lambda s, m, t: pl.create_model("smallcnn", s, model__head_width=-5),
                             "model.head_width = -5"),
    "snapshot-not-a-model": (lambda s, m, t: pl.save_snapshot(t / "x.pt", torch.nn.Linear(2, 2), s),
                             "model = Linear: save a model made by pl.create_model"),
    "snapshot-negative-eps": (lambda s, m, t: pl.save_snapshot(t / "x.pt", m, s, eps=-1.0),
                              "attack eps = -1.0: must be a number >= 0"),
    "snapshot-negative-epoch": (lambda s, m, t: pl.save_snapshot(t / "x.pt", m, s, epoch=-1), "epoch = -1"),
    "snapshot-unknown-method": (lambda s, m, t: pl.save_snapshot(t / "x.pt", m, s, method="nope"), "nope"),
    "select-fraction-text": (lambda s, m, t: pl.select(s, "random", "0.3", t / "m.json"), "fraction = '0.3'"),
    "select-seed-beyond-int64": (lambda s, m, t: pl.select(s, "random", 0.3, t / "m.json", seed=10 ** 23),
                                 "seed 100000000000000000000000: a whole number >= 0 (and below 2^63)"),
    "select-unknown-option": (lambda s, m, t: pl.select(s, "random", 0.3, t / "m.json", bogus=1),
                              "select: unknown option 'bogus'"),
    "budget-negative-steps": (lambda s, m, t: pl.budget(3, steps=-1), "attack steps = -1"),
    "budget-channels": (lambda s, m, t: pl.budget(0), "channels = 0"),
    "augment-size": (lambda s, m, t: pl.ContrastiveAugment(0), "ContrastiveAugment size = 0"),
    "augment-min-scale": (lambda s, m, t: pl.ContrastiveAugment(8, min_scale=2.0), "min_scale = 2.0"),
}


@pytest.mark.parametrize("case", MISUSES, ids=list(MISUSES))
def test_each_misuse_is_one_error_naming_the_argument(case, digits_set, model, tmp_path):
    call, needle = MISUSES[case]
    with pytest.raises(PipelineError) as info:
        call(digits_set, model, tmp_path)
    assert needle in str(info.value)
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("call,needle", [
    (lambda: pl.nt_xent(torch.randn(8)), "z must be 2-D"),
    (lambda: pl.nt_xent(torch.randn(8, 4), reduction="nope"), "reduction 'nope'"),
    (lambda: pl.weighted_mean(torch.randn(8), torch.ones(5)), "(5,) weights for (8,) values"),
], ids=["nt-xent-1d", "nt-xent-reduction", "weighted-mean-shapes"])
def test_the_tensor_functions_say_what_is_wrong(call, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_paths_and_id_lists_are_taken_where_a_shard_set_or_subset_goes(digits_set):
    ids = digits_set.ids("train")[:10].tolist()
    got = np.concatenate([b.ids.numpy() for b in pl.loader(str(digits_set.root), ids, batch_size=4)])
    assert sorted(got.tolist()) == ids
