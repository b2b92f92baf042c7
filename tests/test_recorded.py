"""select.proxies = recorded: rows that training recorded stand in for the proxy pass (selectors/recorded.py)."""

import json

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.selectors.proxies import ProxyComputer, compressed_rows
from pipeline.selectors.recorded import RecordedRows, RowBook
from pipeline.shards.manifest import Manifest
from pipeline.trainers import create_trainer, load_config

from test_selectors import _tiny_snapshot
from test_train import tiny_cfg


def _computer(model, ss, val, **kw):
    return ProxyComputer(model, ss, "train", "cpu", 64, 0.1, 0.025, 1, seed=3, validation_ids=val, **kw)


def test_recorded_rows_stand_in_for_the_proxy_pass_and_the_rest_is_fresh(digits_set):
    """Merged proxies: recorded candidates' compressed gradients rebuilt from their rows at this head, the
    others exactly those of a fresh pass over them alone, in candidate order; U untouched."""
    model = _tiny_snapshot(digits_set)
    pool = digits_set.ids("train")[:400]
    val = pool[::40]
    full = _computer(model, digits_set, val).compute(pool, need_features=False, spread=False)
    taken = np.arange(0, len(full.candidate_ids), 3)  # every third candidate has recorded rows
    rec = RecordedRows(full.candidate_ids[taken], full.row_feats[taken].numpy(), full.row_grads[taken].numpy(),
                       full.row_branches, np.zeros(len(taken), np.int64))
    pc = _computer(model, digits_set, val, recorded=rec)
    merged = pc.compute(pool, need_features=False, spread=False)
    fresh_ids = np.setdiff1d(full.candidate_ids, rec.ids)
    assert pc.fresh_count == len(fresh_ids)
    np.testing.assert_array_equal(merged.candidate_ids, full.candidate_ids)
    alone = _computer(model, digits_set, val).compute(np.union1d(fresh_ids, val), need_features=False, spread=False)
    is_fresh = np.isin(merged.candidate_ids, fresh_ids)
    np.testing.assert_array_equal(merged.compressed_grads[is_fresh], alone.compressed_grads)
    np.testing.assert_array_equal(merged.row_grads[torch.from_numpy(is_fresh)].numpy(), alone.row_grads.numpy())
    expect = compressed_rows(model.heads["proj"], rec.rows(np.arange(len(rec.ids)))).numpy()
    np.testing.assert_allclose(merged.compressed_grads[~is_fresh], expect, rtol=1e-6, atol=1e-9)
    # rows of float16 inputs give the fresh pass's gradients to float16 precision
    np.testing.assert_allclose(merged.compressed_grads[~is_fresh], full.compressed_grads[taken], rtol=2e-2, atol=1e-6)
    np.testing.assert_array_equal(merged.val_compressed, full.val_compressed)


def test_rows_files_are_validated(tmp_path):
    book = RowBook(np.arange(10, 20))
    from pipeline.objectives import HeadRows

    rows = HeadRows([torch.randn(3, 5), torch.randn(3, 5)], [torch.randn(3, 2), torch.randn(3, 2)], ["n", "a"])
    book.add(np.array([11, 15, 99]), rows, epoch=4)  # 99 is not in the pool: left out
    assert book.latest.tolist() == [-1, 4, -1, -1, -1, 4, -1, -1, -1, -1]
    back = RecordedRows.load(book.recorded(4).save(tmp_path / "r.rows"))
    np.testing.assert_array_equal(back.ids, [11, 15])
    np.testing.assert_array_equal(back.feats[1], torch.stack([f[1] for f in rows.feats]).half().numpy())
    np.testing.assert_array_equal(back.grads[0], torch.stack([g[0] for g in rows.grads]).numpy())
    assert back.branches == ("n", "a") and not len(book.recorded(5).ids)
    again = RowBook(np.arange(10, 20))
    again.load(book.save(tmp_path / "book.rows"))
    np.testing.assert_array_equal(again.epochs, book.epochs)
    np.testing.assert_array_equal(again.grads, book.grads)
    (tmp_path / "torn.rows").write_bytes((tmp_path / "r.rows").read_bytes()[:-100])
    with pytest.raises(PipelineError, match="torn.rows: (not a file of recorded selection rows|recorded rows with "
                                             "a damaged seal)"):
        RecordedRows.load(tmp_path / "torn.rows")

    def write(name, ids, allow_pickle=False):
        with open(tmp_path / name, "wb") as f:
            for a in (ids, back.feats, back.grads, back.epochs, np.array(back.branches)):
                np.save(f, a, allow_pickle=allow_pickle)

    write("odd.rows", np.array([2, 1]))
    with pytest.raises(PipelineError, match="odd.rows: recorded rows whose arrays do not agree"):
        RecordedRows.load(tmp_path / "odd.rows")
    write("pickled.rows", np.array([1, 2], dtype=object), allow_pickle=True)
    with pytest.raises(PipelineError, match="pickled.rows: not a file of recorded selection rows"):
        RecordedRows.load(tmp_path / "pickled.rows")


def test_a_book_of_k_records_averages_a_samples_last_k_visits(tmp_path):
    """select.row_epochs = 2: a round rebuilds the mean of a sample's last two records' gradients (a third
    visit replaces the oldest); its features are the mean of its natural rows; a sample visited once has its
    one record at full weight; the book saves and loads exactly, and loads as a round's rows."""
    from pipeline.objectives import HeadRows

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
    visits = [HeadRows([torch.randn(2, 5).half().float() for _ in "na"], [torch.randn(2, 3), torch.randn(2, 3)],
                       ["n", "a"]) for _ in range(3)]  # head inputs float16-exact: the book keeps them so
    book = RowBook(np.array([7, 8, 9]), slots=2)
    for epoch, rows in enumerate(visits):
        ids = np.array([7, 8]) if epoch < 2 else np.array([7, 9])  # 7 three times, 8 twice, 9 once
        book.add(ids, rows if epoch < 2 else HeadRows([f[[0, 1]] for f in rows.feats],
                                                      [g[[0, 1]] for g in rows.grads], rows.branches), epoch)

    def one(rows, i):
        return HeadRows([f[i:i + 1] for f in rows.feats], [g[i:i + 1] for g in rows.grads], rows.branches)

    rec = book.recorded()
    assert rec.ids.tolist() == [7, 8, 9] and rec.counts.tolist() == [2, 2, 1] and rec.slots == 2
    assert rec.epochs.tolist() == [2, 1, 2] and rec.branches == ("n", "a", "n", "a")
    got = compressed_rows(head, rec.rows(np.arange(3))).numpy()
    want = [(compressed_rows(head, one(visits[1], 0)) + compressed_rows(head, one(visits[2], 0))) / 2,  # 1 and 2
            (compressed_rows(head, one(visits[0], 1)) + compressed_rows(head, one(visits[1], 1))) / 2,
            compressed_rows(head, one(visits[2], 1))]
    np.testing.assert_allclose(got, torch.cat(want).numpy(), rtol=1e-5, atol=1e-7)
    feats = rec.natural_features(np.arange(3), "n").astype(np.float32)
    np.testing.assert_allclose(feats[1], ((visits[0].feats[0][1] + visits[1].feats[0][1]) / 2).numpy(), atol=2e-3)
    np.testing.assert_allclose(feats[2], visits[2].feats[0][1].numpy(), atol=2e-3)
    assert book.recorded(since_epoch=2).ids.tolist() == [7, 9]
    again = RowBook(np.array([7, 8, 9]), slots=2)
    again.load(book.save(tmp_path / "book.rows"))
    np.testing.assert_array_equal(again.feats, book.feats)
    np.testing.assert_array_equal(again.epochs, book.epochs)
    np.testing.assert_array_equal(again.visits, book.visits)
    as_round = RecordedRows.load(tmp_path / "book.rows")  # `pipeline select --recorded RUN/snapshots/book.rows`
    np.testing.assert_array_equal(as_round.grads, rec.grads)
    back = RecordedRows.load(rec.save(tmp_path / "round.rows"))
    assert back.slots == 2 and back.counts.tolist() == [2, 2, 1]


def test_rounds_from_recorded_rows_are_the_default_where_they_can_be(digits_set, tmp_path):
    """select.proxies = auto: model-based selectors that take rows use them, in the trainer's process, and
    k-center greedy's features come from them too (no pass over the images); alignment, which passes the
    images itself, and methods that record nothing select from fresh proxies."""
    run = tmp_path / "kcg"
    cfg = tiny_cfg(digits_set.root, run, **{"optim.epochs": 3, "select.selector": "kcg", "select.fraction": 0.3,
                                          "select.warmup": 1, "select.every": 1, "attack.eps": 0.1})
    with create_trainer(cfg, progress=False) as t:
        assert t.subsets.scheduler.recorded and t.subsets.scheduler.processes == 0
        t.fit()
    m = Manifest.load(run / "manifests" / "round-0001.json")
    first = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch")
    assert m.extra["timing"]["fresh_rows"] == digits_set.count("train") - first["images"]  # the dropped batch
    for over in ({"select.selector": "alignment"}, {"method.name": "pgd-at", "select.selector": "facility"}):
        cfg = tiny_cfg(digits_set.root, tmp_path / "f", **{"select.selector": "rcs", "select.warmup": 1,
                                                     "optim.epochs": 3, **over})
        with create_trainer(cfg, progress=False) as t:
            assert not t.subsets.scheduler.recorded and t.subsets.book is None


def _recorded_run(root, run, selector="rcs", proxies="recorded", **over):
    cfg = tiny_cfg(root, run, **{"optim.epochs": 4, "select.selector": selector, "select.fraction": 0.3,
                                 "select.warmup": 1, "select.every": 1, "select.proxies": proxies,
                                 "select.params": "refreshes=2" if selector == "rcs" else "",
                                 "attack.eps": 0.1, "select.processes": 1, **over})  # rows through a file
    return cfg


def test_a_run_selects_from_recorded_rows_resumes_exactly_and_recording_changes_no_weight(digits_set, tmp_path):
    run = tmp_path / "rec"
    with create_trainer(_recorded_run(digits_set.root, run), progress=False) as t:
        t.fit()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pool = len(Manifest.load(run / "selection" / "pool.json"))
    epochs = [r for r in recs if r["kind"] == "epoch"]
    # drop_last leaves the last partial batch of an epoch unrecorded; every sample trained on has rows
    assert epochs[0]["recorded_rows"] == epochs[0]["images"] and pool - 64 < epochs[0]["images"] <= pool
    rounds = sorted((run / "manifests").glob("round-*.json"))
    assert len(rounds) == 2  # snapshots before epochs 2 and 3; one before epoch 4 would be due after the end
    timing = [Manifest.load(p).extra["timing"] for p in rounds]
    assert timing[0]["fresh_rows"] == pool - epochs[0]["images"]  # only the samples epoch 1 did not reach
    assert all(t["fresh_rows"] < pool // 4 for t in timing)
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["book.rows", "round-0001.pt", "round-0002.pt"]  # round rows gone once used
    # stopped after 2 epochs and resumed: the same rounds and weights as without the stop
    half = tmp_path / "half"
    with create_trainer(_recorded_run(digits_set.root, half), progress=False) as t:
        t.fit(stop_after=2)
    with create_trainer(load_config(half / "config.toml"), resume=True, progress=False) as t:
        t.fit()
    for p in rounds:
        np.testing.assert_array_equal(Manifest.load(p).ids, Manifest.load(half / "manifests" / p.name).ids)
    wa, wb = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in (run, half))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # recording has no side effect on training: a random-subset run trains the same weights either way
    ws = []
    for proxies in ("fresh", "recorded"):
        out = tmp_path / f"random-{proxies}"
        with create_trainer(_recorded_run(digits_set.root, out, "random", proxies, **{"optim.epochs": 3}),
                            progress=False) as t:
            t.fit()
        ws.append(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(ws[0][k], ws[1][k]) for k in ws[0])


def test_recorded_proxies_need_a_method_that_records(digits_set, tmp_path):
    cfg = _recorded_run(digits_set.root, tmp_path / "x", **{"method.name": "ascl"})
    with pytest.raises(PipelineError, match="does not say how its steps give selection rows"):
        create_trainer(cfg, progress=False)


def test_rounds_in_the_trainers_process(digits_set, tmp_path):
    """select.processes = 0: no process is started; the rounds are written and used on the same schedule."""
    run = tmp_path / "inproc"
    with create_trainer(_recorded_run(digits_set.root, run, **{"select.processes": 0, "optim.epochs": 3}),
                        progress=False) as t:
        t.fit()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["used_from_epoch"]) for r in recs if r["kind"] == "selection"] == [(1, 3)]
    assert [e["subset_round"] for e in recs if e["kind"] == "epoch"] == [None, None, 1]
    m = Manifest.load(run / "manifests" / "round-0001.json")
    assert m.extra["timing"]["fresh_rows"] < len(m) and m.producer["name"] == "rcs"
