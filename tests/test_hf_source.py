"""`hf:PATH` (issue 41): Hugging Face data sets as they lie on disk, written here in the formats `datasets` writes
(save_to_disk: Arrow IPC streams, state.json, dataset_info.json, dataset_dict.json; the hub's parquet with the
features in the schema's metadata), round-tripped against a hand decode of every image."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.shards.sources import open_source

from conftest import make_prepared

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

NAMES = ["plane", "car", "bird"]
FEATURES = {"img": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}


def _rows(n, seed, fmt="PNG", grey=False, labels=True):
    rng = np.random.default_rng(seed)
    pixels, cells, labs = [], [], []
    for i in range(n):
        pix = rng.integers(0, 256, (12, 12) if grey else (12, 12, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pix).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        data = buf.getvalue()
        pixels.append(np.asarray(Image.open(io.BytesIO(data))))  # what a decode by hand gives
        cells.append({"bytes": data, "path": None})
        labs.append(int(rng.integers(0, len(NAMES))) if labels else -1)
    return pixels, cells, labs


def _table(cells, labs, features=FEATURES, image="img", label="label"):
    schema = pa.schema([(image, pa.struct([("bytes", pa.binary()), ("path", pa.string())])), (label, pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    return pa.table({image: cells, label: labs}, schema=schema)


def write_saved(folder, splits, parts=2):
    """A DatasetDict.save_to_disk folder: per split, `parts` Arrow stream files."""
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for split, (cells, labs) in splits.items():
        d = folder / split
        d.mkdir()
        table = _table(cells, labs)
        files, step = [], -(-len(cells) // parts)
        for k in range(parts):
            name = f"data-{k:05d}-of-{parts:05d}.arrow"
            with pa.OSFile(str(d / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table.slice(k * step, step))
            files.append({"filename": name})
        (d / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "x", "_split": split}))
        (d / "dataset_info.json").write_text(json.dumps({"features": FEATURES, "description": ""}))


def _check(ss, split, pixels, labs):
    got = [ss.read_image(split, int(i)) for i in ss.ids(split)]
    order = ss.members(split).sources  # the source index of each stored sample
    for img, src in zip(got, order.tolist()):
        want = pixels[src]
        np.testing.assert_array_equal(img.reshape(want.shape), want)
    assert list(ss.labels(split)) == [labs[s] for s in order.tolist()]


def test_save_to_disk_round_trips(tmp_path):
    train, test = _rows(30, 0), _rows(10, 1, fmt="JPEG")
    write_saved(tmp_path / "saved", {"train": train[1:], "test": test[1:]})
    ss = make_prepared(f"hf:{tmp_path / 'saved'}", tmp_path / "out", shard_size=12)
    assert ss.classes == NAMES and ss.splits == ["train", "test"] and ss.mode == "RGB"
    _check(ss, "train", *train[::2])
    _check(ss, "test", *test[::2])


def test_parquet_files_by_split_and_columns_named(tmp_path):
    train, test = _rows(20, 2), _rows(8, 3)
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    feats = {"picture": {"_type": "Image"}, "fine": {"names": NAMES, "_type": "ClassLabel"}}
    half = 10
    for name, (cells, labs) in (("train-00000-of-00002", (train[1][:half], train[2][:half])),
                                ("train-00001-of-00002", (train[1][half:], train[2][half:])),
                                ("validation-00000-of-00001", test[1:])):
        pq.write_table(_table(cells, labs, feats, "picture", "fine"), data / f"{name}.parquet", row_group_size=4)
    ss = make_prepared(f"hf:{tmp_path / 'hub'}", tmp_path / "out")
    assert ss.splits == ["train", "test"] and ss.classes == NAMES
    _check(ss, "train", *train[::2])
    _check(ss, "test", *test[::2])
    # without features: the columns are named by hand, the classes are the numbers
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": train[1], "y": train[2]}), plain)
    with pytest.raises(PipelineError, match="no label column.*#label=COLUMN"):
        open_source(f"hf:{plain}")
    one = make_prepared(f"hf:{plain}#image=x,label=y", tmp_path / "plain")
    assert one.classes == [str(i) for i in range(max(train[2]) + 1)] and set(one.splits) == {"train", "test"}
    assert one.count("train") + one.count("test") == 20  # one file: prepare held out a test split


def test_grey_images_and_a_split_without_labels(tmp_path):
    train, unl = _rows(12, 4, grey=True), _rows(6, 5, grey=True, labels=False)
    write_saved(tmp_path / "saved", {"train": train[1:], "unlabeled": unl[1:]}, parts=1)
    ss = make_prepared(f"hf:{tmp_path / 'saved'}", tmp_path / "out")
    assert ss.mode == "L" and ss.labelled("train") and not ss.labelled("unlabeled")
    _check(ss, "train", *train[::2])
    assert set(ss.labels("unlabeled").tolist()) == {-1}


def test_bad_hf_paths_are_one_line(tmp_path):
    with pytest.raises(PipelineError, match="no such file"):
        open_source(f"hf:{tmp_path / 'nothing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="neither a save_to_disk folder"):
        open_source(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PipelineError, match="bad.parquet: not a parquet file"):
        open_source(f"hf:{tmp_path / 'bad.parquet'}")
    with pytest.raises(PipelineError, match="image=COLUMN"):
        open_source(f"hf:{tmp_path / 'bad.parquet'}#colour=3")
    cells, labs = _rows(4, 6)[1:]
    labs[0] = -1
    pq.write_table(_table(cells, labs), tmp_path / "mixed.parquet")
    with pytest.raises(PipelineError, match="some samples have label -1"):
        open_source(f"hf:{tmp_path / 'mixed.parquet'}")


def test_validation_is_the_test_split_only_where_there_is_none(tmp_path):
    train, val, test = _rows(10, 7), _rows(4, 8), _rows(5, 9)
    write_saved(tmp_path / "three", {"train": train[1:], "validation": val[1:], "test": test[1:]}, parts=1)
    ss = make_prepared(f"hf:{tmp_path / 'three'}", tmp_path / "out3")
    assert sorted(ss.splits) == ["test", "train", "validation"]  # nothing merged
    assert (ss.count("test"), ss.count("validation")) == (5, 4)
    _check(ss, "validation", *val[::2])
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    pq.write_table(_table(*train[1:]), data / "train-00000-of-00001.parquet")
    pq.write_table(_table(*val[1:]), data / "validation-00000-of-00001.parquet")
    two = make_prepared(f"hf:{tmp_path / 'hub'}", tmp_path / "out2")
    assert two.splits == ["train", "test"] and two.count("test") == 4
    bad = tmp_path / "bad"
    write_saved(bad, {"train": train[1:]}, parts=1)
    (bad / "dataset_dict.json").write_text(json.dumps({"splits": ["../train"]}))
    with pytest.raises(PipelineError, match="split names"):
        open_source(f"hf:{bad}")
