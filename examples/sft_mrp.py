"""Chat SFT with margin refinement (TRL's SFTTrainer + MRP), audited on held-out assistant turns.

    python examples/sft_mrp.py        # embedded SmolLM2-135M-Instruct, Fisher, lambda 0.6 (< 10 min, 2 CPU cores)
    python examples/sft_mrp.py --mrp_lambda 0 --output_dir outputs/sft_control    # the control: plain SFT

Needs the TRL extra: pip install 'hf_mrp[trl]'. The chats are built offline from the text of
`pydoc_data.topics` (ships with CPython): one chat per topic, in sorted topic order; the user asks
"Explain the Python topic '<name>'." and the assistant answers with the topic's text, cut at the last
paragraph break before --max_answer_chars. Every --holdout_every-th topic is held out: the model never
trains on it, and its assistant turns (exactly the positions that would carry SFT loss) are audited
before and after training by MRPAuditCallback, which writes the flip audit to <output_dir>/comparison/.
Training uses assistant-only loss through a LoRA adapter (peft_config) on --lora_layers. Every
MRPSFTConfig / SFTConfig / TrainingArguments field is accepted (`--help` lists them).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hf_mrp.errors import MRPUserError

DEFAULTS = {
    "output_dir": "outputs/sft_mrp",
    "mrp_objective": "fisher",
    "mrp_lambda": "0.6",
    "max_steps": "32",
    "per_device_train_batch_size": "4",
    "learning_rate": "2e-4",
    "logging_steps": "8",
    "save_strategy": "no",
    "report_to": "none",
    "bf16": "false",
    "gradient_checkpointing": "false",
    "assistant_only_loss": "true",
    "max_length": "512",
    "seed": "0",
}


@dataclass
class ExampleArguments:
    model: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder (default: the embedded SmolLM2-135M-Instruct, offline)."},
    )
    max_answer_chars: int = field(
        default=800, metadata={"help": "Answers are cut at the last paragraph break before this many characters."}
    )
    holdout_every: int = field(default=5, metadata={"help": "Every n-th topic is held out and audited (n >= 2)."})
    max_topics: int | None = field(default=None, metadata={"help": "Use only the first n topics (smoke runs)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_layers: str = field(default="20-29", metadata={"help": "Decoder layers that get adapters, e.g. '20-29'."})


def topic_chats(max_answer_chars: int, max_topics: int | None = None) -> list[tuple[str, list[dict]]]:
    """(topic, chat) for each pydoc topic: the question names the topic, the answer is its text, cut short."""
    from pydoc_data.topics import topics

    chats = []
    for name in sorted(topics)[:max_topics]:
        text = topics[name].strip()
        cut = text.rfind("\n\n", 0, max_answer_chars)
        answer = text[: cut if cut > 0 else max_answer_chars].strip()
        chats.append(
            (
                name,
                [
                    {"role": "user", "content": f"Explain the Python topic '{name}'."},
                    {"role": "assistant", "content": answer},
                ],
            )
        )
    return chats


def assistant_blocks(tokenizer, chats: list[list[dict]]):
    """Held-out chats as audit blocks whose evaluated positions are exactly the assistant tokens' predictions."""
    from hf_mrp.data import labeled_blocks

    rows, labels = [], []
    for messages in chats:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        rows.append(list(encoded["input_ids"]))
        labels.append([t if m else -100 for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])])
    source = "pydoc_data.topics chats, held-out assistant turns"
    return labeled_blocks(rows, labels, tokenizer.pad_token_id or 0, source)


def lora_config(model, args: ExampleArguments):
    from peft import LoraConfig

    from hf_mrp.models import decoder_layers, parse_layer_spec
    from hf_mrp.training.adapters import decoder_linear_names

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        task_type="CAUSAL_LM",
        target_modules=decoder_linear_names(model),
        layers_to_transform=parse_layer_spec(args.lora_layers, len(decoder_layers(model))),
    )


def parse(argv: list[str]):
    from hf_mrp.research.parser import MRPArgumentParser
    from hf_mrp.training.sft import MRPSFTConfig

    given = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    defaults = [item for key, value in DEFAULTS.items() if key not in given for item in (f"--{key}", value)]
    parser = MRPArgumentParser((ExampleArguments, MRPSFTConfig), prog="python examples/sft_mrp.py")
    example, config = parser.parse_args_into_dataclasses(args=[*defaults, *argv])
    check_example_arguments(example, config)
    return example, config


def check_example_arguments(example: ExampleArguments, config) -> None:
    """Counts and lengths that would make the run meaningless (or fail deep inside), refused in one line."""
    if example.holdout_every < 2:
        raise MRPUserError(
            f"--holdout_every must be at least 2 (every n-th topic held out), got {example.holdout_every}"
        )
    if example.max_answer_chars < 1:
        raise MRPUserError(
            f"--max_answer_chars must be a positive number of characters, got {example.max_answer_chars}"
        )
    if example.max_topics is not None and example.max_topics < 2:
        raise MRPUserError(
            f"--max_topics must be at least 2 (one held-out topic to audit and one to train on), got "
            f"{example.max_topics}; omit it to use every topic"
        )
    if example.lora_r < 1 or not example.lora_alpha > 0:
        raise MRPUserError(f"--lora_r must be >= 1 and --lora_alpha > 0, got {example.lora_r} and {example.lora_alpha}")
    if config.max_length is not None and config.max_length < 2:
        raise MRPUserError(
            f"--max_length must be at least 2 tokens (one input and one target), got {config.max_length}"
        )


def run(argv: list[str]) -> dict:
    from datasets import Dataset

    from hf_mrp.models import load_model_and_tokenizer
    from hf_mrp.training.callbacks import MRPAuditCallback
    from hf_mrp.training.sft import CHATML_GENERATION_TEMPLATE, MRPSFTTrainer

    example, config = parse(argv)
    started, cpu_started = time.perf_counter(), time.process_time()
    model, tokenizer, name = load_model_and_tokenizer(example.model)
    if "{% generation %}" not in (tokenizer.chat_template or ""):
        tokenizer.chat_template = CHATML_GENERATION_TEMPLATE  # SmolLM2's own ChatML, with assistant markers
    chats = topic_chats(example.max_answer_chars, example.max_topics)
    held = [chat for index, (_, chat) in enumerate(chats) if index % example.holdout_every == 0]
    train = [chat for index, (_, chat) in enumerate(chats) if index % example.holdout_every != 0]
    blocks = assistant_blocks(tokenizer, held)
    audit = MRPAuditCallback(blocks, tokenizer=tokenizer, provenance={"model": name})
    trainer = MRPSFTTrainer(
        model,
        args=config,
        train_dataset=Dataset.from_dict({"messages": train}),
        processing_class=tokenizer,
        peft_config=lora_config(model, example),
        callbacks=[audit],
    )
    trainer.train()
    trainer.save_model()
    comparison = audit.comparison
    logged = [row for row in trainer.state.log_history if "loss_ce" in row]
    summary = {
        "model": name,
        "mrp_objective": config.mrp_objective,
        "mrp_lambda": config.mrp_lambda,
        "steps": trainer.state.global_step,
        "train_chats": len(train),
        "heldout_chats": len(held),
        "heldout_positions": blocks.n_positions,
        **{
            key: comparison[key]
            for key in (
                "w2r",
                "r2w",
                "net",
                "accuracy_before",
                "accuracy_after",
                "median_margin_before",
                "median_margin_after",
                "median_margin_change",
            )
        },
        "last_log": logged[-1] if logged else None,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    Path(config.output_dir, "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    trainer.end()  # under torchrun / accelerate launch: leave the process group (an exit with it alive can abort)
    return summary


def main(argv: list[str] | None = None) -> int:
    from hf_mrp.noise import quiet_third_party_noise

    quiet_third_party_noise()  # first: the imports below print it (hf_mrp/noise.py says what and why)
    from hf_mrp.errors import one_line
    from hf_mrp.reporting.markdown import flip_summary_line
    from hf_mrp.research.cli import Stopped, signals_stop_like_ctrl_c

    try:
        with signals_stop_like_ctrl_c():
            summary = run(sys.argv[1:] if argv is None else argv)
    except MRPUserError as error:
        print(f"sft_mrp.py: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print("sft_mrp.py: interrupted (report files on disk are whole: each is written atomically)", file=sys.stderr)
        return 128 + (stop.signum if isinstance(stop, Stopped) else 2)
    print(
        f"SFT + MRP (lambda {summary['mrp_lambda']}) -> {summary['heldout_positions']} held-out assistant positions: "
        f"{flip_summary_line(summary)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
