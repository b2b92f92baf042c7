"""Transfer evaluation (issue 41): an encoder pre-trained on one shard set, finetuned and measured on another with
other classes and another image size; what size it sees, what is recorded, and the experiment's eval_data."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import DataError, PipelineError
from pipeline.evaluation import evaluate
from pipeline.evaluation.records import read_results
from pipeline.experiment.spec import load_experiment
from pipeline.experiment.transfer import parse_eval_data
from pipeline.shards.shardset import ShardSet
from pipeline.trainers import create_trainer

from clirun import pipeline as pipeline_cli
from conftest import make_prepared, write_image_folder
from test_train import tiny_cfg

FAST = dict(epochs=1, lr=0.1, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A: synthetic shapes at 16 px, 10 classes. B: three other classes at 24 px. Grey: the bundled digits."""
    root = tmp_path_factory.mktemp("transfer")
    a = make_prepared("synthetic:300", root / "a", image_size=16)
    write_image_folder(root / "bsrc" / "train", n_per_class=16, size=24, classes=("x", "y", "z"))
    write_image_folder(root / "bsrc" / "test", n_per_class=6, size=24, classes=("x", "y", "z"), seed=1)
    b = make_prepared(f"folder:{root / 'bsrc'}", root / "b")
    return root, a, b


@pytest.fixture(scope="module")
def pretrained(sets):
    root, a, _ = sets
    create_trainer(tiny_cfg(a.root, root / "run", **{"optim.epochs": 1, "optim.warmup_epochs": 0}),
                   progress=False).fit()
    return root / "run" / "checkpoints" / "last.pt"


def _spy_sizes(monkeypatch) -> list:
    """The (height, width) of every batch evaluation reads, finetuning and measures alike."""
    seen = []
    original = ShardSet.loader

    def loader(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            seen.append(tuple(batch.images.shape[-2:]))
            yield batch
    monkeypatch.setattr(ShardSet, "loader", loader)
    return seen


def test_transfer_to_other_classes_and_size_is_resized_to_the_pretraining_size(sets, pretrained, monkeypatch,
                                                                             tmp_path):
    root, a, b = sets
    # its own copy of the checkpoint: the other tests measure the shared one in an order pytest-xdist chooses, and this
    # test counts the definitions in results.json
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    pretrained = shutil.copy(pretrained, tmp_path / "run" / "checkpoints" / pretrained.name)
    seen = _spy_sizes(monkeypatch)
    r = evaluate(b.root, pretrained, "slf", "pgd20", **FAST)
    assert set(seen) == {(16, 16)}  # B's 24 px images reach the encoder at A's 16 px
    assert r["input"] == {"resize": "auto", "pretrained_size": 16, "data_size": 24, "size": 16}
    assert r["pretrained_on"]["name"] == a.name and r["pretrained_on"]["fingerprint"] == a.fingerprint
    assert r["dataset_fingerprint"] == b.fingerprint and r["chance"] == pytest.approx(1 / 3)
    clf = torch.load(r["classifier_path"], weights_only=True)
    assert clf["fc"]["weight"].shape[0] == 3 and clf["input_size"] == 16  # B's classes
    assert clf["pretrained_on"]["fingerprint"] == a.fingerprint

    # The same measure at B's own size is another definition: kept beside, in its own classifier file.
    seen.clear()
    r2 = evaluate(b.root, pretrained, "slf", "pgd20", resize="none", **FAST)
    assert set(seen) == {(24, 24)} and r2["input"]["size"] == 24
    assert r2["classifier_path"] != r["classifier_path"]
    seen.clear()
    evaluate(b.root, pretrained, "slf", "clean", resize=20, **FAST)
    assert set(seen) == {(20, 20)}
    entry = next(iter(read_results(pretrained.parent.parent / "results.json").values()))
    defs = [v["definition"] for k, v in entry.items() if isinstance(v, dict) and "definition" in v]
    assert sorted(d.get("input_size", 0) for d in defs) == [0, 0, 16, 16, 20]  # clean + pgd20 at 16 and as stored

    # On its own data the encoder sees its own size, and the classifier file is not the transfer one.
    own = evaluate(a.root, pretrained, "slf", "clean", **FAST)
    assert own["input"]["size"] == 16 and "-on-" not in own["classifier_path"]
    assert "-on-" in r["classifier_path"]


def test_auto_keeps_the_pretraining_data_as_stored(sets, tmp_path, monkeypatch):
    """A model trained on 12-px crops of A's 16-px images: on A itself it sees A's images whole, as before
    transfer existed; on B it sees them at 12 px."""
    _, a, b = sets
    run = tmp_path / "crop"
    create_trainer(tiny_cfg(a.root, run, **{"optim.epochs": 1, "optim.warmup_epochs": 0,
                                            "data.crop": "random-resized:12"}), progress=False).fit()
    ckpt = run / "checkpoints" / "last.pt"
    seen = _spy_sizes(monkeypatch)
    own = evaluate(a.root, ckpt, "slf", "clean", **FAST)
    assert set(seen) == {(16, 16)}
    assert own["input"] == {"resize": "auto", "pretrained_size": 12, "data_size": 16, "size": 16}
    seen.clear()
    evaluate(b.root, ckpt, "slf", "clean", **FAST)
    assert set(seen) == {(12, 12)}


def test_resized_pixels_are_the_decoders_resize(sets, pretrained, monkeypatch):
    """What the encoder sees of a transferred image: the stored pixels resized by hand with PIL (bilinear, the
    shorter side to 16, then the centre 16 x 16: these are square, so no crop)."""
    _, _, b = sets
    got = {}
    original = ShardSet.loader

    def loader(self, split, *args, **kwargs):
        for batch in original(self, split, *args, **kwargs):
            if split == "test":
                got.update({int(i): img.permute(1, 2, 0).numpy() for i, img in zip(batch.ids, batch.images)})
            yield batch
    monkeypatch.setattr(ShardSet, "loader", loader)
    evaluate(b.root, pretrained, "slf", "clean", **FAST)
    assert set(got) == set(int(i) for i in b.ids("test"))
    for sample in list(got)[:4]:
        stored = b.read_image("test", sample)
        assert stored.shape == (24, 24, 3)
        by_hand = np.asarray(Image.fromarray(stored).resize((16, 16), Image.BILINEAR, reducing_gap=None))
        np.testing.assert_array_equal(got[sample], by_hand)


def test_a_channel_mismatch_is_one_line_before_any_work(digits_set, pretrained, capfd):
    with pytest.raises(DataError, match="takes 3-channel images.*1-channel"):
        evaluate(digits_set.root, pretrained, "slf", "clean", **FAST)
    r = pipeline_cli("eval", "--data", str(digits_set.root), "--checkpoint", str(pretrained), "--epochs", "1")
    assert r.returncode != 0 and "3-channel" in r.stderr and "Traceback" not in r.stderr


def test_eval_cli_says_what_it_transferred(sets, pretrained):
    _, a, b = sets
    r = pipeline_cli("eval", "--data", str(b.root), "--checkpoint", str(pretrained), "--epochs", "1",
                     "--batch-size", "32", "--attack", "clean", "--resize", "12")
    assert r.returncode == 0, r.stderr
    assert f"pre-trained on {a.name}, evaluated on {b.name} (resized 24 -> 12 px)" in " ".join((r.stdout + r.stderr).split())
    bad = pipeline_cli("eval", "--data", str(b.root), "--checkpoint", str(pretrained), "--resize", "large")
    assert bad.returncode != 0 and "eval.resize" in bad.stderr and "auto, none" in bad.stderr


def test_images_of_varying_size_need_a_size(tmp_path, pretrained):
    for n, size in enumerate((20, 28)):
        write_image_folder(tmp_path / "src" / "train", n_per_class=4, size=size, classes=(f"c{n}",), seed=n)
        write_image_folder(tmp_path / "src" / "test", n_per_class=2, size=size, classes=(f"c{n}",), seed=n + 5)
    varied = make_prepared(f"folder:{tmp_path / 'src'}", tmp_path / "varied")
    assert varied.image_size is None
    with pytest.raises(PipelineError, match="vary in size.*--resize N"):
        evaluate(varied.root, pretrained, "slf", "clean", resize="none", **FAST)
    r = evaluate(varied.root, pretrained, "slf", "clean", **FAST)  # auto: the pre-training size
    assert r["input"] == {"resize": "auto", "pretrained_size": 16, "data_size": None, "size": 16}


def test_experiment_evaluates_every_arm_on_its_eval_data(sets, tmp_path):
    root, a, b = sets
    spec = tmp_path / "exp.toml"
    spec.write_text(f"""
[experiment]
out = "{tmp_path / 'out'}"
seeds = [0, 1]
eval_data = ["{b.root}", {{name = "shapes24", source = "synthetic:120", image_size = 24}}]
[data]
path = "{a.root}"
batch_size = 64
workers = 0
[model]
arch = "smallcnn"
head_width = 32
proj_dim = 16
[optim]
epochs = 1
warmup_epochs = 0
[attack]
steps = 2
[eval]
epochs = 1
batch_size = 32
attack = "clean"
[[arm]]
name = "full"
[[arm]]
name = "own-only"
eval_data = []
seeds = [0]
""")
    r = pipeline_cli("experiment", str(spec))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    state = json.loads((out / "experiment.json").read_text())
    rows = {(rid, name): t["row"] for rid, run in state["runs"].items() for name, t in run.get("transfer", {}).items()}
    assert set(rows) == {(f"full-s{s}", n) for s in (0, 1) for n in (b.root.name, "shapes24")}  # folder names
    row = rows[("full-s0", "shapes24")]
    assert row["pretrained_on"] == a.name and row["input"]["size"] == 16 and row["input"]["data_size"] == 24
    assert row["dataset_fingerprint"] == ShardSet.open(out / "eval-data" / "shapes24").fingerprint
    md = (out / "results.md").read_text()
    assert f"| full | {a.name} | shapes24 | 24 -> 16 | 2 |" in md and "own-only" in md
    assert "| own-only | " + a.name not in md
    results = json.loads((out / "results.json").read_text())
    assert {g["eval_data"] for g in results["transfer_arms"]} == {b.root.name, "shapes24"}
    report = (out / "report" / "report.md").read_text()
    assert f"pre-trained on {a.name}" in report  # the run's own report says which rows are transfer

    again = pipeline_cli("experiment", str(spec))  # nothing to do: nothing measured again
    assert again.returncode == 0 and "evaluating" not in again.stdout + again.stderr
    spec.write_text(spec.read_text().replace('attack = "clean"', 'attack = "clean"\nresize = "12"'))
    third = pipeline_cli("experiment", str(spec))  # new [eval] settings: every evaluation again, no training
    assert third.returncode == 0, third.stderr
    said = third.stdout + third.stderr
    assert ": training (" not in said and said.count("evaluating on") == 4


@pytest.mark.parametrize("value, message", [
    ("shards/x", "must be a list"),
    ([{"name": "x"}], "either path"),
    ([{"path": "a", "source": "digits"}], "either path"),
    ([{"source": "digits", "colour": 1}], "unknown setting"),
    (["a/x", "b/x"], "two eval_data entries are named 'x'"),
    ([{"source": "digits", "name": "no spaces"}], "needs a name"),
    ([3], "must be a shard-set path or a table"),
])
def test_bad_eval_data_is_one_line(value, message):
    with pytest.raises(PipelineError, match=message):
        parse_eval_data(value, "exp.toml: [experiment]")


def test_eval_data_names_mean_one_thing(tmp_path):
    spec = tmp_path / "e.toml"
    spec.write_text('[experiment]\neval_data = [{name = "d", source = "digits"}]\n[data]\npath = "x"\n'
                    '[[arm]]\nname = "a"\n[[arm]]\nname = "b"\neval_data = [{name = "d", source = "synthetic"}]\n')
    with pytest.raises(PipelineError, match="another meaning"):
        load_experiment(spec)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiments_load_at_every_profile(path):
    from pipeline.experiment.spec import arm_config

    raw = __import__("tomllib").loads(path.read_text())
    for profile in [None, *raw.get("profile", {})]:
        exp = load_experiment(path, sets=[f"experiment.profile={profile}"] if profile else [])
        for arm in exp.arms:
            arm_config(exp, arm, arm.seeds[0], "shards/x")
        if profile == "cpu":  # the small size runs on this machine's kind
            cfg = arm_config(exp, exp.arms[0], 0, "shards/x")
            assert cfg.run.device == "cpu" and not cfg.run.bf16
            assert exp.out != load_experiment(path).out  # its runs never mix with the paper-size ones


def test_transfer_config_runs_small_from_the_releases(tmp_path):
    """configs/experiments/cifar10-transfer.toml at its CPU size, made tinier by --set, on the three releases'
    formats written here (CIFAR-10 and CIFAR-100 pickles, STL-10 binary in its tar.gz)."""
    import tarfile

    from conftest import write_cifar_pickles
    from test_sources import _write_stl10

    write_cifar_pickles(tmp_path / "cifar-10-batches-py", n_train=100, n_test=20)
    write_cifar_pickles(tmp_path / "cifar-100-python", n_train=60, n_test=20, hundred=True)
    _write_stl10(tmp_path / "stl10_binary", counts=(("train", 12), ("test", 10), ("unlabeled", 2)))
    with tarfile.open(tmp_path / "stl10_binary.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "stl10_binary", arcname="stl10_binary")
    out = tmp_path / "exp"
    sets = ["experiment.profile=cpu", f'experiment.out="{out}"', "experiment.seeds=[0]",
            f'prepare.source="cifar10:{tmp_path / "cifar-10-batches-py"}"', f'prepare.out="{tmp_path / "c10"}"',
            "prepare.per_class={train=8}",
            f'experiment.eval_data=[{{name="cifar100", source="cifar100:{tmp_path / "cifar-100-python"}", '
            f'image_size=16}}, {{name="stl10", source="stl10:{tmp_path / "stl10_binary.tar.gz"}", image_size=16}}]',
            "optim.epochs=3", "optim.warmup_epochs=0", "data.batch_size=40", "attack.steps=1", "eval.epochs=1",
            'eval.attack="pgd20"', "eval.limits={}"]
    r = pipeline_cli("experiment", str(REPO / "configs" / "experiments" / "cifar10-transfer.toml"), "--only", "full",
                     *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "experiment.json").read_text())
    transfer = state["runs"]["full-s0"]["transfer"]
    assert set(transfer) == {"cifar100", "stl10"}
    assert transfer["stl10"]["row"]["input"] == {"resize": "auto", "pretrained_size": 16, "data_size": 16, "size": 16}
    assert ShardSet.open(out / "eval-data" / "cifar100").classes[:2] == ["c0", "c1"]
    md = (out / "results.md").read_text()
    assert "| full | " in md and "| cifar100 |" in md and "| stl10 |" in md
    from pipeline.config import load_config

    cfg = load_config(out / "runs" / "full-s0" / "config.toml")
    assert (cfg.model.arch, cfg.optim.epochs, cfg.optim.lr) == ("smallcnn", 3, 0.5)  # the profile, then --set


@pytest.mark.parametrize("sets, message", [
    (["experiment.profile=gpu"], "profile = 'gpu'.*no \\[profile.NAME\\]"),
    (["optim"], "SECTION.KEY=VALUE"),
    (["arm.name=x"], "set in"),
    (["experiment.colour=1"], "unknown setting"),
])
def test_experiment_set_and_profile_errors_are_one_line(tmp_path, sets, message):
    spec = tmp_path / "e.toml"
    spec.write_text('[data]\npath = "x"\n[[arm]]\nname = "a"\n')
    with pytest.raises(PipelineError, match=message):
        load_experiment(spec, sets=sets)


def test_set_wins_over_profile_and_arm(tmp_path):
    from pipeline.experiment.spec import arm_config

    spec = tmp_path / "e.toml"
    spec.write_text('[data]\npath = "x"\n[optim]\nepochs = 100\n[profile.small.optim]\nepochs = 5\nlr = 0.3\n'
                    '[[arm]]\nname = "a"\noptim = { epochs = 50 }\n[[arm]]\nname = "b"\n')
    plain = load_experiment(spec)
    assert [arm_config(plain, a, 0, "x").optim.epochs for a in plain.arms] == [50, 100]
    small = load_experiment(spec, sets=["experiment.profile=small"])
    assert [(arm_config(small, a, 0, "x").optim.epochs, arm_config(small, a, 0, "x").optim.lr)
            for a in small.arms] == [(50, 0.3), (5, 0.3)]  # the profile replaces the file's; an arm's own stays
    forced = load_experiment(spec, sets=["experiment.profile=small", "optim.epochs=2"])
    assert [arm_config(forced, a, 0, "x").optim.epochs for a in forced.arms] == [2, 2]  # --set over everything
