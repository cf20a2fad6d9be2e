"""Refine a causal LM's decision geometry with MRP and audit it before and after.

    python examples/refine.py                            # embedded SmolLM2, Fisher, lambda 0.6, < 10 min on 2 CPU cores
    accelerate launch examples/refine.py --mrp_objective margin --mrp_lambda 0.3
    accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/refine.py --model Qwen/Qwen2.5-0.5B
    torchrun --nproc_per_node 2 examples/refine.py         # 2 CPU processes (gloo)

Every flag of `hf-mrp audit` (model and data) and every `MRPConfig` / `TrainingArguments` field is
accepted; `python examples/refine.py --help` lists them. The pipeline itself is `hf_mrp.research.refine.refine`:
audit before -> `MRPTrainer(model, args=MRPConfig(...), train_dataset=...)` -> save adapter ->
audit after on identical positions -> compare -> model card -> optional `--push_to_hub`.
"""

import sys

from hf_mrp.research.cli import main

if __name__ == "__main__":
    sys.exit(main(["refine", *sys.argv[1:]]))  # same one-line errors as `hf-mrp refine`
