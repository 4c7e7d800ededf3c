"""Methods plug in: a CAM method and a segmentation method from a file outside the package run the whole
pipeline by name, under one and two processes; registries list their names; the package has no import
cycle and no stage imports another stage."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_shapes
from wsss.config import load_recipe
from wsss.errors import ConfigError
from wsss.registry import CAM_METHODS, PIXEL_LOSSES, PSEUDO_METHODS, REGULARIZERS, SEG_METHODS, STAGES

PLUGIN = REPO / "tests" / "plugins" / "tiny_method.py"
PLUGIN_RUN = [f"run.plugins=[{PLUGIN}]", "cam.method=tiny_cam", "seg.method=tiny_seg", "cam.tiny_cam.width=6",
              "run.stages=[train_cam, cam, pseudo, train_seg, evaluate]"]


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def _wsss(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([*launcher, "-m", "wsss", *args], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_plugin_methods_run_the_whole_pipeline(tmp_path: Path, nproc: int) -> None:
    _wsss(["run", "configs/shapes_cam.yaml", f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
           "run.name=plug", *tiny_shapes(num_train=16, num_val=4, size=48, steps=2, batch=4), *PLUGIN_RUN], nproc)
    run = tmp_path / "runs" / "plug"
    stages = _manifest(run)
    assert all(stages[s]["status"] == "done" for s in ("train_cam", "cam", "pseudo", "train_seg", "evaluate"))
    assert 0.0 <= stages["evaluate"]["metrics"]["miou"] <= 1.0
    assert len(list((run / "cams").glob("*.npz"))) == 16 and len(list((run / "pred").glob("*.png"))) == 4
    cam_meta = json.loads((run / "cam" / "model.json").read_text())
    assert cam_meta["config"]["method"] == "tiny_cam" and cam_meta["config"]["tiny_cam"] == {"width": 6}
    assert "stem.0.weight" in (run / "seg" / "model.safetensors").read_bytes().decode("latin-1")  # the plug-in's net


def test_plugin_options_are_typed_recipe_keys(tmp_path: Path) -> None:
    cfg = load_recipe("configs/shapes_cam.yaml", PLUGIN_RUN)
    assert cfg.cam.method == "tiny_cam" and cfg.cam.tiny_cam.width == 6
    with pytest.raises(ConfigError, match="cam.tiny_cam.width"):
        load_recipe("configs/shapes_cam.yaml", [*PLUGIN_RUN, "cam.tiny_cam.width=wide"])
    with pytest.raises(ConfigError, match="run.plugins: .*nope.py: plug-in file not found"):
        load_recipe("configs/shapes_cam.yaml", ["run.plugins=[nope.py]"])
    with pytest.raises(ConfigError, match="run.plugins: cannot import 'no_such_module_xyz'"):
        load_recipe("configs/shapes_cam.yaml", ["run.plugins=[no_such_module_xyz]"])


def test_unknown_names_list_the_registered_ones() -> None:
    for key, registry in (("cam.method", CAM_METHODS), ("seg.method", SEG_METHODS), ("pseudo.method", PSEUDO_METHODS),
                          ("seg.loss.name", PIXEL_LOSSES), ("seg.loss.regularizer", REGULARIZERS)):
        with pytest.raises(ConfigError) as err:
            load_recipe("configs/shapes_cam.yaml", [f"{key}=nope"])
        assert str(err.value).startswith(f"{key}: unknown") and ", ".join(registry.names()) in str(err.value)


def test_stage_hashes_ignore_options_of_methods_not_used() -> None:
    from wsss.engine.rundir import RunDir

    base = RunDir(load_recipe("configs/shapes_cam.yaml", []))
    other = RunDir(load_recipe("configs/shapes_cam.yaml", ["cam.seam.view_scale=0.5", "seg.loss.dfr.size=8"]))
    used = RunDir(load_recipe("configs/shapes_cam.yaml", ["cam.method=seam", "cam.seam.view_scale=0.5"]))
    assert base.stage_hash("train_cam") == other.stage_hash("train_cam")  # mlsm does not read cam.seam
    assert base.stage_hash("train_seg") == other.stage_hash("train_seg")  # no regulariser: seg.loss.dfr unused
    assert base.stage_hash("train_cam") != used.stage_hash("train_cam")


def _imports(path: Path) -> set[str]:
    """The wsss modules a file imports at module level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsss"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("wsss")}
    return found


def test_no_import_cycle_and_stages_import_no_other_stage() -> None:
    package = REPO / "wsss"
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in package.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    stage_modules = {STAGES.get(s).module for s in STAGES}
    for m in stage_modules:
        assert not graph[m] & (stage_modules - {m}), f"{m} imports another stage: {graph[m] & stage_modules}"
        assert "wsss.cli" not in graph[m], f"{m} imports the CLI"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_a_stage_does_not_resume_from_another_stages_outputs(tmp_path: Path) -> None:
    """cam and accumulated_cams both write cams/: switching between them moves the other's files aside."""
    from wsss.engine.rundir import RunDir

    rd = RunDir(load_recipe("configs/shapes_cam.yaml", [f"run.root={tmp_path}"])).prepare()
    cams = rd.sub("cams")
    cams.mkdir()
    (cams / "a.npz").write_bytes(b"accumulated")
    rd.update_stage("accumulated_cams", status="done", config_hash="x")
    rd.reset_outputs_if_stale("cam", [cams])
    assert not cams.exists() and (rd.sub("cams.old") / "a.npz").read_bytes() == b"accumulated"
    cams.mkdir()
    (cams / "b.npz").write_bytes(b"cam")  # the cam stage's own (e.g. interrupted) outputs stay
    rd.update_stage("cam", status="running", config_hash=rd.stage_hash("cam"))
    rd.reset_outputs_if_stale("cam", [cams])
    assert (cams / "b.npz").is_file()
