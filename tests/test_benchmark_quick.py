"""The benchmark's --quick mode runs every variant end to end, so the benchmark never rots."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from tid_d2.runs import code_version

from .helpers import tiny_shapes_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark_script(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    import importlib

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.slow
def test_benchmark_quick_runs_every_variant(tmp_path):
    env = tiny_shapes_env(tmp_path / "data", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "run_benchmark.py"),
        "--quick",
        "--teacher-iters",
        "3",
        "--output",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "MODEL.FPN.OUT_CHANNELS",
        "16",
        "MODEL.RETINANET.NUM_CONVS",
        "1",
        "TID.TEACHER.OPTS",
        "['MODEL.FPN.OUT_CHANNELS', '16', 'MODEL.RETINANET.NUM_CONVS', '1']",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.load(open(tmp_path / "results" / "retinanet_quick_runs.json"))
    assert data["teacher_iterations"] == 3
    assert set(data["machine"]) == {"cpu", "cpu_id", "cpu_count", "torch", "cpu_capability"}
    assert data["code"] == code_version()  # the checkout's commit (None outside git)
    # the recorded command pastes back as the same arguments (TID.TEACHER.OPTS has spaces)
    assert shlex.split(data["command"]) == cmd[1:]
    modes = {r["mode"] for r in data["runs"]}
    assert modes == {
        "none",
        "fitnet",
        "gt_mask",
        "cls_only",
        "reg_only",
        "no_ldam",
        "pkd",
        "fgd",
        "tid",
    }
    for r in data["runs"]:
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "val_AP", "seed", "iterations"} <= set(r)
        assert {"sec_per_iter", "peak_mem_mb"} <= set(r)  # None: --quick measures no cost
    text = open(tmp_path / "results" / "retinanet_quick.md").read()
    assert "| tid |" in text and "gap recovered" in text

    tiny = cmd[cmd.index("MODEL.FPN.OUT_CHANNELS") :]

    # --name, --reuse and --merge: two variants re-reported from their finished runs (no
    # retraining), the other five merged from the first invocation's records
    final = tmp_path / "runs" / "retinanet_tid_s0" / "model_final.pth"
    mtime = os.path.getmtime(final)
    rerun = cmd[: cmd.index("MODEL.FPN.OUT_CHANNELS")] + ["--reuse", "--name", "named"]
    rerun += [
        "--modes",
        "none",
        "tid",
        "--merge",
        str(tmp_path / "results" / "retinanet_quick_runs.json"),
    ]
    out = subprocess.run(rerun + tiny, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert os.path.getmtime(final) == mtime
    named = json.load(open(tmp_path / "results" / "named_runs.json"))
    # repr: a --quick student with no detections has AP NaN (CI's kernel set), and NaN != NaN
    assert [(r["mode"], repr(r["AP"])) for r in named["runs"]] == [
        (r["mode"], repr(r["AP"])) for r in data["runs"]
    ]
    assert [r.get("merged_from") is None for r in named["runs"]] == [
        r["mode"] in ("none", "tid") for r in data["runs"]
    ]
    named_md = open(tmp_path / "results" / "named.md").read()
    assert "2 of 2 student runs reused" in named_md
    assert "7 of the 9 records were merged" in named_md and "retinanet_quick_runs.json" in named_md

    # --report-only: the finished runs are reported, a stopped one (fitnet's, its final
    # evaluation removed) is listed and left out, and nothing trains
    os.remove(tmp_path / "runs" / "retinanet_fitnet_s0" / "metrics.json")
    partial = cmd[: cmd.index("MODEL.FPN.OUT_CHANNELS")] + ["--report-only"]
    partial += ["--modes", "none", "fitnet", "tid", "--name", "partial"]
    out = subprocess.run(partial + tiny, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert os.path.getmtime(final) == mtime
    assert not (tmp_path / "runs" / "retinanet_fitnet_s0" / "metrics.json").exists()
    part = json.load(open(tmp_path / "results" / "partial_runs.json"))
    assert [(r["mode"], r["seed"]) for r in part["runs"]] == [("none", 0), ("tid", 0)]
    part_md = open(tmp_path / "results" / "partial.md").read()
    assert "not finished in --output, so not in the table: fitnet s0." in part_md
    # without a finished teacher there is nothing to report: an error, not a training run
    empty = partial[: partial.index("--output") + 1] + [str(tmp_path / "empty")]
    empty += partial[partial.index("--output") + 2 :]
    out = subprocess.run(empty + tiny, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "no finished teacher" in out.stderr
    assert not (tmp_path / "empty" / "retinanet_teacher" / "model_final.pth").exists()
    teacher = str(tmp_path / "runs" / "retinanet_teacher" / "model_final.pth")

    def run_tool(script, *args):
        """A benchmark script against the teacher the quick run trained, on the same tiny models
        (config overrides last)."""
        argv = [sys.executable, os.path.join(REPO, "benchmarks", script), "--teacher-weights"]
        argv += [teacher, "--results", str(tmp_path / "results"), *args]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # the gradient-norm diagnostic
    run_tool(
        "grad_norms.py",
        *["--setting", "tid TID.MODE tid TID.LOSS_WEIGHT 0.1", "--batches", "1"],
        *tiny,
        *["SOLVER.IMS_PER_BATCH", "2"],
    )
    (rec,) = json.load(open(tmp_path / "results" / "retinanet_grad_norms.json"))
    assert rec["setting"] == "tid" and rec["grad_det"] > 0 and rec["grad_tid"] > 0

    # the cost table, with config overrides reaching every measurement
    run_tool(
        "cost.py",
        *["--modes", "none", "tid", "--steps", "1", "--batch", "2", "--threads", "1"],
        *tiny,
    )
    rows = json.load(open(tmp_path / "results" / "retinanet_cost.json"))
    assert set(rows) == {"teacher", "none", "tid"}
    assert all(r["sec_per_iter"] > 0 and r["peak_mem_mb"] > 0 for r in rows.values())
    assert "(retinanet, cpu, batch 2" in open(tmp_path / "results" / "retinanet_cost.md").read()

    # operations per training step, what the GPU overhead follows
    run_tool(
        "step_ops.py",
        *["--modes", "none", "tid", "--steps", "1", "--batch", "2", "--threads", "1"],
        *tiny,
    )
    ops = json.load(open(tmp_path / "results" / "retinanet_step_ops.json"))
    assert set(ops) == {"none", "tid"} and ops["none"]["device"] == "cpu"
    assert 0 < ops["none"]["ops"] < ops["tid"]["ops"]  # TID's teacher forward, maps and loss
    assert "| tid |" in open(tmp_path / "results" / "retinanet_step_ops.md").read()

    # per-level feature scale of the trained students (a TID checkpoint into the plain student)
    stats = [sys.executable, os.path.join(REPO, "benchmarks", "feature_stats.py")]
    stats += [str(tmp_path / "runs" / f"retinanet_{m}_s0") for m in ("none", "tid")]
    stats += ["--config", os.path.join(REPO, "configs", "shapes", "retinanet_r18_student.yaml")]
    stats += ["--images", "2", "--results", str(tmp_path / "results"), "--opts", *tiny]
    out = subprocess.run(stats, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    levels = json.load(open(tmp_path / "results" / "feature_stats.json"))
    assert len(levels) == 2
    for per_level in levels.values():
        assert set(per_level) == {"p3", "p4", "p5", "p6", "p7"}
        assert all(rms > 0 and std >= 0 for rms, std in per_level.values())


def test_val_sweep_settings_are_valid_configs():
    """Every setting of benchmarks/val_sweep.py names a shipped config and overrides that merge
    (a renamed key or config fails here, not an hour into a sweep)."""
    val_sweep = _benchmark_script("val_sweep")
    from tid_d2.config import get_cfg

    names = [s[0] for s in val_sweep.SETTINGS]
    assert len(names) == len(set(names)) and "none" in names
    for name, config, opts, _ in val_sweep.SETTINGS:
        cfg = get_cfg()
        cfg.merge_from_file(os.path.join(REPO, "configs", "shapes", config))
        cfg.merge_from_list(list(opts))
        assert (cfg.MODEL.META_ARCHITECTURE == "TIDDistiller") == config.startswith("tid_"), name
        # every TID setting has a student-alone setting to be compared with
        if config.startswith("tid_"):
            base = val_sweep.base_key(config, opts)
            assert any(val_sweep.base_key(c, o) == base for _, c, o, _ in val_sweep.SETTINGS), name


def test_val_sweep_seed_rows_mean_std_and_paired_difference():
    """Seed aggregation of the val sweep, hand-computed: mean, sample std, and the AP difference
    to the student alone taken over the seeds both settings have."""
    val_sweep = _benchmark_script("val_sweep")

    def rec(name, seed, ap):
        fields = {f: ap for f in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
        return {"name": name, "seed": seed, "loss_cls": 0.5, "loss_tid": None, **fields}

    long = ["SOLVER.MAX_ITER", "3000"]
    settings = [
        ("none", val_sweep.STUDENT, [], "alone"),
        ("tid_x", val_sweep.TID, [], "tid"),
        ("none_long", val_sweep.STUDENT, long, "alone, longer"),
        ("tid_long", val_sweep.TID, ["TID.LOSS_WEIGHT", "0.01"] + long, "tid, longer"),
    ]
    records = [
        rec("none", 0, 2.0),
        rec("none", 1, 4.0),
        rec("none", 2, 6.0),
        rec("tid_x", 0, 3.0),
        rec("tid_x", 1, 6.0),
        rec("none_long", 0, 10.0),
        rec("tid_long", 0, 9.0),
    ]
    alone, tid, _, tid_long = val_sweep.seed_rows(settings, records)
    # each TID setting is compared with the student alone on its own schedule
    assert tid_long["AP - alone"] == "-1.00"
    assert alone["seeds"] == 3 and alone["AP"] == "4.00 ± 2.00"
    assert alone["AP - alone"] == "+0.00 ± 0.00"
    # tid: mean 4.5, std sqrt(4.5) = 2.12; paired differences (seeds 0, 1): +1, +2
    assert tid["seeds"] == 2 and tid["AP"] == "4.50 ± 2.12"
    assert tid["AP - alone"] == "+1.50 ± 0.71"
    (single,) = val_sweep.seed_rows(settings[:1], records[:1])
    assert single["AP"] == "2.00" and single["AP - alone"] == "+0.00"
    # a student started from other weights has its own baseline; a setting without a finished
    # run is left out of the table
    head = ["MODEL.WEIGHTS", "<teacher_head>"]
    settings += [
        ("none_head", val_sweep.STUDENT, head, "alone, head"),
        ("tid_head", val_sweep.TID, head, "tid, head"),
        ("tid_unrun", val_sweep.TID, ["TID.LOSS_WEIGHT", "0.5"], "not run"),
    ]
    records += [rec("none_head", 0, 20.0), rec("tid_head", 0, 25.0)]
    rows = val_sweep.seed_rows(settings, records)
    assert [r["setting"] for r in rows][-2:] == ["none_head", "tid_head"]
    assert rows[-1]["AP - alone"] == "+5.00"


def test_run_benchmark_summary_pairs_seeds_and_gap():
    """Benchmark table, hand-computed: mean ± sample std per variant, the difference to the
    student alone paired by seed, and the share of the teacher-student gap recovered over the
    seeds both have."""
    run_benchmark = _benchmark_script("run_benchmark")

    def rec(mode, seed, ap):
        fields = {f: ap for f in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
        return {"mode": mode, "seed": seed, "val_AP": ap, **fields}

    records = [
        rec("none", 0, 10.0),
        rec("none", 1, 14.0),
        rec("tid", 0, 11.0),
        rec("tid", 1, 17.0),
        rec("tid", 2, 20.0),  # no student-alone run of seed 2: not paired
    ]
    text = run_benchmark.summarize(records, "rcnn", teacher_ap=32.0)
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    # none: mean 12, std sqrt(8) = 2.83; tid: mean 16, std sqrt(21) = 4.58
    assert "| none | 2 | 12.00 ± 2.83 |" in lines["none"]
    assert lines["none"].endswith("| +0.00 ± 0.00 | - |")
    assert "| tid | 3 | 16.00 ± 4.58 |" in lines["tid"]
    # paired (seeds 0, 1): +1, +3 -> +2.00 ± 1.41; gap recovered over the same seeds:
    # 2 / (32 - 12) = 10% (seed 2, with no student-alone run, does not count)
    assert lines["tid"].endswith("| +2.00 ± 1.41 | 10% |")
    # with every seed in both: (mean - mean alone) / (teacher - mean alone), (13 - 12) / 20 = 5%
    full = records[:4] + [rec("fitnet", 0, 11.0), rec("fitnet", 1, 15.0)]
    fit = [
        ln for ln in run_benchmark.summarize(full, "rcnn", 32.0).splitlines() if "| fitnet |" in ln
    ]
    assert fit[0].endswith("| +1.00 ± 0.00 | 5% |")


def test_run_benchmark_records_take_each_variants_cost():
    """Each run record gets its own variant's cost.py row (identical batches), None if unmeasured."""
    run_benchmark = _benchmark_script("run_benchmark")
    records = [{"mode": "none", "seed": 0}, {"mode": "tid", "seed": 1}, {"mode": "fitnet"}]
    cost = {
        "teacher": {"sec_per_iter": 0.1, "peak_mem_mb": 900.0},
        "none": {"sec_per_iter": 0.4, "peak_mem_mb": 1100.0},
        "tid": {"sec_per_iter": 0.5, "peak_mem_mb": 1200.0},
    }
    run_benchmark.attach_cost(records, cost)
    assert (records[0]["sec_per_iter"], records[0]["peak_mem_mb"]) == (0.4, 1100.0)
    assert (records[1]["sec_per_iter"], records[1]["peak_mem_mb"]) == (0.5, 1200.0)
    assert (records[2]["sec_per_iter"], records[2]["peak_mem_mb"]) == (None, None)


def test_run_benchmark_merge_records_joins_earlier_runs_of_the_same_teacher(tmp_path):
    """--merge: an earlier invocation's records fill the (variant, seed) pairs this one did not
    run, this invocation's own runs take precedence, and a different teacher or schedule is an
    error naming the file."""
    run_benchmark = _benchmark_script("run_benchmark")

    def rec(mode, seed, ap, iters=1000):
        return {"family": "rcnn", "mode": mode, "seed": seed, "iterations": iters, "AP": ap}

    earlier = tmp_path / "rcnn_seed0_runs.json"
    earlier_runs = [rec("none", 0, 15.0), rec("tid", 0, 12.0), rec("tid", 1, 99.0)]
    cmd = "benchmarks/run_benchmark.py --family rcnn --seeds 0"
    earlier.write_text(json.dumps({"teacher_AP": 64.5, "command": cmd, "runs": earlier_runs}))
    now = [rec("tid", 1, 11.0), rec("none", 1, 13.0)]
    records, commands = run_benchmark.merge_records(now, [str(earlier)], "rcnn", 1000, 64.5)
    got = [(r["mode"], r["seed"], r["AP"], r.get("merged_from")) for r in records]
    assert got == [
        ("none", 0, 15.0, "rcnn_seed0_runs.json"),
        ("tid", 0, 12.0, "rcnn_seed0_runs.json"),
        ("none", 1, 13.0, None),
        ("tid", 1, 11.0, None),  # this invocation's run, not the file's 99.0
    ]
    assert commands == [f"`rcnn_seed0_runs.json`: `python {cmd}`"]
    # --merge-modes none: only the student alone is borrowed (the file's tid may be another lambda)
    records, _ = run_benchmark.merge_records([], [str(earlier)], "rcnn", 1000, 64.5, ["none"])
    assert [(r["mode"], r["seed"], r.get("merged_from")) for r in records] == [
        ("none", 0, "rcnn_seed0_runs.json")
    ]

    with pytest.raises(ValueError, match="teacher with test AP 64.5000.*64.6000"):
        run_benchmark.merge_records(now, [str(earlier)], "rcnn", 1000, 64.6)
    with pytest.raises(ValueError, match="1000 iterations cannot join a rcnn table of 500"):
        run_benchmark.merge_records(now, [str(earlier)], "rcnn", 500, 64.5)
    with pytest.raises(ValueError, match="a rcnn run of 1000 iterations cannot join a retinanet"):
        run_benchmark.merge_records([], [str(earlier)], "retinanet", 1000, 64.5)


def test_same_teacher_rule_json_round_off_and_nan(tmp_path):
    """One teacher's AP agrees up to the json round trip; a teacher with no detections (AP NaN,
    as a --quick teacher gets on some kernel sets: CI's did) matches only another NaN, and its
    runs file (json writes NaN) merges."""
    run_benchmark = _benchmark_script("run_benchmark")
    same, nan = run_benchmark.same_teacher, float("nan")
    assert same(72.0, 72.0 + 1e-9) and not same(72.0, 72.001)
    assert same(nan, nan) and not same(nan, 72.0) and not same(72.0, nan)
    earlier = tmp_path / "quick_runs.json"
    run = {"family": "rcnn", "mode": "none", "seed": 0, "iterations": 3, "AP": nan}
    earlier.write_text(json.dumps({"teacher_AP": nan, "command": "x", "runs": [run]}))
    records, _ = run_benchmark.merge_records([], [str(earlier)], "rcnn", 3, nan)
    assert [(r["mode"], r["merged_from"]) for r in records] == [("none", "quick_runs.json")]
    with pytest.raises(ValueError, match="teacher with test AP nan"):
        run_benchmark.merge_records([], [str(earlier)], "rcnn", 3, 64.5)


def test_step_ops_counts_each_kind_once():
    """Hand-made profiler events: an aten operator counts only when no aten operator called it
    (autograd's engine may); launches, copies and syncs by their CUDA runtime names."""
    from types import SimpleNamespace as Event

    step_ops = _benchmark_script("step_ops")
    add = Event(name="aten::add", cpu_parent=None)
    engine = Event(name="autograd::engine::evaluate_function: AddBackward0", cpu_parent=None)
    events = [
        add,
        Event(name="aten::empty", cpu_parent=add),  # inside aten::add: not counted
        Event(name="aten::mul", cpu_parent=engine),  # backward: counted
        Event(name="cudaLaunchKernel", cpu_parent=add),
        Event(name="cudaLaunchKernelExC", cpu_parent=None),
        Event(name="cudaMemcpyAsync", cpu_parent=None),
        Event(name="cudaStreamSynchronize", cpu_parent=None),
        Event(name="cudaDeviceSynchronize", cpu_parent=None),
        engine,
    ]
    assert step_ops.count_events(events) == {"ops": 2, "launches": 2, "copies": 1, "syncs": 2}


def test_summary_table_one_row_per_family_hand_computed():
    """benchmarks/summary.py: per family the teacher AP, each variant's mean ± sample std over
    its seeds (seed count shown where it differs from the student alone's), a dash for a variant
    not run, and TID minus the student alone paired by seed."""
    summary = _benchmark_script("summary")

    def rec(mode, seed, ap):
        return {"mode": mode, "seed": seed, "AP": ap}

    data = {
        "teacher_AP": 60.0,
        "runs": [
            rec("none", 0, 10.0),
            rec("none", 1, 14.0),
            rec("fitnet", 0, 12.0),
            rec("tid", 0, 11.0),
            rec("tid", 1, 17.0),
        ],
    }
    text = summary.summary_table([("Fam", data)])
    header, _, row = text.splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["family"] == "Fam" and cells["teacher"] == "60.00"
    assert cells["student alone"] == "12.00 ± 2.83"  # std sqrt(8)
    assert cells["fitnet"] == "12.00 (1 seed)"
    assert cells["gt_mask"] == "-"
    assert cells["TID"] == "14.00 ± 4.24"  # std sqrt(18)
    assert cells["TID - alone"] == "+2.00 ± 1.41"  # paired +1, +3


def test_summary_pools_runs_files_of_one_teacher_and_refuses_mixtures():
    """summary.py LABEL=A+B: one row from several files of the same teacher; a copy of a run in
    both files counts once; another teacher, another run under the same (variant, seed), or one
    variant trained with different overrides is refused with a message."""
    summary = _benchmark_script("summary")

    def rec(mode, seed, ap, opts=None):
        r = {"mode": mode, "seed": seed, "AP": ap}
        if opts is not None:
            r["opts"] = opts
        return r

    machine = {"cpu_capability": "AVX2"}
    a = {
        "teacher_AP": 60.0,
        "machine": machine,
        "runs": [rec("none", 0, 10.0), rec("tid", 0, 11.0)],
    }
    b = {
        "teacher_AP": 60.0,
        "machine": machine,
        "runs": [rec("none", 0, 10.0), rec("none", 1, 14.0), rec("tid", 1, 17.0, [])],
    }
    data = summary.pooled([a, b], ["a", "b"])
    assert sorted((r["mode"], r["seed"]) for r in data["runs"]) == [
        ("none", 0),
        ("none", 1),
        ("tid", 0),
        ("tid", 1),
    ]
    header, _, row = summary.summary_table([("Fam", data)]).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["student alone"] == "12.00 ± 2.83" and cells["TID - alone"] == "+2.00 ± 1.41"
    other_teacher = {**b, "teacher_AP": 61.0}
    with pytest.raises(ValueError, match="teacher test AP"):
        summary.pooled([a, other_teacher], ["a", "c"])
    # the teacher rule is --merge's (run_benchmark.same_teacher): json round-off pools, 1e-3 not
    assert len(summary.pooled([a, {**b, "teacher_AP": 60.0 + 1e-9}], ["a", "b"])["runs"]) == 4
    with pytest.raises(ValueError, match="teacher test AP"):
        summary.pooled([a, {**b, "teacher_AP": 60.001}], ["a", "c"])
    other_run = {**b, "runs": [rec("none", 0, 9.0)]}
    with pytest.raises(ValueError, match="different run"):
        summary.pooled([a, other_run], ["a", "d"])
    mixed = {**b, "runs": [rec("tid", 2, 15.0, ["TID.LOSS_WEIGHT", "0.1"])]}
    with pytest.raises(ValueError, match="one setting per variant"):
        summary.pooled([b, mixed], ["b", "e"])


def test_variants_settings_and_val_chosen_loss_weights(tmp_path):
    """A table's variants are the TID.MODE values plus TID with one option changed; a loss weight
    chosen on val (benchmarks/lambda_grid.py's file) reaches the variant's run under its mode's
    own key, and every variant of every setting is a valid config."""
    from types import SimpleNamespace

    from tid_d2.config import get_cfg
    from tid_d2.modeling.distiller import validate_tid_cfg
    from tid_d2.runs import BENCHMARK_FAMILIES

    bench = _benchmark_script("run_benchmark")
    assert bench.VARIANTS[0] == "none" and bench.VARIANTS[-1] == "tid"
    assert {"pkd", "fgd", "tid_locations", "tid_channel_norm"} <= set(bench.VARIANTS)
    assert bench.variant_opts("tid_locations") == [
        "TID.MODE",
        "tid",
        "TID.REGION.NORMALIZE",
        "locations",
    ]
    path = bench.lambda_file(str(tmp_path), "fcos", "plateau")
    assert os.path.basename(path) == "fcos_plateau_lambda.json"
    assert bench.chosen_loss_weights(path) == {}
    with open(path, "w") as f:
        json.dump({"chosen": {"pkd": 3.0, "tid_channel_norm": 0.01, "fgd": 10}}, f)
    weights = bench.chosen_loss_weights(path)
    assert bench.variant_opts("pkd", weights) == ["TID.MODE", "pkd", "TID.PKD.LOSS_WEIGHT", "3.0"]
    assert bench.variant_opts("fgd", weights)[-2:] == ["TID.FGD.LOSS_WEIGHT", "10.0"]
    assert bench.variant_opts("tid_channel_norm", weights)[-2:] == ["TID.LOSS_WEIGHT", "0.01"]
    assert bench.variant_opts("none", weights) == ["TID.MODE", "none"]
    for setting in bench.SETTINGS:
        args = SimpleNamespace(
            iters=10,
            eval_period=5,
            seeds=[0],
            workers=0,
            setting=setting,
            config_dir=os.path.join(REPO, "configs", "shapes"),
            loss_weights=weights,
        )
        # the plateau setting has configs for the dense families (FCOS, RetinaNet, GFL, ATSS), the
        # standard one for every family
        dense = [fam for fam in BENCHMARK_FAMILIES if fam != "rcnn"]
        for fam in dense if setting == "plateau" else BENCHMARK_FAMILIES:
            teacher = get_cfg()
            teacher.merge_from_file(
                os.path.join(
                    args.config_dir, bench.SETTINGS[setting]["teacher_config"].format(fam=fam)
                )
            )
            for variant in bench.VARIANTS:
                _, config, opts = bench._variant_run(args, fam, variant, 0, "t.pth", "/o", [])
                cfg = get_cfg()
                cfg.merge_from_file(config)
                cfg.merge_from_list(opts)
                validate_tid_cfg(cfg)
                assert cfg.TID.STUDENT_META_ARCHITECTURE == teacher.MODEL.META_ARCHITECTURE


def test_a_family_without_the_settings_configs_is_refused_by_name(tmp_path, capsys):
    """--setting plateau has configs for the dense families only: asking it of Faster R-CNN
    stops before any data or training with the missing config and the families it has."""
    bench = _benchmark_script("run_benchmark")
    shapes = os.path.join(REPO, "configs", "shapes")
    assert bench.families_of_setting(shapes, "plateau") == ["retinanet", "fcos", "atss", "gfl"]
    assert bench.families_of_setting(shapes, "standard") == bench.FAMILIES
    with pytest.raises(SystemExit):
        bench.main(["--family", "rcnn", "--setting", "plateau", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "tid_rcnn_plateau.yaml" in err and "retinanet, fcos, atss, gfl" in err
    assert not os.path.exists(tmp_path / "o")


def test_another_split_shares_the_teacher_and_keeps_its_own_runs_and_records(tmp_path, capsys):
    """--student-config (another split of a setting): its runs are named by the config beside the
    setting's, against the same cached teacher; it must name the setting's teacher config; and
    --merge refuses a record of another split."""
    import json
    from types import SimpleNamespace

    from tid_d2.config import get_cfg
    from tid_d2.modeling.distiller import validate_tid_cfg

    bench = _benchmark_script("run_benchmark")
    shapes = os.path.join(REPO, "configs", "shapes")
    split = os.path.join(shapes, "tid_retinanet_plateau_fpn16.yaml")
    args = SimpleNamespace(
        iters=10, eval_period=5, seeds=[0], workers=0, setting="plateau", config_dir=shapes
    )
    out, config, _ = bench._variant_run(args, "retinanet", "tid", 0, "t.pth", "/o", [])
    assert (out, config) == (
        "/o/retinanet_tid_s0",
        os.path.join(shapes, "tid_retinanet_plateau.yaml"),
    )
    args.student_config = split
    out, config, opts = bench._variant_run(args, "retinanet", "tid", 0, "t.pth", "/o", [])
    assert out == "/o/retinanet_fpn16_tid_s0" and config == split
    assert bench.split_name(args, "retinanet") == "fpn16"
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    validate_tid_cfg(cfg)
    assert (cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.RETINANET.NORM) == (16, "")
    assert cfg.TID.TEACHER.WEIGHTS == "t.pth"  # the benchmark's cached teacher
    bench.check_split_teacher(None, split, shapes, bench.SETTINGS["plateau"], "retinanet")

    # a split distilling from another teacher config is refused before anything runs
    other = tmp_path / "other_teacher.yaml"
    other.write_text(
        f'_BASE_: "{split}"\nTID:\n  TEACHER:\n    CONFIG_FILE: "configs/shapes/retinanet_mnv2_teacher.yaml"\n'
    )
    argv = ["--family", "retinanet", "--setting", "plateau", "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        bench.main(argv + ["--student-config", str(other)])
    err = capsys.readouterr().err
    assert "retinanet_mnv2_teacher.yaml" in err and "retinanet_mnv2_teacher_plateau.yaml" in err
    with pytest.raises(SystemExit):
        bench.main(argv + ["--student-config", str(tmp_path / "missing.yaml")])
    assert "no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")

    # --merge keeps splits apart: a record of the setting's own student does not join a split's
    # table, nor the other way round
    record = dict(family="retinanet", mode="none", seed=1, iterations=10, student_config=None)
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"teacher_AP": 50.0, "command": "x", "runs": [record]}))
    mine = "configs/shapes/tid_retinanet_plateau_fpn16.yaml"
    with pytest.raises(ValueError, match="another split"):
        bench.merge_records([], [str(runs)], "retinanet", 10, 50.0, None, mine)
    merged, _ = bench.merge_records([], [str(runs)], "retinanet", 10, 50.0)
    assert [r["seed"] for r in merged] == [1]
    record.pop("student_config")  # records written before --student-config: the setting's own
    runs.write_text(json.dumps({"teacher_AP": 50.0, "command": "x", "runs": [record]}))
    assert len(bench.merge_records([], [str(runs)], "retinanet", 10, 50.0)[0]) == 1
    with pytest.raises(ValueError, match="another split"):
        bench.merge_records([], [str(runs)], "retinanet", 10, 50.0, None, mine)


def test_the_chosen_lambda_grid_point_is_the_benchmarks_first_seed_run(tmp_path):
    """lambda_grid.py trains each point exactly as the benchmark's seed-0 run of that variant
    (val and test at the end); once a point is chosen and finished, run_benchmark.py takes that
    folder for seed 0 instead of training it again, and never for another seed, weight or a grid
    run of other settings."""
    from types import SimpleNamespace

    from tid_d2.config import get_cfg

    bench = _benchmark_script("run_benchmark")
    grid = _benchmark_script("lambda_grid")
    root = str(tmp_path / "bench")
    shapes = os.path.join(REPO, "configs", "shapes")
    grid_args = SimpleNamespace(
        setting="plateau",
        iters=20,
        workers=0,
        config_dir=shapes,
        output=bench.grid_root(root),
        family="fcos",
    )
    _, out, config, opts = grid.grid_run(grid_args, "tid", 0.003, "t.pth")
    assert out == os.path.join(str(tmp_path), "bench_grid", "fcos_tid_l0.003")
    args = SimpleNamespace(
        setting="plateau",
        iters=20,
        eval_period=bench.SETTINGS["plateau"]["eval_period"],
        seeds=[0, 1],
        workers=0,
        config_dir=shapes,
        loss_weights={"tid": 0.003},
    )
    own = os.path.join(root, "fcos_tid_s0")
    assert bench.benchmark_run(args, "fcos", "tid", 0, "t.pth", root, [])[0] == own  # no grid run
    # the grid point, finished: a saved config of these settings and an evaluation at the end
    os.makedirs(out)
    saved = get_cfg()
    saved.merge_from_file(config)
    saved.merge_from_list(opts)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(saved.dump())
    with open(os.path.join(out, "metrics.json"), "w") as f:
        for ds in (bench.VAL, bench.TEST):
            f.write(json.dumps({"iteration": 19, f"{ds}/bbox/AP": 50.0}) + "\n")
    assert bench.benchmark_run(args, "fcos", "tid", 0, "t.pth", root, []) == (out, config, opts)
    assert bench.benchmark_run(args, "fcos", "tid", 1, "t.pth", root, [])[0].endswith("_s1")
    args.loss_weights = {"tid": 0.01}  # another weight chosen: its own point, not this one
    assert bench.benchmark_run(args, "fcos", "tid", 0, "t.pth", root, [])[0] == own
    args.loss_weights = {"tid": 0.003}
    args.iters = 40  # a grid run of another schedule is left alone, not an error
    assert bench.benchmark_run(args, "fcos", "tid", 0, "t.pth", root, [])[0] == own
    # the grid reads a finished point in this format and in the earlier val-only one; the
    # benchmark takes only the former as its seed-0 run
    args.iters = 20
    assert grid.finished_point(("tid", out, config, opts), 20) == opts
    val_only = grid.val_only_opts(opts)
    assert val_only[val_only.index("TEST.EVAL_PERIOD") + 1] == "0"
    saved.merge_from_list(val_only)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(saved.dump())
    assert grid.finished_point(("tid", out, config, opts), 20) == val_only
    assert grid.finished_point(("tid", out, config, opts), 40) is None
    assert bench.benchmark_run(args, "fcos", "tid", 0, "t.pth", root, [])[0] == own


def test_loss_shares_reads_per_level_imitation_from_the_training_log(tmp_path):
    """benchmarks/loss_shares.py on a hand-written metrics.json: window means, the levels'
    shares of the imitation and its ratio to the detection loss, evaluation records skipped."""
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"iteration": 0, "loss_fcos_cls": 1.0, "loss_tid_p3": 0.3, "loss_tid_p4": 0.1},
        {"iteration": 1, "loss_fcos_cls": 3.0, "loss_tid_p3": 0.5, "loss_tid_p4": 0.1},
        {"iteration": 1, "tid_shapes_val/bbox/AP": 50.0},  # an evaluation: no losses
        {"iteration": 2, "loss_fcos_cls": 0.5, "loss_tid_p3": 0.0, "loss_tid_p4": 0.25},
    ]
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    script = _benchmark_script("loss_shares")
    windows = ["--window", "0", "2", "--window", "2", "3"]
    script.main([str(run), *windows, "--results", str(tmp_path), "--name", "ls"])
    first, second = json.load(open(tmp_path / "ls.json"))["runs"][str(run)]
    # iterations 0-1: p3 mean 0.4, p4 0.1 -> imitation 0.5, detection 2.0
    assert first["imitation"] == pytest.approx(0.5)
    assert first["detection"] == pytest.approx(2.0)
    assert first["share"] == pytest.approx({"p3": 0.8, "p4": 0.2})
    # iteration 2 alone: all of the imitation on p4
    assert second["share"] == pytest.approx({"p3": 0.0, "p4": 1.0})
    row = "| 0-2 | 0.5000 | 2.0000 | 0.2500 | 0.8000 | 0.2000 |"
    assert row in (tmp_path / "ls.md").read_text()
    with pytest.raises(SystemExit):  # a folder without a training log is an error, not a table
        script.main([str(tmp_path / "missing"), "--results", str(tmp_path)])


def test_lambda_grid_takes_a_grid_per_variant():
    """``--grid-for pkd ... --grid-for fgd ...`` gives each method its own weights in one
    invocation (PKD's and FGD's strength-matched weights differ by 10x); the others keep --grid or
    their key's default; a variant not asked for, or a list without numbers, is refused."""
    grid = _benchmark_script("lambda_grid")
    per = grid.variant_grids([["pkd", "0.015", "0.05"], ["fgd", "0.005"]], ["pkd", "fgd", "tid"])
    assert per == {"pkd": [0.015, 0.05], "fgd": [0.005]}
    assert grid.grid_of("pkd", None, per) == [0.015, 0.05]
    assert grid.grid_of("fgd", [1.0], per) == [0.005]
    assert grid.grid_of("tid", [1.0], per) == [1.0]
    assert grid.grid_of("tid", None, per) == grid.GRIDS["TID.LOSS_WEIGHT"]
    for bad, match in (
        ([["fitnet", "0.1"]], "not among --variants"),
        ([["pkd"]], "at least one"),
        ([["pkd", "x"]], "must be numbers"),
    ):
        with pytest.raises(ValueError, match=match):
            grid.variant_grids(bad, ["pkd", "fgd"])


def test_lambda_grid_reads_the_student_alone_from_a_record(tmp_path):
    """The grid's reference (the student alone at seed 0) comes from its run folder, else from a
    run_benchmark.py record (``--alone-from``), and a record of another family or schedule, or
    one without that run, is an error rather than a wrong reference."""
    grid = _benchmark_script("lambda_grid")
    missing = str(tmp_path / "fcos_none_s0")
    assert grid.student_alone_val_ap(missing) == (None, None)
    alone = {"family": "fcos", "mode": "none", "seed": 0, "iterations": 1000, "val_AP": 9.99}
    other = dict(alone, seed=1, val_AP=10.64)
    record = tmp_path / "fcos_amd_none_runs.json"
    record.write_text(json.dumps({"runs": [other, alone]}))
    got = grid.student_alone_val_ap(missing, str(record), "fcos", 1000)
    assert got == (9.99, "fcos_amd_none_runs.json")
    with pytest.raises(ValueError, match="retinanet at 1000"):
        grid.student_alone_val_ap(missing, str(record), "retinanet", 1000)
    with pytest.raises(ValueError, match="6000"):
        grid.student_alone_val_ap(missing, str(record), "fcos", 6000)
    record.write_text(json.dumps({"runs": [other]}))
    with pytest.raises(ValueError, match="no run of the student alone"):
        grid.student_alone_val_ap(missing, str(record), "fcos", 1000)


def test_paired_pools_pairs_across_machine_kinds_hand_computed():
    """benchmarks/paired.py: pairs are taken inside each runs file (its own student alone of the
    same seed), pooled over files of different kinds, and a run copied into two files (as
    ``--merge`` does) counts once."""
    paired = _benchmark_script("paired")

    def rec(mode, seed, ap, val):
        return {"family": "gfl", "mode": mode, "seed": seed, "AP": ap, "val_AP": val}

    avx512 = {
        "teacher_AP": 67.816,
        "machine": {"cpu": "EPYC", "cpu_capability": "AVX512"},
        "runs": [rec("none", 0, 20.0, 19.0), rec("cls_only", 0, 23.0, 21.0)],
    }
    merged_copy = dict(avx512, runs=list(avx512["runs"]))  # the same runs, merged elsewhere
    avx2 = {
        "teacher_AP": 67.828,
        "machine": {"cpu": "EPYC", "cpu_capability": "AVX2"},
        "runs": [
            rec("none", 1, 21.0, 20.0),
            rec("cls_only", 1, 20.0, 21.0),
            rec("none", 2, 22.0, 20.0),
            rec("cls_only", 2, 24.0, 20.0),
            rec("tid", 3, 30.0, 30.0),  # no student alone of seed 3: no pair
        ],
    }
    pairs = paired.pooled_pairs([avx512, merged_copy, avx2])
    assert set(pairs) == {"cls_only"}
    assert [(k, s, d, v) for k, s, d, v in pairs["cls_only"]] == [
        ("EPYC (AVX512)", 0, 3.0, 2.0),
        ("EPYC (AVX2)", 1, -1.0, 1.0),
        ("EPYC (AVX2)", 2, 2.0, 0.0),
    ]
    header, _, row = paired.pooled_table(pairs).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["pairs"] == "3"
    assert cells["test AP - alone"] == "+1.33 ± 2.08"  # +3, -1, +2: std sqrt(13/3)
    assert cells["t (test)"] == "+1.11"  # 1.333 / (2.082 / sqrt 3)
    assert cells["above (test)"] == "2/3"
    assert cells["val AP - alone"] == "+1.00 ± 1.00" and cells["t (val)"] == "+1.73"
    assert cells["above (val)"] == "2/3"  # +2, +1, 0: zero is not above


def test_paired_refuses_files_of_several_families_or_schedules(tmp_path):
    """benchmarks/paired.py: a 12000-iteration pair is not another seed of a 6000-iteration one;
    pooling them is refused with a message that names the schedules, as for families."""
    paired = _benchmark_script("paired")

    def runs(family, iters):
        rec = {"family": family, "iterations": iters, "seed": 0, "AP": 1.0, "val_AP": 1.0}
        return {"teacher_AP": 72.0, "runs": [dict(rec, mode="none"), dict(rec, mode="tid")]}

    assert paired.mixed_runs([runs("fcos", 6000), runs("fcos", 6000)]) is None
    assert "schedules (iterations) ([6000, 12000])" in paired.mixed_runs(
        [runs("fcos", 6000), runs("fcos", 12000)]
    )
    assert "families (['fcos', 'gfl'])" in paired.mixed_runs(
        [runs("fcos", 6000), runs("gfl", 6000)]
    )
    (tmp_path / "s_runs.json").write_text(json.dumps(runs("fcos", 6000)))
    (tmp_path / "2s_runs.json").write_text(json.dumps(runs("fcos", 12000)))
    with pytest.raises(SystemExit):
        paired.main([str(tmp_path / "s_runs.json"), str(tmp_path / "2s_runs.json")])


def test_paired_keeps_variants_trained_with_other_overrides_apart(tmp_path):
    """benchmarks/paired.py: fgd at TID.FGD.LOSS_WEIGHT 0.005 and fgd at its config's weight are
    two variants; the overrides come from a record's ``opts``, else from the command of the file
    that trained it (a merged record's own file, read beside the one that holds it), and keys of
    other methods (TID.PKD.* in an fgd run) do not split a variant."""
    paired = _benchmark_script("paired")

    def rec(mode, seed, ap, **extra):
        return {"family": "gfl", "mode": mode, "seed": seed, "AP": ap, "val_AP": ap, **extra}

    machine = {"cpu": "EPYC", "cpu_capability": "AVX2"}
    weighted = {
        "teacher_AP": 60.0,
        "machine": machine,
        "command": "benchmarks/run_benchmark.py --family gfl --modes none fgd --seeds 0 --reuse "
        "TID.PKD.LOSS_WEIGHT 0.05 TID.FGD.LOSS_WEIGHT 0.005",
        "runs": [rec("none", 0, 20.0), rec("fgd", 0, 21.0)],
    }
    (tmp_path / "weighted_runs.json").write_text(json.dumps(weighted))
    holder = {
        "teacher_AP": 60.0,
        "machine": machine,
        "command": "benchmarks/run_benchmark.py --family gfl --modes fgd --seeds 1 "
        "--merge weighted_runs.json",
        "runs": [
            rec("none", 0, 20.0, merged_from="weighted_runs.json"),
            rec("fgd", 0, 21.0, merged_from="weighted_runs.json"),  # its file's overrides
            rec("none", 1, 18.0, opts=[]),
            rec("fgd", 1, 26.0, opts=[]),  # the config's FGD weights
        ],
    }
    pairs = paired.pooled_pairs([weighted, holder], [str(tmp_path)] * 2)
    assert set(pairs) == {"fgd TID.FGD.LOSS_WEIGHT 0.005", "fgd"}
    assert [p[1:3] for p in pairs["fgd TID.FGD.LOSS_WEIGHT 0.005"]] == [(0, 1.0)]  # once
    assert [p[1:3] for p in pairs["fgd"]] == [(1, 8.0)]
    rows = paired.pooled_table(pairs).splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["fgd", "fgd TID.FGD.LOSS_WEIGHT 0.005"]


def _fake_run(folder, max_iter, val_aps):
    """A run folder as plateau_curve.py reads it: config.yaml with SOLVER.MAX_ITER and a
    metrics.json with one val evaluation per (iterations trained, AP)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"SOLVER:\n  MAX_ITER: {max_iter}\n")
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for it, ap in val_aps:
            f.write(json.dumps({"iteration": it - 1, "tid_shapes_val/bbox/AP": ap}) + "\n")


def test_plateau_curve_checks_the_teachers_own_plateau_and_a_longer_teachers_lead(
    tmp_path, monkeypatch
):
    """``--teacher`` reports the teacher at T against 2 T on the student's seed std, and the lead
    a 2 T teacher has over the student at 2 S beside the cached teacher's (hand-computed)."""
    import tid_d2.data

    monkeypatch.setattr(tid_d2.data, "ensure_generated", lambda name: None)
    curve = _benchmark_script("plateau_curve")
    bench, out, results = tmp_path / "bench", tmp_path / "curve", tmp_path / "results"
    _fake_run(str(bench / "retinanet_teacher"), 4000, [(2000, 58.0), (4000, 62.0)])
    _fake_run(str(bench / "retinanet_none_s0"), 6000, [(3000, 55.0), (6000, 58.5)])
    _fake_run(str(out / "retinanet_none_s0_12000"), 12000, [(6000, 57.0), (12000, 59.0)])
    _fake_run(str(out / "retinanet_teacher_8000"), 8000, [(4000, 60.0), (8000, 65.5)])
    argv = ["--family", "retinanet", "--teacher", "--report-only", "--seed-std", "0.5"]
    argv += ["--bench-output", str(bench), "--output", str(out), "--results", str(results)]
    assert curve.main(argv) == 0
    text = (results / "retinanet_plateau_curve_teacher.md").read_text()
    assert "| teacher, 2 T = 8000 | 4000: 60.0, 8000: 65.5 | 65.50 |" in text
    # plateau of the student: 58.5 - 59.0 = -0.50, within one std (0.5)
    assert "= -0.50; one seed std = 0.50 (--seed-std): holds." in text
    # the cached teacher leads the student at 2 S by 3.0 only; the 2 T teacher by 6.5
    assert "62.00 minus the student's at 2 S = 12000 59.00 = +3.00 (needs >= 5): does NOT" in text
    assert "teacher plateau: val AP at T = 4000 minus at 2 T = 8000 = -3.50" in text
    assert "does NOT hold." in text.split("teacher plateau")[1].split("\n")[0]
    assert "2 T = 8000 val AP 65.50 minus the student's at 2 S = 12000 59.00 = +6.50" in text
    data = json.loads((results / "retinanet_plateau_curve_teacher.json").read_text())
    assert data["teacher_2T_curve"] == [[4000, 60.0], [8000, 65.5]]
    with pytest.raises(SystemExit):
        curve.main(["--family", "retinanet", "--teacher", "--candidate", "x", "A", "1"])


class _FakeDetector:
    """The two things head_swap.py reads of a detector: ``preprocess_image`` (-> .tensor) and a
    ``backbone`` with ``output_shape``; here the "image" is the feature map itself, mapped by a
    fixed 1x1 linear map ``weight`` (C_out, C_in) plus ``bias``."""

    def __init__(self, weight, bias, stride=8):
        import torch
        from detectron2.layers import ShapeSpec

        class _Backbone(torch.nn.Module):
            def output_shape(self):
                return {"p3": ShapeSpec(channels=weight.shape[0], stride=stride)}

            def forward(self, x):
                return {"p3": torch.einsum("oc,nchw->nohw", weight, x) + bias[None, :, None, None]}

        self.backbone = _Backbone()

    def preprocess_image(self, chunk):
        import torch

        return type("ImageList", (), {"tensor": torch.stack([x["image"] for x in chunk])})


def test_head_swap_fits_a_linear_map_exactly_and_scores_r2_by_hand():
    """Teacher features an exact affine map of the student's: the least-squares 1x1 conv recovers
    it and explains all of their variance, over all locations and inside the boxes; a map that
    predicts zero scores 1 - sum t^2 / sum (t - mean)^2 (hand-computed)."""
    import torch
    from detectron2.structures import Boxes, Instances

    swap = _benchmark_script("head_swap")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g)
    b = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    student = _FakeDetector(torch.eye(3), torch.zeros(3))
    teacher = _FakeDetector(a, b)
    images = []
    for _ in range(4):
        inst = Instances((16, 16))
        inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 9.0, 9.0]]))  # the centre (4, 4) only
        images.append({"image": torch.randn(3, 2, 2, generator=g), "instances": inst})
    maps = swap.fit_maps(student, teacher, images, ridge=0.0)
    assert torch.allclose(maps["p3"].weight[:, :, 0, 0], a, atol=1e-4)
    assert torch.allclose(maps["p3"].bias, b, atol=1e-4)
    r2_all, r2_fg = swap.explained_variance(maps, student, teacher, images)["p3"]
    assert r2_all == pytest.approx(1.0, abs=1e-6) and r2_fg == pytest.approx(1.0, abs=1e-6)
    # the fg mask: one location of four per image (centre (4, 4) at stride 8 lies in the box)
    chunk = next(swap.level_features(student, teacher, images))
    assert chunk["p3"][2].tolist() == [True, False, False, False] * 4

    zero = {"p3": torch.nn.Conv2d(3, 5, 1)}
    torch.nn.init.zeros_(zero["p3"].weight)
    torch.nn.init.zeros_(zero["p3"].bias)
    t = chunk["p3"][1]
    expect_all = 1 - float((t**2).sum()) / float(((t - t.mean(0)) ** 2).sum())
    fg = t[chunk["p3"][2]]
    expect_fg = 1 - float((fg**2).sum()) / float(((fg - fg.mean(0)) ** 2).sum())
    got_all, got_fg = swap.explained_variance(zero, student, teacher, images)["p3"]
    assert got_all == pytest.approx(expect_all, rel=1e-6)
    assert got_fg == pytest.approx(expect_fg, rel=1e-6)


def test_plateau_curve_reads_the_benchmarks_finished_s_run_whatever_its_overrides(
    tmp_path, monkeypatch
):
    """The S run is run_benchmark's none s0 run; finished, --reuse reads it even when that
    invocation had other overrides (a TID.LOSS_WEIGHT) and trains only what is missing."""
    import tid_d2.data

    monkeypatch.setattr(tid_d2.data, "ensure_generated", lambda name: None)
    curve = _benchmark_script("plateau_curve")
    trained = []
    monkeypatch.setattr(curve, "_train", lambda args, run, threads: trained.append(run[0]))
    bench, out = tmp_path / "bench", tmp_path / "curve"
    _fake_run(str(bench / "retinanet_teacher"), 4000, [(4000, 62.0)])
    _fake_run(str(bench / "retinanet_none_s0"), 6000, [(6000, 58.5)])
    argv = ["--family", "retinanet", "--reuse", "--parallel", "1", "--seed-std", "0.5"]
    argv += ["--bench-output", str(bench), "--output", str(out), "--results", str(tmp_path)]
    assert curve.main(argv) == 0
    assert trained == ["2 S = 12000"]


def test_head_swap_projects_teacher_features_onto_the_adapters_image_by_hand():
    """An adapter whose columns span the first two of five teacher channels (bias b): the nearest
    adapter output to t keeps t's first two channels and sets the other three to b's; its R^2 is
    1 - sum (t[:, 2:] - b[2:])^2 / sum (t - mean t)^2 (hand-computed); a teacher inside the image
    is matched exactly."""
    import torch
    from detectron2.structures import Boxes, Instances

    swap = _benchmark_script("head_swap")
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(2, 5, 1)
    a = torch.zeros(5, 2)
    a[0, 0], a[1, 0], a[1, 1] = 2.0, 1.0, -3.0  # spans channels 0 and 1
    conv.weight.data.copy_(a[:, :, None, None])
    b = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    conv.bias.data.copy_(b)
    adapters = type("Adapters", (), {"adapters": {"p3": conv}})
    image = swap.adapter_image_maps(adapters, ["p3"])["p3"]
    t = torch.randn(7, 5, generator=g, dtype=torch.float64)
    got = image(t.float().T.reshape(1, 5, -1, 1)).double().reshape(5, -1).T
    expect = t.clone()
    expect[:, 2:] = b[2:].double()
    assert torch.allclose(got, expect, atol=1e-5)

    images = []
    for _ in range(3):
        inst = Instances((16, 16))
        inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 9.0, 9.0]]))
        images.append({"image": torch.randn(5, 2, 2, generator=g), "instances": inst})
    teacher = _FakeDetector(torch.eye(5), torch.zeros(5))
    r2_all, _ = swap.explained_variance({"p3": image}, teacher, teacher, images)["p3"]
    feats = next(swap.level_features(teacher, teacher, images))["p3"][1]
    rss = float(((feats[:, 2:] - b[2:].double()) ** 2).sum())
    assert r2_all == pytest.approx(1 - rss / float(((feats - feats.mean(0)) ** 2).sum()), rel=1e-5)
    inside = _FakeDetector(a, b)  # teacher = A s + b: inside the adapter's image
    two = [
        {"image": torch.randn(2, 2, 2, generator=g), "instances": x["instances"]} for x in images
    ]
    r2_in, _ = swap.explained_variance({"p3": image}, inside, inside, two)["p3"]
    assert r2_in == pytest.approx(1.0, abs=1e-5)
