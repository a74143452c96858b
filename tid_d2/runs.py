"""Running ``train_net.py`` as a subprocess and reading its results: shared by the demo and the
benchmark, so every variant is trained and evaluated through the same command a user runs."""

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import yaml

from .modeling.distiller import TID_MODES, inert_key_groups

__all__ = [
    "REPO_ROOT",
    "repo_relative",
    "BENCHMARK_MODES",
    "BENCHMARK_FAMILIES",
    "train_net",
    "train_or_reuse",
    "reuse_state",
    "RESULT_NEUTRAL_KEYS",
    "read_metrics",
    "final_ap",
    "ap_curve",
    "format_table",
    "run_child",
    "peak_memory_mb",
    "write_results",
    "cached_teacher",
    "mark_teacher",
]

# The distiller's variants in the order the benchmarks run and tabulate them: the student alone
# first, TID last.
BENCHMARK_MODES = ["none", *(m for m in TID_MODES if m not in ("none", "tid")), "tid"]
# Detector families of the benchmarks, by config stem (configs/shapes/tid_<family>.yaml and
# <family>_mnv2_teacher.yaml).
BENCHMARK_FAMILIES = ["retinanet", "fcos", "rcnn", "atss", "gfl"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (as reports name run folders),
    else unchanged."""
    full = os.path.abspath(path)
    if os.path.commonpath([full, REPO_ROOT]) == REPO_ROOT:
        return os.path.relpath(full, REPO_ROOT)
    return path


AP_FIELDS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_PROGRESS = re.compile(r"eta: (\S+)\s+iter: (\d+)\s+total_loss: (\S+)")


def train_net(
    config_file: str,
    output_dir: str,
    opts: Sequence[str] = (),
    eval_only: bool = False,
    label: str = "",
    quiet: bool = False,
    resume: bool = False,
    threads: Optional[int] = None,
) -> float:
    """Run ``train_net.py`` in a subprocess; its full log goes to ``output_dir/train_net.log``,
    and one progress line per logging period (iteration, total loss, ETA) to stdout.

    ``threads`` sets the subprocess's ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (PyTorch's intra-op
    threads), so runs started side by side share the cores instead of oversubscribing them;
    None keeps the caller's environment.

    ``resume`` continues from ``output_dir/last_checkpoint`` (``--resume``). A fresh training run
    in a folder that holds an earlier run's ``metrics.json`` first renames that file to
    ``metrics.json.<time>.bak``: detectron2 appends to it, and the results readers would otherwise
    mix both runs' evaluations.

    Returns:
        wall-clock seconds. Raises ``RuntimeError`` with the log's tail if the run fails.
    """
    os.makedirs(output_dir, exist_ok=True)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file", config_file]
    if eval_only:
        cmd.append("--eval-only")
    if resume:
        cmd.append("--resume")
    cmd += ["OUTPUT_DIR", output_dir, *opts]
    metrics = os.path.join(output_dir, "metrics.json")
    if not (eval_only or resume) and os.path.isfile(metrics):
        os.replace(metrics, f"{metrics}.{int(time.time())}.bak")
    log_path = os.path.join(output_dir, "train_net.log")
    start = time.time()
    tail: List[str] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "w", buffering=1) as log:  # line-buffered: `tail -f` shows progress
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-40:]
            m = _PROGRESS.search(line)
            if m and not quiet:
                print(
                    f"  [{label}] iter {int(m.group(2)) + 1}  loss {m.group(3)}  eta {m.group(1)}",
                    flush=True,
                )
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(
            f"train_net.py failed ({proc.returncode}) for {label or config_file}; log: {log_path}\n"
            + "".join(tail[-25:])
        )
    return time.time() - start


def train_or_reuse(
    config_file: str,
    output_dir: str,
    opts: Sequence[str],
    dataset: str,
    iters: int,
    reuse: bool,
    label: str = "",
    quiet: bool = False,
    threads: Optional[int] = None,
) -> tuple:
    """One benchmark run: with ``reuse``, a finished run in ``output_dir`` (the same settings,
    see :func:`reuse_state`, evaluated on ``dataset`` at ``iters``) is taken as it is and a stopped
    one resumed; otherwise it is trained by :func:`train_net`.

    Returns:
        (state before: "finished" | "resumable" | "new", wall seconds or None when reused).
    """
    state = reuse_state(output_dir, config_file, opts, dataset, iters=iters) if reuse else "new"
    if state == "finished":
        return state, None
    secs = train_net(
        config_file,
        output_dir,
        opts,
        label=label,
        quiet=quiet,
        resume=state == "resumable",
        threads=threads,
    )
    return state, secs


_TEACHER_DATA = "tid_shapes_spec.txt"


def threads_per_run(runs_at_once: int) -> Optional[int]:
    """Intra-op threads for each of ``runs_at_once`` runs sharing this machine's cores (at least
    one); None for a run alone, which keeps the caller's environment (every core)."""
    return max(1, (os.cpu_count() or 2) // runs_at_once) if runs_at_once > 1 else None


def command_line(script: str) -> str:
    """This process's command as one shell-quoted line to paste back: ``python <script> <args>``."""
    return "python " + shlex.join([script, *sys.argv[1:]])


def machine_info() -> Dict[str, str]:
    """What the numbers of a run depend on beyond code, data and seed: the CPU model, its
    family / model / stepping and cache size (``cpu_id``: two machines of one kernel set can still
    disagree, e.g. the FCOS plateau teacher trained twice on AVX2 AMD EPYC machines, test AP 72.08
    and 71.71, cause not isolated), the kernel set PyTorch dispatches to (float results differ
    between, e.g., AVX2 and AVX-512 kernels), and the torch version. Recorded with benchmark
    results."""
    import platform

    import torch

    cpu, fields = platform.processor() or platform.machine(), {}
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if not ln.strip():
                    break  # the first processor's block describes the model
                key, _, value = ln.partition(":")
                fields[key.strip()] = value.strip()
        cpu = fields.get("model name", cpu)
    cpu_id = ", ".join(
        f"{name} {fields[key]}"
        for name, key in [
            ("family", "cpu family"),
            ("model", "model"),
            ("stepping", "stepping"),
            ("cache", "cache size"),
        ]
        if key in fields
    )
    return {
        "cpu": cpu,
        "cpu_id": cpu_id or "unknown",
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def code_version() -> Optional[str]:
    """The repository's commit (``git describe --always --dirty``: a ``-dirty`` suffix when
    tracked files were changed), or None outside a git checkout. Recorded with benchmark results:
    a record must be read against the code that trained it (e.g. Faster R-CNN runs evaluated
    periodically before commit 7b0ee3e trained on other RPN/ROI samples than today's)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _data_key() -> str:
    from tid_d2.data import ShapesSpec

    return ShapesSpec.from_env().name


def cached_teacher(teacher_dir: str, iters: int) -> Optional[str]:
    """``teacher_dir/model_final.pth`` if it was trained on the current ``tid_shapes`` data for
    ``iters`` iterations (see :func:`mark_teacher`); ``None`` (with a message) otherwise, so that
    a teacher trained on other data (another difficulty, seed or size) is never reused silently."""
    weights = os.path.join(teacher_dir, "model_final.pth")
    if not os.path.isfile(weights):
        return None
    want = f"{_data_key()} iters={iters}"
    marker = os.path.join(teacher_dir, _TEACHER_DATA)
    have = open(marker).read().strip() if os.path.isfile(marker) else "(no record)"
    if have != want:
        print(f"[tid-d2] cached teacher {weights} was trained on {have}, not {want}: retraining")
        return None
    return weights


def mark_teacher(teacher_dir: str, iters: int) -> None:
    """Record which data and schedule the teacher in ``teacher_dir`` was trained on."""
    with open(os.path.join(teacher_dir, _TEACHER_DATA), "w") as f:
        f.write(f"{_data_key()} iters={iters}\n")


def read_metrics(output_dir: str) -> List[Dict]:
    """All records of ``output_dir/metrics.json`` (detectron2's JSONWriter, one JSON per line)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _ap_key(record: Dict, dataset: Optional[str], field: str) -> Optional[float]:
    for key in ([f"{dataset}/bbox/{field}"] if dataset else []) + [f"bbox/{field}"]:
        if key in record:
            return record[key]
    return None


def final_ap(output_dir: str, dataset: Optional[str] = None) -> Dict[str, float]:
    """The last bbox AP fields written to metrics.json (the evaluation at the end of training)."""
    for record in reversed(read_metrics(output_dir)):
        if _ap_key(record, dataset, "AP") is not None:
            return {f: _ap_key(record, dataset, f) for f in AP_FIELDS}
    raise RuntimeError(f"no bbox AP for {dataset or 'the test set'} in {output_dir}/metrics.json")


def has_final_ap(
    output_dir: str, dataset: Optional[str] = None, iters: Optional[int] = None
) -> bool:
    """Whether ``output_dir`` holds a finished run: an evaluation with bbox AP in metrics.json at
    the run's last iteration (``SOLVER.MAX_ITER`` of its ``config.yaml``), so that a run stopped
    after a periodic evaluation is not taken for a finished one; with ``iters``, only a run of
    that schedule counts (a 1000-iteration run is not reused for a 3000-iteration request)."""
    max_iter = _configured_max_iter(output_dir)
    if iters is not None and max_iter != iters:
        return False
    trained = [it for it, _ in ap_curve(output_dir, dataset)]
    return bool(trained) and (max_iter is None or max(trained) >= max_iter)


# config keys that change how fast a run computes, not what: a run saved with another value is
# still the same run for --reuse (the teacher cache returns the teacher's own outputs)
RESULT_NEUTRAL_KEYS = ("TID.TEACHER.CACHE_MB",)


def reuse_state(
    output_dir: str,
    config_file: str,
    opts: Sequence[str],
    dataset: Optional[str] = None,
    iters: Optional[int] = None,
) -> str:
    """What ``--reuse`` may do with ``output_dir`` for the run ``train_net.py --config-file
    config_file opts``: "finished" (its final evaluation is there), "resumable" (stopped, with a
    checkpoint to continue from) or "new" (no run there, or one that died before its first
    checkpoint: train afresh).

    The run's saved ``config.yaml`` must equal what ``config_file`` + ``opts`` give now (OUTPUT_DIR
    and :data:`RESULT_NEUTRAL_KEYS` aside, and the hyperparameters of methods other than the run's
    ``TID.MODE``; files compared by their real absolute path), so a folder trained with another loss
    weight, schedule or config file is never taken for this run, however the folder is named.
    Nor is it trained over: a folder holding a finished or checkpointed run with other settings
    raises a RuntimeError naming the keys that differ, and loses nothing.
    """
    saved = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(saved):
        return "new"
    from .config import get_cfg

    want = get_cfg()
    want.merge_from_file(config_file)
    want.merge_from_list(list(opts))
    want = yaml.safe_load(want.dump())
    with open(saved) as f:
        have = yaml.safe_load(f) or {}
    # a key added to the project after that run was saved had its default then (new keys default
    # to the old behaviour)
    _fill_missing(have, yaml.safe_load(get_cfg().dump()))
    # another method's hyperparameters (TID.FGD.* in a pkd or none run, ...) are inert in this
    # run's mode: passing them to every run of an invocation does not make a finished run another
    mode = want.get("TID", {}).get("MODE")
    inert = inert_key_groups(mode) if mode == have.get("TID", {}).get("MODE") else ()
    for cfg in (want, have):
        cfg.pop("OUTPUT_DIR", None)
        for dotted in (*RESULT_NEUTRAL_KEYS, *inert):
            *parents, last = dotted.split(".")
            node = cfg
            for name in parents:
                node = node.get(name) or {}
            node.pop(last, None)
        _absolute_paths(cfg)
    differ = _differing_keys(want, have)
    if iters is not None and _configured_max_iter(output_dir) != iters:
        differ = sorted(set(differ) | {"SOLVER.MAX_ITER"})
    finished = has_final_ap(output_dir, dataset)
    checkpointed = os.path.isfile(os.path.join(output_dir, "last_checkpoint"))
    if differ and (finished or checkpointed):
        raise RuntimeError(
            f"{output_dir} holds a {'finished' if finished else 'checkpointed'} run with other "
            f"settings ({', '.join(differ)} differ from this request), so --reuse will not train "
            "over it: delete that folder, or give this run another output folder."
        )
    if differ or not (finished or checkpointed):
        return "new"
    return "finished" if finished else "resumable"


def _differing_keys(a: dict, b: dict, prefix: str = "") -> List[str]:
    """Dotted names of the config keys whose values differ between ``a`` and ``b``."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differing_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _fill_missing(have: dict, defaults: dict) -> None:
    """Add to ``have`` (in place, recursively) every key of ``defaults`` it lacks."""
    for key, value in defaults.items():
        if key not in have:
            have[key] = value
        elif isinstance(value, dict) and isinstance(have[key], dict):
            _fill_missing(have[key], value)


# files a run reads, which a command may name relative to train_net.py's working directory
_PATH_KEYS = (
    ("MODEL", "WEIGHTS"),
    ("TID", "TEACHER", "WEIGHTS"),
    ("TID", "TEACHER", "CONFIG_FILE"),
)


def _absolute_paths(cfg: dict) -> None:
    """Spell the files in ``_PATH_KEYS`` as real absolute paths (``train_net`` runs in
    REPO_ROOT), so ``output/x.pth``, ``<repo>/output/x.pth`` and a path through a symlink to it
    count as the same setting."""
    for keys in _PATH_KEYS:
        node = cfg
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and "://" not in value:
            node[keys[-1]] = os.path.realpath(os.path.join(REPO_ROOT, value))


def _configured_max_iter(output_dir: str) -> Optional[int]:
    """``SOLVER.MAX_ITER`` of the config detectron2 saved in ``output_dir`` (None without one)."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        max_iter = (yaml.safe_load(f) or {}).get("SOLVER", {}).get("MAX_ITER")
    return int(max_iter) if max_iter is not None else None


def ap_curve(output_dir: str, dataset: Optional[str] = None) -> List[tuple]:
    """[(iterations trained, AP)] of every evaluation in metrics.json. A periodic evaluation is
    logged at the step's index (999 after 1000 iterations), the one after training at MAX_ITER
    itself: both count as MAX_ITER iterations trained, not MAX_ITER + 1."""
    max_iter = _configured_max_iter(output_dir)
    out = []
    for record in read_metrics(output_dir):
        ap = _ap_key(record, dataset, "AP")
        if ap is not None:
            trained = record.get("iteration", 0) + 1
            out.append((min(trained, max_iter) if max_iter else trained, ap))
    return out


def mean_std(values) -> tuple:
    """(mean, sample standard deviation) of ``values``; the std is None for a single value."""
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean_std(mean: float, std: Optional[float], signed: bool = False) -> str:
    """ "m ± s" with two decimals ("m" alone when std is None); ``signed`` prints "+m"."""
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return m if std is None else f"{m} ± {std:.2f}"


def format_table(rows: List[Dict], columns: Sequence[str], floatfmt: str = "{:.2f}") -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns."""

    def cell(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def run_child(cmd: Sequence[str], what: str) -> Dict:
    """Run a measurement subprocess (one fresh process per measurement, so peak memory is its
    own) and return the JSON object on the last line of its stdout."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"measurement of {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(results_dir: str, stem: str, markdown: str, data) -> None:
    """``<stem>.md`` and ``<stem>.json`` under ``results_dir``; the Markdown is also printed."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{stem}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(results_dir, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=1)
    print(markdown)


def peak_memory_mb(device) -> float:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak
    resident set (``ru_maxrss``, which includes the framework's own footprint)."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
