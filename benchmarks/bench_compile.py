"""torch_compile=True: graphs compiled and time per step, MRPTrainer (lambda 0 and Fisher) vs the plain Trainer.

    python benchmarks/bench_compile.py [--steps 8] [--backend inductor] [--hidden 256] [--layers 4] [--vocab 8192]

Each trainer trains its own copy of one tiny random Llama for ``--steps`` steps (the first ones compile);
prints the number of graphs dynamo compiled and the median time of the steps after the first two, with
the ratio to the plain Trainer. A graph count that grows with --steps means a recompile per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from common import machine
from datasets import Dataset
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_mrp.training import MRPConfig, MRPTrainer


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def train(trainer_class, args_class, model, options: dict, extra: dict, data: Dataset) -> tuple[int, float]:
    torch._dynamo.reset()
    counters.clear()
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as folder:
        args = args_class(
            output_dir=folder,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            per_device_train_batch_size=4,
            logging_steps=10**6,
            **options,
            **extra,
        )
        trainer_class(model=copy.deepcopy(model), args=args, train_dataset=data, callbacks=[timer]).train()
    return int(counters["stats"]["unique_graphs"]), statistics.median(timer.times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and the eager backend (CI checks it runs)")
    cli = parser.parse_args()
    if cli.smoke:
        cli.steps, cli.backend, cli.hidden, cli.layers, cli.vocab, cli.length = 4, "eager", 32, 2, 97, 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cli.vocab,
            hidden_size=cli.hidden,
            intermediate_size=4 * cli.hidden,
            num_hidden_layers=cli.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    ids = torch.randint(0, cli.vocab, (64, cli.length)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    options = {"max_steps": cli.steps, "torch_compile": True, "torch_compile_backend": cli.backend}
    print(f"{machine()}; backend {cli.backend}, {cli.steps} steps, batch 4 x {cli.length}, V={cli.vocab}")
    runs = {
        "plain Trainer (model's own CE)": (Trainer, TrainingArguments, {}),
        "MRPTrainer lambda 0": (MRPTrainer, MRPConfig, {"mrp_lambda": 0.0, "use_lora": False}),
        "MRPTrainer Fisher 0.6": (MRPTrainer, MRPConfig, {"mrp_lambda": 0.6, "use_lora": False}),
    }
    results = {
        name: train(cls, args_class, model, options, extra, data) for name, (cls, args_class, extra) in runs.items()
    }
    base = results["plain Trainer (model's own CE)"][1]
    for name, (graphs, seconds) in results.items():
        print(f"  {name:32s} graphs {graphs:3d}   {seconds * 1000:8.1f} ms/step   {seconds / base:5.3f}x plain")


if __name__ == "__main__":
    main()
