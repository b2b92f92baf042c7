"""A researcher's day with the tool (issue 40): names users guess, settings written as in the config file,
help at once."""

import tomllib

import pytest

import pipeline.trainers  # noqa: F401  (the methods' sections)
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError


@pytest.mark.parametrize("item,key,expected", [
    ('run.loggers=["jsonl","tensorboard"]', "run.loggers", ["jsonl", "tensorboard"]),
    ("run.loggers=jsonl,tensorboard", "run.loggers", ["jsonl", "tensorboard"]),  # today's form still works
    ("optim.milestones=[40, 60]", "optim.milestones", [40, 60]),
    ("optim.milestones=40,60", "optim.milestones", [40, 60]),
    ('model.arch="wrn-16-2"', "model.arch", "wrn-16-2"),
    ("model.arch=wrn-16-2", "model.arch", "wrn-16-2"),
    ("select.selector=kcenter", "select.selector", "kcenter"),
])
def test_set_takes_what_the_config_file_takes(item, key, expected):
    by_flag = TrainConfig()
    by_flag.apply_overrides([item])
    by_flag.validate()
    section, _, name = key.partition(".")
    assert getattr(by_flag.section(section), name) == expected
    k, _, v = item.partition("=")
    if v.startswith(("[", '"')):  # the same text in a config file gives the same setting
        by_file = TrainConfig.from_dict(tomllib.loads(f"[{section}]\n{name} = {v}"))
        assert getattr(by_file.section(section), name) == expected


def test_a_wrong_set_value_is_still_one_line():
    cfg = TrainConfig()
    with pytest.raises(PipelineError, match=r"optim.milestones = \['a'\] is not a valid list"):
        cfg.apply_overrides(['optim.milestones=["a"]'])


def test_kcenter_is_the_k_center_greedy_selector_and_is_recorded_as_kcg(digits_set, tmp_path):
    import pipeline.api as pl
    from pipeline.selectors import SELECTORS

    assert SELECTORS.lookup("kcenter") is SELECTORS.lookup("kcg")
    assert "kcenter" not in SELECTORS.names()  # listed once, under its own name
    manifest = pl.select(digits_set, "kcenter", 0.05, tmp_path / "m.json", arch="smallcnn")
    assert manifest.producer["name"] == "kcg"
