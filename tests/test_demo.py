"""The main job (tools/demo.py) end to end on tiny data: teacher and student alone side by side,
then the TID student, one table; again with the cached teacher."""

import json
import os
import subprocess
import sys

import pytest

from .helpers import tiny_shapes_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_trains_three_models_and_prints_one_table(tmp_path):
    """The default family (FCOS) with a tiny head and FPN, 2 iterations per run."""
    env = tiny_shapes_env(tmp_path / "data")
    tiny = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.FCOS.NUM_CONVS", "1"]  # GN: 32 groups
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--iters", "2"]
    cmd += ["--output", str(tmp_path / "demo"), *tiny, "TID.TEACHER.OPTS", repr(tiny)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if (os.cpu_count() or 1) >= 2:
        assert "side by side" in out.stdout  # the student alone does not wait for the teacher

    rows = json.load(open(tmp_path / "demo" / "results.json"))
    assert [r["model"].split(" (")[0] for r in rows] == ["teacher", "student alone", "TID student"]
    for r in rows:
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "train min"} <= set(r)
        assert r["train min"] > 0
    text = open(tmp_path / "demo" / "results.md").read()
    assert "TID - student alone:" in text and "| TID student (R18-FPN64) |" in text
    assert text.splitlines()[0] == "COCO bbox AP on tid_shapes_test (fcos, 2 iterations each)"
    # every run got the overrides: the students' configs hold the tiny FPN, the teacher's too
    for run in ("fcos_teacher", "fcos_student_none", "fcos_student_tid"):
        assert "OUT_CHANNELS: 32" in open(tmp_path / "demo" / run / "config.yaml").read()
    # the TID run checked the teacher it loaded before training (TID.TEACHER.EVAL_BEFORE_TRAIN)
    metrics = open(tmp_path / "demo" / "fcos_student_tid" / "metrics.json").read()
    assert '"teacher/tid_shapes_test/AP"' in metrics

    # a second demo reuses the cached teacher and trains the two students side by side
    teacher = tmp_path / "demo" / "fcos_teacher" / "model_final.pth"
    mtime = os.path.getmtime(teacher)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reusing the cached teacher" in out.stdout
    if (os.cpu_count() or 1) >= 2:
        assert (
            "student alone (R18-FPN64) and the TID student (R18-FPN64) side by side" in out.stdout
        )
    assert os.path.getmtime(teacher) == mtime
    rows = json.load(open(tmp_path / "demo" / "results.json"))
    assert rows[0]["train min"] == 0.0 and rows[1]["train min"] > 0 and rows[2]["train min"] > 0
