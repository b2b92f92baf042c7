"""ImageNet-size images: DCT-scaled resizing in prepare, JPEG quality, random-resized crops while decoding."""

import io
import math

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from conftest import make_prepared
from pipeline.errors import PipelineError
from pipeline.shards.crops import RandomResizedCrop, decode_crop, parse_crop
from pipeline.shards.images import Encoding, resize_square, transcode_file
from pipeline.shards.prepare import PrepareOptions, prepare


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like image (gradients and blobs): resampling errors stay small and measurable."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB")


def full_resolution_reference(data: bytes, box, size: int) -> np.ndarray:
    """The crop as a plain loader takes it: decode every pixel with PIL, crop, resize with antialiasing."""
    top, left, h, w = box
    img = Image.open(io.BytesIO(data)).convert("RGB").crop((left, top, left + w, top + h))
    return np.asarray(img.resize((size, size), Image.BILINEAR)).astype(np.float32)


def test_prepare_resize_of_large_jpeg_matches_full_decode_and_quality_is_honoured():
    data = jpeg(photo(1536, 2048))
    reference = np.asarray(resize_square(Image.open(io.BytesIO(data)).convert("RGB"), 256), np.float32)
    stored, ext, shape = transcode_file(data, "RGB", Encoding(256, 95))
    assert ext == "jpg" and shape == (256, 256)
    fast = simplejpeg.decode_jpeg(stored).astype(np.float32)
    assert np.abs(fast - reference).mean() < 2.0  # 1/4-scale DCT decode + resize vs full decode + resize
    small, _, _ = transcode_file(data, "RGB", Encoding(256, 40))
    assert len(small) < 0.7 * len(stored)


def test_jpeg_quality_is_part_of_the_recipe(tmp_path):
    src = tmp_path / "src" / "train" / "cls"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(jpeg(photo(300, 400)))
    out = tmp_path / "out"
    first = make_prepared(f"folder:{tmp_path / 'src'}", out, image_size=64, jpeg_quality=50)
    assert first.index["recipe"]["jpeg_quality"] == 50
    with pytest.raises(PipelineError, match="other settings|overwrite"):
        prepare(f"folder:{tmp_path / 'src'}", PrepareOptions(out=out, image_size=64, jpeg_quality=80, progress=False))
    with pytest.raises(PipelineError, match="--jpeg-quality"):
        PrepareOptions(out=out, jpeg_quality=0).check()


def _draw(crop, sid, seed=0, epoch=0):
    return lambda h, w: tuple(crop.boxes([h], [w], seed, epoch, [sid])[0].tolist())


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    crop = RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    ids = np.arange(2000)
    top, left, h, w = crop.boxes(np.full(2000, 300), np.full(2000, 400), 0, 0, ids).T
    assert (top >= 0).all() and (top + h <= 300).all() and (left >= 0).all() and (left + w <= 400).all()
    areas, ratios = h * w / (300 * 400), w / h
    assert areas.min() >= 0.07 and areas.max() <= 1.0
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34
    # placement is uniform over the positions a box leaves: the mean offset is half the room
    assert abs(np.mean(top / (300 - h + 1)) - 0.5) < 0.03 and abs(np.mean(left / (400 - w + 1)) - 0.5) < 0.03
    # torchvision's draw: area uniform in scale; with square boxes of a square image every draw fits
    square = RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(1.0, 1.0))
    sq = np.prod(square.boxes(np.full(4000, 400), np.full(4000, 400), 1, 0, np.arange(4000))[:, 2:], axis=1) / 400**2
    assert abs(sq.mean() - 0.54) < 0.02 and abs(np.mean(sq < 0.31) - 0.25) < 0.03
    # a box that can never fit: the centre crop with the ratio clamped
    tall = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert tall.boxes([100], [50], 0, 0, [3]).tolist() == [[25, 0, 50, 50]]
    # a pure function of (seed, epoch, id): not of the other samples drawn with it, nor of their order
    both = crop.boxes([300, 300], [400, 400], 5, 2, [7, 8])
    assert crop.boxes([300], [400], 5, 2, [8]).tolist() == both[1:].tolist()
    assert crop.boxes([300, 300], [400, 400], 5, 2, [8, 7]).tolist() == both[::-1].tolist()
    others = [crop.boxes([300], [400], *key, [7]).tolist() for key in ((5, 3), (6, 2))]
    assert all(o != both[:1].tolist() for o in others)


def test_crop_uniforms_are_uniform_and_independent():
    from scipy import stats

    from pipeline.shards.crops import uniforms

    u = uniforms(3, 1, np.arange(20000), 22)
    assert u.shape == (20000, 22) and u.min() >= 0 and u.max() < 1
    for j in (0, 10, 21):
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03  # columns of one sample
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03  # neighbouring ids


def test_decode_crop_uses_dct_scaling_and_matches_a_full_resolution_crop():
    data = jpeg(photo(1200, 1600, seed=1))
    crop = RandomResizedCrop(96)
    scales = []
    for sid in range(12):
        out, info = decode_crop(data, "RGB", crop, _draw(crop, sid))
        assert out.shape == (96, 96, 3)
        top, left, h, w = info["box"]
        assert min(h, w) * info["scale"] >= 96 - 1  # the reduced decode still covers the output
        ref = full_resolution_reference(data, info["box"], 96)
        assert np.abs(out.astype(np.float32) - ref).mean() < 3.0
        scales.append(info["scale"])
    assert min(scales) <= 0.25  # most boxes of a 1600 px photo need no more than a quarter of its pixels
    again, _ = decode_crop(data, "RGB", crop, _draw(crop, 5))
    assert np.array_equal(again, decode_crop(data, "RGB", crop, _draw(crop, 5))[0])


def test_loader_crops_are_a_function_of_seed_epoch_and_id(tmp_path):
    src = tmp_path / "src" / "train"
    for c in range(3):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(8):
            (src / f"c{c}" / f"{i}.jpg").write_bytes(jpeg(photo(120 + 10 * i, 160, seed=10 * c + i)))
    ss = make_prepared(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=64, shard_size=7)

    def by_id(**kw):
        out = {}
        for b in ss.loader("train", batch_size=5, crop="random-resized:32", seed=4, **kw):
            assert b.images.shape[1:] == (3, 32, 32)
            out.update({int(i): img.clone() for i, img in zip(b.ids, b.images)})
        return out

    stream, indexed = by_id(backend="stream"), by_id(backend="indexed", num_workers=2)
    assert len(stream) == 24 and stream.keys() == indexed.keys()
    assert all(np.array_equal(stream[k], indexed[k]) for k in stream)  # order and workers do not matter
    loader = ss.loader("train", batch_size=24, crop="random-resized:32", seed=4, shuffle=False)
    first, second = next(iter(loader)), next(iter(loader))  # the next iteration is the next epoch
    assert not np.array_equal(first.images, second.images)


@pytest.mark.parametrize("text, msg", [("random-resized", "SIZE"), ("centre:32", "expected"),
                                       ("random-resized:32,scale=0.5-0.1", "scale"), ("random-resized:0", "size")])
def test_bad_crop_settings(text, msg):
    with pytest.raises(PipelineError, match=msg):
        parse_crop(text)


def test_crop_settings_parse():
    c = parse_crop("random-resized:224,scale=0.35-1,ratio=0.5-2")
    assert (c.size, c.scale, c.ratio) == (224, (0.35, 1.0), (0.5, 2.0))
    assert parse_crop("none") is None and math.isclose(parse_crop("random-resized:8").ratio[1], 4 / 3)


def test_ffcv_backend_crops_while_decoding_too(tmp_path):
    from pipeline.shards import ffcv_io

    if not ffcv_io.available():
        pytest.skip("ffcv not installed (the ffcv extra)")
    src = tmp_path / "src" / "train" / "c0"
    src.mkdir(parents=True)
    for i in range(10):
        (src / f"{i}.jpg").write_bytes(jpeg(photo(90, 120, seed=i)))
    ss = make_prepared(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=80, formats=("wds", "ffcv"))
    batches = list(ss.loader("train", backend="ffcv", batch_size=4, crop="random-resized:48", seed=1))
    assert sum(len(b.ids) for b in batches) == 10
    assert all(b.images.shape[1:] == (3, 48, 48) for b in batches)


def test_training_on_unresized_photos_with_a_decode_crop(tmp_path):
    """Shards of varied-size JPEGs (no --image-size) train when the loader crops while decoding."""
    from pipeline.trainers import create_trainer
    from test_train import tiny_cfg

    src = tmp_path / "src" / "train"
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(16):
            (src / f"c{c}" / f"{i}.jpg").write_bytes(jpeg(photo(60 + 3 * i, 80 - 2 * i, seed=20 * c + i)))
    ss = make_prepared(f"folder:{tmp_path / 'src'}", tmp_path / "out")
    assert ss.image_size is None
    with pytest.raises(PipelineError, match="data.crop"):
        create_trainer(tiny_cfg(ss.root, tmp_path / "r0", **{"method.name": "pgd-at"}), progress=False)
    run = tmp_path / "r1"
    t = create_trainer(tiny_cfg(ss.root, run, **{"method.name": "pgd-at", "optim.epochs": 1, "data.batch_size": 8,
                                                "data.crop": "random-resized:24,scale=0.25-1"}), progress=False)
    assert t.image_size == 24
    t.fit()
    assert (run / "checkpoints" / "last.pt").is_file()
    with pytest.raises(PipelineError, match="data.crop"):
        tiny_cfg(ss.root, run, **{"data.crop": "centre:24"}).validate()


@pytest.mark.parametrize("name", ["imagenet-acl.toml", "imagenet32-acl.toml", "demo-digits.toml"])
def test_shipped_training_configs_are_valid(name):
    from pathlib import Path

    from pipeline.selectors import create_selector
    from pipeline.trainers import load_config
    from pipeline.kv import parse_kv as parse_params

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name).validate()
    if cfg.select.selector:
        sel = create_selector(cfg.select.selector, **parse_params(cfg.select.params, "select.params"))
        assert sel.params["attack_steps"] == cfg.attack.steps  # selection mimics the training attack


def test_resnet50_at_224_takes_the_imagenet_stem():
    import torch

    from pipeline.models import create_model, model_spec

    model = create_model(model_spec("resnet50", 3, 224)).eval()
    assert model.spec["stem"] == "imagenet" and model.encoder.feature_dim == 2048
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224), model.branch("natural"))
    assert out["features"].shape == (1, 2048)


def test_device_decoding_path_matches_the_cpu_path(tmp_path):
    """Workers send bytes and boxes, the main process decodes (libjpeg-turbo standing in for nvJPEG here),
    crops and resizes: the same samples, the same boxes, the same pixels up to resampling."""
    import torch

    src = tmp_path / "src" / "train" / "c0"
    src.mkdir(parents=True)
    for i in range(12):
        (src / f"{i}.jpg").write_bytes(jpeg(photo(200 + 9 * i, 260, seed=i)))
    ss = make_prepared(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=96)
    calls = []

    def standin(blobs):
        calls.append(len(blobs))
        return [torch.from_numpy(simplejpeg.decode_jpeg(b.numpy().tobytes())).permute(2, 0, 1) for b in blobs]

    for crop in ("random-resized:48", None):
        kw = dict(batch_size=5, seed=2, crop=crop, backend="indexed", num_workers=1)
        cpu = list(ss.loader("train", decode="cpu", **kw))
        dev = list(ss.loader("train", decode=standin, **kw))
        assert [b.ids.tolist() for b in cpu] == [b.ids.tolist() for b in dev]
        for a, b in zip(cpu, dev):
            assert a.images.shape == b.images.shape and b.images.dtype == torch.uint8
            diff = (a.images.float() - b.images.float()).abs().mean()
            assert (diff < 3.0) if crop else (diff == 0), (crop, float(diff))
    assert sum(calls) == 24  # every image went through the device decoder, once per epoch
    assert ss.loader("train", decode="auto", batch_size=4).decoder is None  # no CUDA here: the CPU path
    with pytest.raises(PipelineError, match="decode=device"):
        ss.loader("train", decode="device", batch_size=4)
