"""A/B of the fused loss of several hf_mrp versions in one process, interleaved, each beside the chunked two-matmul
floor of the same run (how issue 27's regression was bisected on a shared machine: ratios within one process hold
where absolute times drift with the load).

Prepare each version as a package of its own name, then name them (``hf_mrp`` is the one on the path):

    git worktree add --detach /work/wt-old 75e9ac7 && cp -r /work/wt-old/hf_mrp /tmp/ab/hf_mrp_v0
    grep -rl hf_mrp /tmp/ab/hf_mrp_v0 --include=*.py | xargs sed -i 's/\\bhf_mrp\\./hf_mrp_v0./g'
    PYTHONPATH=/tmp/ab:$PWD python benchmarks/ab_versions.py --versions hf_mrp_v0,hf_mrp --objectives ce,entropy
    python benchmarks/ab_versions.py --smoke    # tiny sizes, this package only (CI)

``--pad 0.5`` marks that share of the targets -100 (a batch with padding). Versions before the settings object
(d3b25e1) take the objective as keywords; both forms are handled.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

import torch
from bench_loss import chunked_floor
from common import interleaved_medians, machine, report


def fused_case(package: str, objective: str, hidden, weight, targets):
    """One version's fused loss forward + backward (``ce``: the CE alone, lambda 0)."""
    fused = importlib.import_module(f"{package}.ops.fused")
    name, lam = ("fisher", 0.0) if objective == "ce" else (objective, 0.6)
    params = inspect.signature(fused.mrp_loss_sums).parameters
    if "settings" in params:
        settings = importlib.import_module(f"{package}.ops.settings").MRPSettings
        fixed = settings(objective=name, lam=lam, normalization="valid")

        def call():
            return fused.mrp_loss_sums(hidden, weight, targets, fixed)
    else:
        keywords = dict(objective=name, lam=lam, **({"normalization": "valid"} if "normalization" in params else {}))

        def call():
            return fused.mrp_loss_sums(hidden, weight, targets, **keywords)

    def run():
        (call().total / hidden.shape[0]).backward()
        hidden.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--versions", default="hf_mrp", help="comma-separated package names")
    parser.add_argument("--objectives", default="ce,margin,entropy")
    parser.add_argument("--positions", type=int, default=2044)
    parser.add_argument("--pad", type=float, default=0.0, help="share of targets set to -100")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, vocab, dim = (256, 1000, 64) if args.smoke else (args.positions, 49152, 576)
    torch.manual_seed(0)
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim) * 0.05
    targets = torch.randint(0, vocab, (n,))
    targets[torch.rand(n) < args.pad] = -100
    cases = {"floor": chunked_floor(hidden, weight)}
    for objective in args.objectives.split(","):
        for package in args.versions.split(","):
            cases[f"{objective}: {package}"] = fused_case(package, objective, hidden, weight, targets)
    print(f"machine: {machine()}\nN={n} ({args.pad:.0%} ignored), V={vocab}, d={dim}, W frozen")
    report(f"median of {args.repeats}, interleaved", interleaved_medians(cases, args.repeats), "floor")


if __name__ == "__main__":
    main()
