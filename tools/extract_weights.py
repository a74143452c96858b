#!/usr/bin/env python
"""Keep part of a detectron2 checkpoint, e.g. a trained teacher's detection head, to start another
model from it with ``MODEL.WEIGHTS`` (detectron2 loads the keys it finds and logs the others as
missing, so the rest of the model keeps its own initialisation).

    python tools/extract_weights.py --weights output/sweep/teacher/model_final.pth \\
        --keep head. --output output/sweep/teacher_head.pth
"""

import argparse
import os
import sys

import torch


def extract(weights: str, prefixes, output: str) -> int:
    """Write ``{"model": the tensors of weights["model"] whose keys start with a prefix}`` to
    ``output``; returns how many were kept. Raises ValueError when none matches."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no checkpoint at {weights}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = state.get("model", state)
    kept = {k: v for k, v in model.items() if k.startswith(tuple(prefixes))}
    if not kept:
        roots = sorted({k.split(".")[0] + "." for k in model})
        raise ValueError(f"no key of {weights} starts with {list(prefixes)}; its roots: {roots}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save({"model": kept}, output)
    return len(kept)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", required=True, help="a detectron2 .pth checkpoint")
    p.add_argument("--keep", nargs="+", required=True, help="key prefixes to keep, e.g. head.")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    n = extract(args.weights, args.keep, args.output)
    print(f"kept {n} tensors of {args.weights} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
