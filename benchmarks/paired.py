#!/usr/bin/env python
"""Each variant minus the student alone, paired by seed, pooled over several runs files.

A ``run_benchmark.py`` record only merges runs of one cached teacher on one kind of CPU (float
results differ between kernel sets, so a teacher retrained on another kind is another teacher).
A paired difference, though, compares two runs of the *same* record: same teacher, same kind,
same seed and data order. This script takes the pairs from each file on its own and pools them,
so seeds trained on different machine kinds still give one paired mean per variant:

    python benchmarks/paired.py benchmarks/results/gfl_ablations_s0_runs.json \
        benchmarks/results/gfl_ablations_avx2_runs.json --name gfl_ablations_pooled

A variant is its name plus the overrides it was trained with (``fgd TID.FGD.LOSS_WEIGHT 0.005``
and ``fgd`` at its config's weights are two rows, never one): the record's ``opts``, or for
records made before runs carried them, the overrides in the command of the invocation that
trained it (a ``--merge``d record's own file, looked up beside the file that holds it), less the
keys of other methods, which the run never read. A run that appears in several files (the same
teacher AP, CPU kernel set, variant, overrides and seed, as ``--merge`` copies do) counts once.
Per variant: the pairs, their mean ± sample std, t = mean / (std / sqrt(n)), how many pairs are
above zero, for test AP and for val AP, and each pair with the kind it was trained on. Nothing is
trained or evaluated.
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run_benchmark import VARIANTS, build_parser  # noqa: E402  (this script's own folder)
from tid_d2.modeling.distiller import inert_key_groups  # noqa: E402
from tid_d2.runs import fmt_mean_std, format_table  # noqa: E402

Pair = Tuple[str, int, float, float]  # (kind, seed, test AP difference, val AP difference)


def kind_of(data: Dict) -> str:
    """The machine kind a runs file was trained on, e.g. "AMD EPYC (AVX2)"."""
    m = data.get("machine") or {}
    cpu = m.get("cpu", "unknown CPU")
    cap = m.get("cpu_capability")
    return f"{cpu} ({cap})" if cap else cpu


def trained_opts(run: Dict, data: Dict, folder: Optional[str], depth: int = 0) -> List[str]:
    """The KEY VALUE overrides ``run`` (a record of the runs file ``data``, which lies in
    ``folder``) was trained with: its ``opts``; for an older record, the command's overrides of
    the invocation that trained it (a merged record's own file, when it is in ``folder``)."""
    if "opts" in run:
        return list(run["opts"])
    source = run.get("merged_from")
    if source and folder and depth < 8 and os.path.isfile(os.path.join(folder, source)):
        with open(os.path.join(folder, source)) as f:
            origin = json.load(f)
        for r in origin["runs"]:
            if (r["mode"], r["seed"]) == (run["mode"], run["seed"]):
                return trained_opts(r, origin, folder, depth + 1)
    if not data.get("command"):
        return []
    return build_parser().parse_args(shlex.split(data["command"])[1:]).opts


def variant_label(run: Dict, opts: Sequence[str]) -> str:
    """``mode`` plus the overrides it reads, e.g. "fgd TID.FGD.LOSS_WEIGHT 0.005"; the variant's
    own options beyond TID.MODE (``variant_opts``) come first."""
    vopts = run.get("variant_opts") or ["TID.MODE", run["mode"]]
    inert = inert_key_groups(vopts[1])
    pairs = list(zip(vopts[2::2], vopts[3::2])) + list(zip(opts[::2], opts[1::2]))
    kept = [f"{k} {v}" for k, v in pairs if not any(k.startswith(g + ".") for g in inert)]
    return " ".join([run["mode"], *kept])


def pooled_pairs(
    files: Sequence[Dict], folders: Optional[Sequence[Optional[str]]] = None
) -> Dict[str, List[Pair]]:
    """variant label -> [(kind, seed, AP - alone, val AP - alone)], each pair taken inside one
    file (the student alone of the same seed in that file), a run found in several files once;
    ``folders[i]``: where ``files[i]`` lies (to read the records merged into it)."""
    seen = set()
    out: Dict[str, List[Pair]] = {}
    for data, folder in zip(files, folders or [None] * len(files)):
        kind = kind_of(data)
        teacher = round(float(data["teacher_AP"]), 4)
        runs = data["runs"]
        alone = {r["seed"]: r for r in runs if r["mode"] == "none"}
        for r in runs:
            if r["mode"] == "none" or r["seed"] not in alone:
                continue
            label = variant_label(r, trained_opts(r, data, folder))
            key = (teacher, kind, label, r["seed"])
            if key in seen:
                continue
            seen.add(key)
            base = alone[r["seed"]]
            out.setdefault(label, []).append(
                (kind, r["seed"], r["AP"] - base["AP"], r["val_AP"] - base["val_AP"])
            )
    return out


def mixed_runs(files: Sequence[Dict]) -> Optional[str]:
    """What makes ``files`` unpoolable, or None: runs of several families, or of several
    schedules (``iterations``; a 12000-iteration pair is not another seed of a 6000-iteration
    one, and would otherwise count once with it as a duplicate)."""
    for key, one, several in (
        ("family", "family", "families"),
        ("iterations", "schedule", "schedules (iterations)"),
    ):
        values = {r[key] for data in files for r in data["runs"] if key in r}
        if len(values) > 1:
            return f"the files hold runs of several {several} ({sorted(values)}); pool one {one}"
    return None


def describe(diffs: Sequence[float]) -> Dict[str, str]:
    """mean ± std, t and the count above zero of paired differences."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    std = statistics.stdev(diffs) if n > 1 else None
    t = "-" if not std else f"{mean / (std / math.sqrt(n)):+.2f}"
    return {
        "mean ± std": fmt_mean_std(mean, std, signed=True),
        "t": t,
        "above": f"{sum(d > 0 for d in diffs)}/{n}",
    }


def pooled_table(pairs: Dict[str, List[Pair]]) -> str:
    """Markdown: one row per variant (benchmark order), test and val paired differences."""
    rows = []
    order = {v: i for i, v in enumerate(VARIANTS)}
    for label in sorted(pairs, key=lambda lb: (order.get(lb.split()[0], len(order)), lb)):
        ps = pairs[label]
        test, val = describe([p[2] for p in ps]), describe([p[3] for p in ps])
        rows.append(
            {
                "variant": label,
                "pairs": len(ps),
                "test AP - alone": test["mean ± std"],
                "t (test)": test["t"],
                "above (test)": test["above"],
                "val AP - alone": val["mean ± std"],
                "t (val)": val["t"],
                "above (val)": val["above"],
                "per pair, test / val (kind, seed)": "; ".join(
                    f"{d:+.2f} / {v:+.2f} ({kind}, s{seed})" for kind, seed, d, v in ps
                ),
            }
        )
    cols = [
        "variant",
        "pairs",
        "test AP - alone",
        "t (test)",
        "above (test)",
        "val AP - alone",
        "t (val)",
        "above (val)",
        "per pair, test / val (kind, seed)",
    ]
    return format_table(rows, cols)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", metavar="RUNS_JSON")
    p.add_argument("--name", help="also write benchmarks/results/<name>.md (with this command)")
    p.add_argument("--results", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    files = []
    for path in args.files:
        try:
            with open(path) as f:
                files.append(json.load(f))
        except (OSError, ValueError) as e:
            p.error(f"{path}: {e}")
    mixed = mixed_runs(files)
    if mixed:
        p.error(mixed)
    folders = [os.path.dirname(os.path.abspath(path)) for path in args.files]
    text = pooled_table(pooled_pairs(files, folders))
    print(text)
    if args.name:
        cmd = "python benchmarks/paired.py " + " ".join(args.files) + f" --name {args.name}"
        kinds = ", ".join(sorted({kind_of(d) for d in files}))
        head = (
            f"# Paired differences to the student alone, pooled ({args.name})\n\n"
            f"Command: `{cmd}`\n\nFiles: "
            + ", ".join(f"`{os.path.basename(f)}`" for f in args.files)
            + f"; machine kinds: {kinds}. Each pair is a variant and the student alone of the "
            "same seed inside one file (same teacher, same kind); a run found in several files "
            "counts once.\n\n"
        )
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, f"{args.name}.md"), "w") as f:
            f.write(head + text + "\n")
    return text


if __name__ == "__main__":
    main()
