"""Recipes: schema, composition with `defaults`, dotted overrides and errors that name the key/file."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsss.config import CONFIG_DIR, load_recipe, parse_override, section_hash, to_yaml
from wsss.errors import ConfigError


def test_defaults_and_override_types():
    cfg = load_recipe(None, ["seg.lr=0.02", "cam_infer.scales=[1.0, 0.5]", "cam_infer.flip=false", "run.name=x"])
    assert cfg.seg.lr == pytest.approx(0.02)
    assert list(cfg.cam_infer.scales) == [1.0, 0.5]
    assert cfg.cam_infer.flip is False
    assert cfg.run.name == "x"
    with pytest.raises(Exception):  # the resolved config is read-only
        cfg.seg.lr = 1.0


@pytest.mark.parametrize("override, needle", [
    ("seg.learning_rate=0.1", "unknown key 'seg.learning_rate'"),
    ("segg.lr=0.1", "unknown key 'segg.lr'"),
    ("seg.lr=fast", "wrong type for 'seg.lr'"),
    ("seg.epochs=1.5", "seg.epochs"),
    ("pseudo.method=magic", "pseudo.method: unknown pseudo-mask generator 'magic'; registered: "),
    ("cam.backbone.output_stride=4", "cam.backbone.output_stride"),
    ("run.stages=[train_cam, nope]", "unknown stage 'nope'"),
    ("pseudo.ignore_band=[0.5, 0.2]", "pseudo.ignore_band"),
    ("seg.encoder.weights=/no/such/file.pth", "seg.encoder.weights"),
    ("data.dataset=voc12", "data.root: required"),
    ("pseudo.crf_params.preset=nope", "pseudo.crf_params.preset"),
    ("seg.lr", "expected key=value"),
    ("seg.crop_size=-8", "seg.crop_size: crop side in pixels, >= 1, got -8"),
    ("trainer.num_workers=-1", "trainer.num_workers: data-loader workers, >= 0, got -1"),
    ("cam.lr=-0.1", "cam.lr: a learning rate >= 0, got -0.1"),
    ("pseudo.bg_threshold=2", "pseudo.bg_threshold: a CAM score in [0, 1], got 2.0"),
    ("seg.momentum=1.5", "seg.momentum: SGD momentum in [0, 1), got 1.5"),
    ("seg.weight_decay=-1", "seg.weight_decay: weight decay, >= 0, got -1.0"),
    ("trainer.precision=banana", "trainer.precision: 'banana' is not one of 32-true"),
    # the selected components' own option checks run at load time, not mid-run
    (("seg.method=auxsegnet", "seg.auxsegnet.rounds=0"), "seg.auxsegnet.rounds: must be >= 1"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_recipe(None, list(override) if isinstance(override, tuple) else [override])
    assert needle in str(err.value)


def test_suggests_close_keys():
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["seg.epoch=3"])
    assert "seg.epochs" in str(err.value)


@pytest.mark.parametrize("override, first", [
    ("seg.learning_rate=0.1", "seg.lr"),  # a synonym from other code bases, in the same section
    ("cam.bs=4", "cam.batch_size"),
    ("cam.weights=x.pth", "cam.backbone.weights"),  # the same name in a subsection
    ("trainer.num_worker=0", "trainer.num_workers"),
])
def test_suggestions_put_the_likely_key_first(override, first):
    with pytest.raises(ConfigError, match=rf"\(did you mean: {first}[,?]"):
        load_recipe(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("seg.scale_range=0.5", "wrong type for 'seg.scale_range': expected a list such as [0.5, 2.0], got 0.5"),
    ("run.stages=cam", "wrong type for 'run.stages': expected a list such as ['train_cam', "),
    ("seg.hflip=maybe", "wrong type for 'seg.hflip': expected true or false, got 'maybe'"),
    ("cam.epochs=[1, 2]", "wrong type for 'cam.epochs': expected an integer such as 5, got [1, 2]"),
    ("data.shapes=3", "wrong type for 'data.shapes': expected a section; set its keys instead (data.shapes.<key>=value)"),
])
def test_type_errors_say_what_is_expected_in_plain_words(override, expected):
    """Not OmegaConf's node classes ("AnyNode is not a ListConfig")."""
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [override])
    assert expected in str(err.value) and "AnyNode" not in str(err.value)


def test_missing_files_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="nothere.yaml: recipe file not found"):
        load_recipe(tmp_path / "nothere.yaml")
    with pytest.raises(ConfigError, match="data.root: .*does not exist"):
        load_recipe(None, ["data.dataset=voc12", f"data.root={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="data.cls_labels: file .* not found"):
        load_recipe(None, [f"data.cls_labels={tmp_path / 'cls.npy'}"])


def test_recipe_file_errors(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seg:\n  lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML at line 3, column 1: expected ',' or ']'") as err:
        load_recipe(bad)
    assert "\n" not in str(err.value)  # PyYAML's own message draws the spot over several lines
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("seg:\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'seg.colour'"):
        load_recipe(unknown)
    loop = tmp_path / "loop.yaml"
    loop.write_text("defaults: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_recipe(loop)


def test_defaults_compose_and_later_wins(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("seg:\n  lr: 0.5\n  epochs: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("defaults: [base.yaml]\nseg:\n  epochs: 7\n")
    cfg = load_recipe(child, ["seg.batch_size=2"])
    assert (cfg.seg.lr, cfg.seg.epochs, cfg.seg.batch_size) == (0.5, 7, 2)
    assert cfg.run.name == "child"  # the recipe stem names the run


def test_every_shipped_recipe_loads():
    """Every configs/*.yaml is valid (recipes that need a data root get a stand-in)."""
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        # a stand-in root that exists (recipes inherit their data set, so every recipe gets one; the
        # files are not read here, and ../shared may be absent)
        cfg = load_recipe(path, [f"data.root={CONFIG_DIR}"])
        assert cfg.run.name == path.stem
        assert "seg:" in to_yaml(cfg)


def test_section_hash_tracks_only_its_sections():
    a = load_recipe(None, ["seg.lr=0.1"])
    b = load_recipe(None, ["seg.lr=0.2"])
    assert section_hash(a, ["cam", "data"]) == section_hash(b, ["cam", "data"])
    assert section_hash(a, ["seg"]) != section_hash(b, ["seg"])


def test_parse_override_yaml_typing():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
