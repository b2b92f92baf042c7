"""Selectors: greedy correctness and bounds, apricot agreement, coverage, RCS gains vs autograd, determinism."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.selectors.greedy import facility_value, maximize
from pipeline.selectors.knn import knn_graph
from clirun import pipeline as pipeline_cli


def _random_graph(n, k, seed):
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return knn_graph(x, k)[0]


@pytest.mark.parametrize("seed", range(5))
def test_lazy_and_naive_greedy_pick_the_same(seed):
    g = _random_graph(120, 8, seed)
    mod = np.random.default_rng(seed).random(120) * 0.5
    for modular in (None, mod):
        naive = maximize(g, 15, "naive", modular)
        lazy = maximize(g, 15, "lazy", modular)
        assert naive.picks.tolist() == lazy.picks.tolist()
        np.testing.assert_allclose(naive.gains, lazy.gains)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_reaches_the_bound_of_the_optimum(seed):
    g = _random_graph(12, 4, seed)
    budget = 3
    best = max(facility_value(g, np.array(c)) for c in itertools.combinations(range(12), budget))
    for opt in ("lazy", "stochastic"):
        got = facility_value(g, maximize(g, budget, opt, seed=seed).picks)
        bound = 1 - 1 / np.e if opt == "lazy" else 1 - 1 / np.e - 0.01
        assert got >= bound * best - 1e-9
    assert facility_value(g, maximize(g, budget, "lazy").picks) == pytest.approx(
        maximize(g, budget, "lazy").objective, rel=1e-6)


def test_objective_matches_apricot_on_a_sparse_knn_instance():
    apricot = pytest.importorskip("apricot", reason="apricot-select (test dependency) not installed")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    g, _ = knn_graph(x, 15)
    budget = 150
    ours = maximize(g, budget, "lazy")
    csr = sp.csr_matrix(g, dtype=np.float64)
    csr.indices, csr.indptr = csr.indices.astype(np.int32), csr.indptr.astype(np.int32)
    sel = apricot.FacilityLocationSelection(budget, metric="precomputed", optimizer="lazy").fit(csr)
    theirs = facility_value(g, np.asarray(sel.ranking))
    assert facility_value(g, ours.picks) >= 0.995 * theirs


def test_facility_covers_every_cluster_where_random_misses(tmp_path):
    """20 tight clusters of 8 to 40 near-duplicates: 20 picks must hit all 20 clusters.

    (The k-NN graph must reach across a cluster: with k far below a cluster's size, each pick covers only its k
    neighbours and big clusters keep winning picks: a property of sparse facility location, not a bug.)"""
    from pipeline.selectors.facility import facility_select

    rng = np.random.default_rng(1)
    sizes = rng.integers(8, 41, 20)
    centres = rng.normal(size=(20, 32)) * 10
    x = np.concatenate([c + rng.normal(size=(s, 32)) * 0.05 for c, s in zip(centres, sizes)]).astype(np.float32)
    cluster = np.repeat(np.arange(20), sizes)
    picks, weights, _, _ = facility_select(x, 20, 40, "lazy", None, "auto", 0)
    assert len(set(cluster[picks])) == 20
    assert weights.sum() == len(x)  # every point is represented by exactly one pick
    random_hits = [len(set(cluster[np.random.default_rng(s).choice(len(x), 20, replace=False)])) for s in range(20)]
    assert max(random_hits) < 20


def _k_center_reference(x: np.ndarray, budget: int, first: int) -> list[int]:
    """Farthest-first traversal from scratch at every step, float64, exact distances: the definition."""
    picks = [first]
    while len(picks) < budget:
        d = np.sqrt(((x[:, None, :] - x[None, picks, :]) ** 2).sum(-1)).min(1)
        picks.append(int(np.argmax(d)))
    return picks


@pytest.mark.parametrize("seed", range(3))
def test_k_center_greedy_is_farthest_first(seed):
    from pipeline.selectors.kcenter import k_center_greedy

    x = np.random.default_rng(seed).normal(size=(300, 12)).astype(np.float32)
    picks, radii = k_center_greedy(x, 40, seed, block=64)  # blocks smaller than the pool: the blocked update
    assert picks.tolist() == _k_center_reference(x.astype(np.float64), 40, int(picks[0]))
    assert np.all(np.diff(radii[1:]) <= 1e-5)  # the covering radius never grows


def test_k_center_covers_every_cluster_where_random_misses():
    """20 tight clusters of very different sizes: 20 farthest-first picks hit every one."""
    from pipeline.selectors.kcenter import k_center_greedy

    rng = np.random.default_rng(3)
    sizes = rng.integers(2, 200, 20)
    centres = rng.normal(size=(20, 16)) * 10
    x = np.concatenate([c + rng.normal(size=(s, 16)) * 0.05 for c, s in zip(centres, sizes)]).astype(np.float32)
    cluster = np.repeat(np.arange(20), sizes)
    picks, _ = k_center_greedy(x, 20, 0)
    assert len(set(cluster[picks])) == 20
    random_hits = [len(set(cluster[np.random.default_rng(s).choice(len(x), 20, replace=False)])) for s in range(20)]
    assert max(random_hits) < 20


def _tiny_snapshot(digits_set):
    from pipeline.models import create_model, model_spec

    torch.manual_seed(0)
    model = create_model(model_spec("smallcnn", 1, 8, heads={"proj": {"kind": "mlp3", "width": 32, "out": 16}}))
    model.train()
    with torch.no_grad():  # give the batch norms some statistics
        for b in digits_set.loader("train", batch_size=128):
            model(b.images.float() / 255, model.branch("natural"))
            model(b.images.float() / 255 * 0.9 + 0.05, model.branch("adversarial"))
    return model.eval()


def test_closed_form_per_sample_head_gradients_equal_autograd(digits_set):
    from pipeline.losses import nt_xent
    from pipeline.models.multibn import use_branch
    from pipeline.losses import multiview_contrastive, row_gradients
    from pipeline.selectors.proxies import head_linears, head_rows_backward

    torch.manual_seed(0)
    model = _tiny_snapshot(digits_set)
    head = model.heads["proj"]
    nat = model.branch("natural")
    f = torch.randn(12, model.encoder.feature_dim)  # 6 samples x 2 views
    with torch.no_grad(), use_branch(head, nat):
        z = head(f)
    g = row_gradients(z, lambda zz: multiview_contrastive(zz, 2, 0.5, reduction="rows", detach_others=True))
    a_list, d_list = head_rows_backward(head, f, g, nat)
    lins = head_linears(head)
    for i in (0, 4):
        rows = [i, i + 6]
        closed = [sum(d[r][:, None] * a[r][None, :] for r in rows) for a, d in zip(a_list, d_list)]
        # autograd: the loss terms of rows i and i + 6, each with every other row held fixed
        total = 0
        for r in rows:
            with use_branch(head, nat):
                zr = head(f[r:r + 1])
            zz = z.detach().clone()
            zz = torch.cat([zz[:r], zr, zz[r + 1:]])
            sim = torch.nn.functional.normalize(zz, dim=1)
            logits = sim[r] @ sim.detach().t() / 0.5
            logits = logits.masked_fill(torch.arange(12) == r, float("-inf"))
            total = total + torch.nn.functional.cross_entropy(logits[None], torch.tensor([(r + 6) % 12]))
        auto = torch.autograd.grad(total, [lin.weight for lin in lins])
        for c, a in zip(closed, auto):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)
    assert nt_xent(z) > 0


def test_rcs_gains_equal_the_autograd_reference(digits_set):
    """The RD gradient of U is the autograd gradient of the full RD(U; theta): both the natural and the
    adversarial pass of the head depend on theta (a natural pass held constant gives another vector)."""
    from pipeline.losses import representational_divergence
    from pipeline.models.multibn import use_branch
    from pipeline.selectors.proxies import ProxyComputer, compress, head_linears, pick_gradient

    model = _tiny_snapshot(digits_set)
    pc = ProxyComputer(model, digits_set, "train", eps=0.1, step=0.025, attack_steps=1, seed=3,
                       validation_fraction=0.05)
    pool = digits_set.ids("train")[:200]
    p = pc.compute(pool)
    head = model.heads["proj"]
    nat, adv = model.branch("natural"), model.branch("adversarial")
    params = [q for lin in head_linears(head) for q in (lin.weight, lin.bias)]

    def rd_grad(detach_natural):
        with use_branch(head, nat):
            z_nat = head(p.val_feats[0])
        with use_branch(head, adv):
            z_adv = head(p.val_feats[1])
        z_nat = z_nat.detach() if detach_natural else z_nat
        grads = torch.autograd.grad(representational_divergence(z_adv, z_nat), params)
        return compress(list(grads[0::2]), list(grads[1::2])).numpy()

    full, half = rd_grad(False), rd_grad(True)
    np.testing.assert_allclose(p.val_compressed, full, rtol=1e-5, atol=1e-9)
    assert np.abs(full - half).max() > 1e-3 * np.abs(full).max()  # the natural pass matters: the test can fail
    # candidate gradients: rebuild sample 5's full gradient by autograd from its rows, compress, compare
    grads = pick_gradient(head, p.row_feats[[5]], p.row_grads[[5]], p.row_branches)
    comp = compress(grads[0::2], grads[1::2]).numpy()
    # row features are stored in float16, so the rebuilt gradient agrees to about 1e-2 relative
    np.testing.assert_allclose(p.compressed_grads[5], comp, rtol=2e-2, atol=1e-6)
    assert p.alignment[5] == pytest.approx(float(comp @ full), rel=2e-2, abs=1e-9)
    assert len(set(p.validation_ids) & set(p.candidate_ids)) == 0 and len(p.validation_ids) == 10


@pytest.mark.parametrize("selector,params", [("random", {}), ("random", {"per_class": True}),
                                             ("facility", {}), ("rcs", {}), ("rcs", {"unit": "batch", "batch_size": 16}),
                                             ("kcg", {})])
def test_same_seed_same_manifest(digits_set, tmp_path, selector, params):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.selectors.run import run_selection
    from pipeline.shards.manifest import Manifest

    model = _tiny_snapshot(digits_set)
    save_checkpoint(tmp_path / "snap.pt", {"model_spec": model.spec, "model": model.state_dict()})
    pool = Manifest.for_shardset(digits_set, "train", digits_set.ids("train")[:300])
    pool.save(tmp_path / "pool.json")
    out = []
    for name in ("a", "b"):
        m = run_selection(digits_set, selector, 0.1, tmp_path / f"{name}.json", tmp_path / "snap.pt",
                          pool=tmp_path / "pool.json", seed=4, params=params, attack_steps=1)
        out.append(Manifest.load(m.path))
    assert len(out[0]) == 30
    np.testing.assert_array_equal(out[0].ids, out[1].ids)
    assert set(out[0].ids) <= set(digits_set.ids("train")[:300])
    assert out[0].producer["name"] == selector and "timing" in out[0].extra
    if selector != "random":
        assert out[0].snapshot and len(out[0].extra.get("validation_ids", [])) >= (2 if selector == "rcs" else 0)


def test_knn_backends_agree_on_exact_neighbours():
    x = np.random.default_rng(2).normal(size=(500, 16)).astype(np.float32)
    flat, used = knn_graph(x, 10, "faiss-flat")
    brute, used2 = knn_graph(x, 10, "torch")
    assert (used, used2) == ("faiss-flat", "torch")
    assert abs(flat - brute).max() < 1e-5
    from pipeline.selectors.knn import _normalise, _torch_search, search

    xn = _normalise(x)
    blocks = _torch_search(xn, xn, 10, "cpu", max_elements=7 * 500)  # 7 queries a block, the last one short
    whole = search(xn, xn, 10, "faiss-flat")
    np.testing.assert_allclose(blocks[0], whole[0], atol=1e-5)
    assert (blocks[1] == whole[1]).mean() > 0.99  # ties aside, the same neighbours
    ivf, _ = knn_graph(np.tile(x, (80, 1)) + 1e-3 * np.random.default_rng(3).normal(size=(40000, 16)).astype(np.float32),
                       5, "faiss-ivf")
    assert ivf.shape == (40000, 40000) and ivf.nnz >= 40000


def test_select_cli(digits_set, tmp_path):

    from pipeline.shards.manifest import Manifest

    run = lambda *a: pipeline_cli("select", "--data", digits_set.root,
                                     "--device", "cpu", *map(str, a))
    r = run("--selector", "facility", "--fraction", "0.05", "--arch", "smallcnn", "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    assert "freshly initialised smallcnn" in r.stderr and "selected 72 of 1,438" in r.stderr
    m = Manifest.load(tmp_path / "m.json")
    m.check_against(digits_set)
    assert m.producer["params"]["k"] == 20 and m.weights is not None and m.weights.sum() == 1438
    for args, needle in ((("--selector", "kmeans", "--out", tmp_path / "x.json"), "selector 'kmeans'"),
                         (("--selector", "random", "--fraction", "1.5", "--out", tmp_path / "x.json"), "--fraction 1.5"),
                         (("--selector", "rcs", "--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "x.json"),
                          "no such checkpoint")):
        r = run(*args)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_rcs_block_refresh_keeps_the_per_pick_choices(digits_set):
    """Refreshing U's gradient 16 times per greedy instead of after every pick picks (nearly) the same set."""
    from pipeline.selectors.proxies import ProxyComputer
    from pipeline.selectors.rcs import RCSSelector, block_sizes, rcs_greedy

    assert block_sizes(10, 0) == [1] * 10 and block_sizes(10, 3) == [4, 3, 3] and sum(block_sizes(7, 16)) == 7
    model = _tiny_snapshot(digits_set)
    pc = ProxyComputer(model, digits_set, "train", eps=0.1, step=0.025, attack_steps=1, seed=3)
    p = pc.compute(digits_set.ids("train"))
    k = len(p.candidate_ids) // 5
    per_pick, gains = rcs_greedy(p, pc.head, k, 0.01, "sample", 1, np.random.default_rng(0), refreshes=0)
    blocks, _ = rcs_greedy(p, pc.head, k, 0.01, "sample", 1, np.random.default_rng(0),
                           refreshes=RCSSelector.defaults["refreshes"])
    assert len(per_pick) == len(blocks) == k == len(gains)
    assert len(set(per_pick) & set(blocks)) >= 0.95 * k
    assert gains[0] == pytest.approx(0.01 * p.alignment.max())  # the first pick is the best first-order gain


def test_rcs_reference_preset(digits_set, tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.selectors.run import run_selection

    model = _tiny_snapshot(digits_set)
    save_checkpoint(tmp_path / "snap.pt", {"model_spec": model.spec, "model": model.state_dict()})
    m = run_selection(digits_set, "rcs", 0.2, tmp_path / "ref.json", tmp_path / "snap.pt", seed=2,
                      params={"preset": "reference", "batch_size": 64})
    p = m.producer["params"]
    assert (p["preset"], p["unit"], p["chunk_size"], p["refreshes"], p["attack_steps"], p["draws"], p["normalize"]) == (
        "reference", "batch", 0, 0, 5, 1, False)
    assert p["batch_size"] == 64  # an explicit parameter still wins over the preset
    assert len(m) == round(0.2 * digits_set.count("train"))
    with pytest.raises(Exception, match="preset 'quick': choose one of reference, fast"):
        run_selection(digits_set, "rcs", 0.2, tmp_path / "x.json", tmp_path / "snap.pt", params={"preset": "quick"})


def test_whole_network_alignment_equals_autograd(digits_set, tmp_path):
    """`alignment`'s score: the forward-mode product equals <per-sample gradient of the rows' linearised loss,
    tangent> from autograd, for every parameter of the model; the selector keeps the lowest."""
    from pipeline.attacks import Budget
    from pipeline.checkpoint import save_checkpoint
    from pipeline.objectives import objective_of
    from pipeline.selectors.alignment import network_alignment
    from pipeline.selectors.run import run_selection

    model = _tiny_snapshot(digits_set)
    batch = next(iter(digits_set.loader("train", digits_set.ids("train")[:5], batch_size=5, shuffle=False)))
    rows = objective_of("acl").rows(model, batch, torch.Generator().manual_seed(0), {"min_crop_scale": 0.4},
                                    Budget(0.1, 0.025, 1))
    torch.manual_seed(1)
    tangent = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    fast = network_alignment(model, "proj", rows, tangent)
    for i in range(5):
        model.zero_grad()
        loss = sum((rows.grads[r][i] * model(rows.inputs[r][i:i + 1], rows.branches[r], heads=("proj",))["proj"][0]).sum()
                   for r in range(len(rows.grads)))
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        ref = sum((g * tangent[k]).sum() for (k, _), g in zip(model.named_parameters(), grads) if g is not None)
        assert float(fast[i]) == pytest.approx(float(ref), rel=1e-4, abs=1e-7)
    save_checkpoint(tmp_path / "snap.pt", {"model_spec": model.spec, "model": model.state_dict()})
    runs = [run_selection(digits_set, "alignment", 0.1, tmp_path / f"{n}.json", tmp_path / "snap.pt", seed=3,
                          params={"attack_steps": 1}) for n in "ab"]
    assert len(runs[0]) == round(0.1 * digits_set.count("train"))
    np.testing.assert_array_equal(runs[0].ids, runs[1].ids)
    assert not set(runs[0].ids) & set(runs[0].extra["validation_ids"])
