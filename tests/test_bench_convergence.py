"""The convergence benchmark's harness: a row that links another run's outputs reruns when that run changed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_convergence as bench  # noqa: E402


def _write_manifest(run: Path, hashes: dict[str, str]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    stages = {k: {"status": "done", "config_hash": h, "seconds": 1.0} for k, h in hashes.items()}
    (run / "manifest.json").write_text(json.dumps({"stages": stages}))


def test_a_row_reruns_with_force_only_when_its_linked_run_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "cams_run" / "pseudo").mkdir(parents=True)
    _write_manifest(tmp_path / "cams_run", {"train_cam": "a", "pseudo": "b"})
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs) -> None:
        calls.append(cmd)
        _write_manifest(tmp_path / "row_s0", {"train_seg": "c", "evaluate": "d"})

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = argparse.Namespace(out=str(tmp_path), data=tmp_path, threads=1, set=[])
    row = bench.Run("voc12mini_cam.yaml", links={"pseudo": "cams_run"})

    for _ in range(2):  # first run, then a read-back with nothing changed upstream
        bench.wsss_run("row_s0", row, 0, args)
    assert ["--force" in c for c in calls] == [False, False]
    assert (tmp_path / "row_s0" / "pseudo").resolve() == (tmp_path / "cams_run" / "pseudo").resolve()

    _write_manifest(tmp_path / "cams_run", {"train_cam": "a", "pseudo": "changed"})  # the masks were remade
    bench.wsss_run("row_s0", row, 0, args)
    bench.wsss_run("row_s0", row, 0, args)  # recorded after the forced run: no second rerun
    assert ["--force" in c for c in calls] == [False, False, True, False]


def test_setup_from_mirrors_a_finished_run_without_writing_through_to_it(tmp_path: Path):
    """Large outputs are linked, small bookkeeping files copied: rewriting either in the mirror leaves the source."""
    source, target = tmp_path / "old" / "image_cam", tmp_path / "new" / "image_cam"
    (source / "cams").mkdir(parents=True)
    (source / "manifest.json").write_text('{"stages": {}}')
    (source / "cams" / "a.npy").write_bytes(b"x" * 64)
    bench.mirror_run(source, target, copy_below=32)
    assert (target / "cams" / "a.npy").is_symlink() and (target / "cams" / "a.npy").read_bytes() == b"x" * 64
    assert not (target / "manifest.json").is_symlink()
    (target / "manifest.json").write_text("rewritten")  # in place, as a log or manifest writer may
    assert (source / "manifest.json").read_text() == '{"stages": {}}'
    with pytest.raises(SystemExit, match="no manifest.json"):
        bench.mirror_run(tmp_path / "old" / "missing", tmp_path / "new" / "missing")
