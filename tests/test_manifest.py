"""Manifests: written atomically, read back exactly, refused when stale or malformed."""

import json

import numpy as np
import pytest

from conftest import make_prepared
from pipeline.errors import DataError
from pipeline.shards.manifest import Manifest, newest_valid, round_path


def _manifest(ss, n=20, **kw):
    return Manifest.for_shardset(ss, "train", ss.ids("train")[:n], producer={"name": "random", "params": {"seed": 1}}, **kw)


def test_round_trip_with_weights(digits_set, tmp_path):
    m = _manifest(digits_set, weights=np.linspace(1, 2, 20), round=3, epoch=40, fraction=0.1, extra={"timing": {"knn": 1.5}})
    path = m.save(tmp_path / "round-0003")
    assert path.name == "round-0003.json"
    back = Manifest.load(path)
    np.testing.assert_array_equal(back.ids, m.ids)
    np.testing.assert_allclose(back.weights, m.weights)
    assert (back.round, back.epoch, back.fraction, back.split) == (3, 40, 0.1, "train")
    assert back.producer["name"] == "random" and back.producer["version"]
    assert back.extra["timing"] == {"knn": 1.5}
    back.check_against(digits_set)


def test_stale_manifest_is_refused_naming_both(digits_set, tmp_path):
    other = make_prepared("digits", tmp_path / "other", seed=9)  # same images, other order: other fingerprint
    path = _manifest(other).save(tmp_path / "m.json")
    with pytest.raises(DataError) as err:
        Manifest.load(path).check_against(digits_set)
    msg = str(err.value)
    assert str(path) in msg and other.fingerprint in msg and digits_set.fingerprint in msg and str(digits_set.root) in msg


def test_wrong_split_and_foreign_ids_are_refused(digits_set, tmp_path):
    m = Manifest.for_shardset(digits_set, "val", [1, 2])
    with pytest.raises(DataError, match="split 'val'"):
        m.check_against(digits_set)
    test_id = int(digits_set.ids("test")[0])
    m = Manifest.for_shardset(digits_set, "train", [0, test_id])
    m.save(tmp_path / "x.json")
    with pytest.raises(DataError, match=f"x.json: sample id {test_id}"):
        Manifest.load(tmp_path / "x.json").check_against(digits_set)


def test_tampered_or_malformed_files_are_refused(digits_set, tmp_path):
    path = _manifest(digits_set).save(tmp_path / "round-0001.json")
    ids_file = tmp_path / json.loads(path.read_text())["ids_file"]
    np.save(ids_file, np.arange(1, 21))  # another id file under the same name
    with pytest.raises(DataError, match="does not match the digest"):
        Manifest.load(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="malformed manifest header"):
        Manifest.load(path)
    path.write_text(json.dumps({"format": "pipeline.manifest", "format_version": 1}))
    with pytest.raises(DataError, match="missing"):
        Manifest.load(path)
    with pytest.raises(DataError, match="no such manifest"):
        Manifest.load(tmp_path / "nope.json")


def test_pickled_id_file_is_not_unpickled(digits_set, tmp_path):
    path = _manifest(digits_set).save(tmp_path / "m.json")
    obj = np.array([{"a": 1}], dtype=object)
    np.save(tmp_path / "m.npy", obj, allow_pickle=True)
    h = json.loads(path.read_text())
    import hashlib

    h["ids_sha256"] = hashlib.sha256((tmp_path / "m.npy").read_bytes()).hexdigest()[:32]
    h["ids_file"] = "m.npy"
    path.write_text(json.dumps(h))
    with pytest.raises(DataError, match="m.npy: not a plain array"):
        Manifest.load(path)


def test_newest_valid_skips_broken_rounds(digits_set, tmp_path):
    for r in (1, 2, 3):
        _manifest(digits_set, n=10 * r, round=r).save(round_path(tmp_path, r))
    (tmp_path / "round-0003.json").write_text("{broken")
    m = newest_valid(tmp_path, digits_set)
    assert m.round == 2 and len(m) == 20
    assert newest_valid(tmp_path / "none", digits_set) is None
