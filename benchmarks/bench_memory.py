"""Peak memory of the loss computation (forward + backward from hidden states) on a synthetic
large-vocabulary head, V = 248,320 (Qwen3.5's), d = 2,560: the model's own CE path (full float32
logits) vs hf_mrp's fused chunked CE + Fisher, for growing numbers of positions. Each point runs
in a fresh process; the figure is its peak RSS growth beyond the set-up (h, W, targets).

    python benchmarks/bench_memory.py                       # writes docs/performance_memory.png
    python benchmarks/bench_memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(path: str, positions: int, vocab: int, dim: int, chunk: int) -> float:
    """Run one loss forward + backward; return peak RSS growth in MB."""
    import torch
    import torch.nn.functional as F

    from hf_mrp.ops import MRPSettings, mrp_loss_sums

    torch.manual_seed(0)
    hidden = torch.randn(positions, dim).requires_grad_()
    weight = torch.empty(vocab, dim).normal_(0, 0.02)
    targets = torch.randint(0, vocab, (positions,))
    torch.mm(hidden[:1].detach(), weight[:1].T)  # warm the BLAS threads
    base = current_rss_mb()
    if path == "ce":
        logits = hidden @ weight.T  # the model's lm_head output, then its ForCausalLMLoss (upcast + CE)
        F.cross_entropy(logits.float(), targets).backward()
    else:
        sums = mrp_loss_sums(
            hidden, weight, targets, MRPSettings(objective="fisher", lam=0.6, chunk_size=chunk, normalization="valid")
        )
        (sums.total / positions).backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--point", nargs=5, metavar=("PATH", "N", "V", "D", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "performance_memory.png"))
    args = parser.parse_args()
    if args.point:
        path, *numbers = args.point
        print(measure(path, *map(int, numbers)))
        return
    vocab, dim, chunk = (5000, 64, 128) if args.smoke else (248320, 2560, 1024)
    ce_points = [256, 512] if args.smoke else [512, 1024, 2048]
    fused_points = [256, 512, 1024] if args.smoke else [512, 1024, 2048, 4096, 8192]
    results = {"vocab": vocab, "dim": dim, "chunk": chunk, "ce": {}, "fused": {}}
    for path, points in (("ce", ce_points), ("fused", fused_points)):
        for n in points:
            out = subprocess.run(
                [sys.executable, __file__, "--point", path, str(n), str(vocab), str(dim), str(chunk)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[path][n] = float(out.stdout.strip().splitlines()[-1])
            print(f"{path:6s} positions {n:6d}: peak +{results[path][n]:9.1f} MB", flush=True)
    # the CE path grows linearly (logits, their log-softmax and gradient): extrapolate to 4 x 2048
    xs = sorted(results["ce"])
    slope = (results["ce"][xs[-1]] - results["ce"][xs[0]]) / (xs[-1] - xs[0])
    target = 8192 if not args.smoke else fused_points[-1]
    ce_at_target = results["ce"][xs[-1]] + slope * (target - xs[-1])
    fused_at_target = results["fused"][max(results["fused"])]
    print(
        f"\nat {target} positions: model's own CE path ~{ce_at_target:,.0f} MB (linear extrapolation, "
        f"{slope:.2f} MB/position), fused {fused_at_target:,.0f} MB: {fused_at_target / ce_at_target:.3f}x"
    )
    print(json.dumps(results))
    if not args.smoke:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [results["ce"][x] for x in xs], "o-", label="model's own CE (full logits)")
        ax.plot(
            [xs[-1], target],
            [results["ce"][xs[-1]], ce_at_target],
            "o:",
            color="C0",
            alpha=0.5,
            label="CE, extrapolated (does not fit in 24 GB)",
        )
        fx = sorted(results["fused"])
        ax.plot(fx, [results["fused"][x] for x in fx], "s-", label="hf_mrp fused CE + Fisher")
        ax.set_xlabel("positions")
        ax.set_ylabel("peak memory growth (MB)")
        ax.set_title(f"Loss fwd+bwd memory, V={vocab:,}, d={dim:,} (CPU)")
        ax.legend(fontsize=8)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
