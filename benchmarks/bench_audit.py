"""The float32 audit vs a plain forward pass (logits) over the same tokens.

python benchmarks/bench_audit.py           # embedded SmolLM2, 8 blocks x 512 tokens
python benchmarks/bench_audit.py --smoke
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
