"""The float32 audit vs a plain forward pass (logits) over the same tokens.

python benchmarks/bench_audit.py           # embedded SmolLM2, 8 blocks x 512 tokens
python benchmarks/bench_audit.py --smoke
python benchmarks/bench_audit.py --manifold --output_dir outputs/manifold_audit
    # the whole audit with --layers all, with and without the manifold statistics (issue 28: under 2x), on the
    # embedded corpus, once each (minutes on a CPU); the manifold audit's folder is kept in --output_dir
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from common import interleaved_medians, machine, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--manifold", action="store_true")
    parser.add_argument("--max_positions", type=int, default=8 * 511)
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args()
    if args.manifold:
        manifold_bench(args)
        return
    from hf_mrp.audit import collect_statistics
    from hf_mrp.data import Blocks
    from hf_mrp.models import load_model_and_tokenizer

    if args.smoke:
        from helpers import tiny_llama

        model, shape = tiny_llama(), (4, 32)
    else:
        model, _, _ = load_model_and_tokenizer()
        shape = (8, 512)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=shape)
    blocks = Blocks(ids, shape[0] * (shape[1] - 1), "random")
    tensor = torch.as_tensor(ids)

    @torch.no_grad()
    def forward():
        model(input_ids=tensor, use_cache=False)

    def audit():
        collect_statistics(model, blocks, batch_size=shape[0], progress=False)

    print(f"machine: {machine()}\n{shape[0]} x {shape[1]} tokens, vocab {model.config.vocab_size}")
    report(
        f"median of {args.repeats}, interleaved",
        interleaved_medians({"plain forward (logits)": forward, "float32 audit": audit}, args.repeats),
        "plain forward (logits)",
    )


def manifold_bench(args) -> None:
    """`run_audit(layers="all")` against the same audit with ``manifold=True`` (4,096 sampled positions at most),
    on the embedded corpus: each once, the plain one first (the manifold only adds work after the same pass)."""
    import time

    from hf_mrp.audit import run_audit
    from hf_mrp.data import load_blocks
    from hf_mrp.models import load_model_and_tokenizer

    if args.smoke:
        from transformers import AutoTokenizer

        from hf_mrp.models import embedded_model_dir

        from helpers import tiny_llama

        model, tokenizer = tiny_llama(vocab=49152), AutoTokenizer.from_pretrained(embedded_model_dir())
    else:
        model, tokenizer, _ = load_model_and_tokenizer()
    blocks = load_blocks(tokenizer, max_positions=args.max_positions, block_size=64 if args.smoke else 512)
    print(f"machine: {machine()}\n{blocks.n_positions} positions of {blocks.source}, every layer")
    seconds, cpu = {}, {}
    for name, manifold in (("audit --layers all", False), ("audit --layers all --manifold", True)):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = args.output_dir if manifold else None
        result = run_audit(model, blocks, layers="all", manifold=manifold, output_dir=out, progress=False)
        seconds[name], cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
    report("one run each", seconds, "audit --layers all")
    # CPU time of this process: on a machine shared with other jobs it moves less than the wall time
    report("CPU time of the same runs", cpu, "audit --layers all")
    entry = (result.summary.layers or {}).get("manifold", {})
    print(f"manifold sample: {entry.get('sampled_positions')} of {entry.get('audited_positions')} positions")


if __name__ == "__main__":
    main()
