"""One training step (forward + backward) of the embedded SmolLM2 with LoRA on layers 20-29:
the model's own cross-entropy vs MRPTrainer's loss with each objective, interleaved in one process.

    python benchmarks/bench_train_step.py            # batch 4 x 512 (the issue's setting)
    python benchmarks/bench_train_step.py --smoke    # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import interleaved_medians, machine, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(smoke: bool):
    from hf_mrp.models import load_model_and_tokenizer

    if smoke:
        from helpers import tiny_llama

        return tiny_llama(layers=3), "1-2", (2, 32)
    model, _, _ = load_model_and_tokenizer()
    return model, "20-29", (4, 512)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from hf_mrp.training import MRPConfig, MRPTrainer

    model, layers, (batch, length) = build(args.smoke)
    config = MRPConfig(
        output_dir="/tmp/hf_mrp_bench", report_to="none", use_cpu=True, lora_layers=layers, disable_tqdm=True
    )
    trainer = MRPTrainer(model=model, args=config)
    peft_model = trainer.model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}

    def own_ce():
        peft_model(**inputs, use_cache=False).loss.backward()
        peft_model.zero_grad(set_to_none=True)

    def mrp(objective: str):
        def run():
            trainer.args.mrp_objective = objective
            trainer.compute_loss(peft_model, inputs).backward()
            peft_model.zero_grad(set_to_none=True)

        return run

    cases = {"model's own CE": own_ce, **{f"MRP {o} (lambda 0.6)": mrp(o) for o in ("fisher", "margin", "entropy")}}
    print(f"machine: {machine()}\ntraining step fwd+bwd, LoRA r=16 on layers {layers}, batch {batch} x {length}")
    report(f"median of {args.repeats}, interleaved", interleaved_medians(cases, args.repeats), "model's own CE")


if __name__ == "__main__":
    main()
