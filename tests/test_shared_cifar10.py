"""prepare on the real CIFAR-10 JPEG folders of ../shared/data (skipped when absent)."""

import numpy as np
import pytest

from conftest import SHARED_DATA, make_prepared

CIFAR = SHARED_DATA / "cifar10"


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR / "train").is_dir(), reason=f"real CIFAR-10 not found at {CIFAR}")
def test_prepare_shared_cifar10(tmp_path):
    ss = make_prepared(f"folder:{CIFAR}", tmp_path / "cifar10", workers=2, shard_size=10000)
    assert ss.count("train") == 50000 and ss.count("test") == 10000
    assert ss.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ss.index["skipped"] == []
    assert np.bincount(ss.labels("train")).tolist() == [5000] * 10
    assert np.bincount(ss.labels("test")).tolist() == [1000] * 10
    # labels come from the folder names: check a sample of members against their source files
    from pipeline.shards.sources import open_source

    src = open_source(f"folder:{CIFAR}")
    t = ss.members("test")
    for row in np.random.default_rng(0).choice(len(t), 200, replace=False):
        path = src.describe("test", int(t.sources[row]))
        assert path.split("/")[1] == ss.classes[t.labels[row]]
        assert ss.read_bytes("test", int(t.ids[row])) == (CIFAR / path).read_bytes()
