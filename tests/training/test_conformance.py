"""The Trainer contract: MRPTrainer at lambda 0 is the plain `transformers.Trainer`, option by option.

Each case trains the same model copy with the same seed through both trainers and asserts the loss histories
and parameters within what rounding can make of the difference between the two heads (helpers.run_bounds, on any
CPU), and the plain Trainer's evaluation metrics and predictions (`trainer.predict`) at the MRP run's weights equal
MRPTrainer's, or a one-line refusal before any work. The plain Trainer is the reference; nothing here is a stand-in
of hf_mrp's own.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_mrp.errors import MRPUserError
from hf_mrp.training import MRPConfig, MRPTrainer

from helpers import (
    BF16_U,
    SMALL,
    VOCAB,
    RunBounds,
    cpu_arguments,
    head_bounds,
    head_input_bound,
    mean_ce_rounding_bound,
    run_bounds,
    tiny_llama,
    tiny_tokenizer,
)

STEPS = 3
LENGTH = 12


def token_rows(rows: int = 8, seed: int = 0, ragged: bool = False) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, LENGTH + 1, size=rows) if ragged else [LENGTH] * rows
    return [rng.integers(3, VOCAB, size=int(n)).tolist() for n in lengths]


def labelled(rows: list[list[int]], extra_column: bool = False, first_real: bool = False) -> Dataset:
    """Labels with 1-3 ignored entries per row: at the start, or (``first_real``) in the middle, so that the first
    label is real (with virtual tokens in front, it is the one the last virtual position predicts)."""
    if first_real:
        labels = [row[:4] + [-100] * (1 + i % 3) + row[5 + i % 3 :] for i, row in enumerate(rows)]
    else:
        labels = [[-100] * (1 + i % 3) + row[1 + i % 3 :] for i, row in enumerate(rows)]
    data = {"input_ids": rows, "labels": labels}
    if extra_column:
        data["text"] = ["unused"] * len(rows)
    return Dataset.from_dict(data)


def common_args(tmp_path, name: str, **overrides) -> dict:
    run = dict(
        max_steps=STEPS,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        dataloader_num_workers=0,
    )
    return cpu_arguments(tmp_path / name, **{**run, **overrides})


def token_accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
    return {"accuracy": float(hits.mean())}


def argmax_logits(logits, labels):
    return logits.argmax(-1)


def argmax_accuracy(prediction) -> dict[str, float]:
    ids, labels = prediction.predictions, prediction.label_ids
    hits = (ids[:, :-1] == labels[:, 1:])[labels[:, 1:] != -100]
    return {"accuracy": float(hits.mean())}


def run(trainer_class, args_class, model, tmp_path, name, args: dict, trainer_kwargs: dict, resume: bool = False):
    """Train a copy of ``model``; return (trainer, losses, parameters, eval metrics, predictions)."""
    model = copy.deepcopy(model)
    extra = {"mrp_lambda": 0.0, "use_lora": False} if trainer_class is MRPTrainer else {}
    arguments = args_class(**common_args(tmp_path, name, **args), **extra)
    trainer = trainer_class(model=model, args=arguments, **trainer_kwargs)
    trainer.train()
    if resume:  # train again from the middle checkpoint, as a restarted job would
        trainer = trainer_class(model=copy.deepcopy(model), args=arguments, **trainer_kwargs)
        trainer.state.log_history = []
        trainer.train(resume_from_checkpoint=str(tmp_path / name / "checkpoint-2"))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    parameters = {key: value.detach().clone() for key, value in trainer.model.named_parameters()}
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    predictions = trainer.predict(trainer_kwargs["eval_dataset"]) if "eval_dataset" in trainer_kwargs else None
    return trainer, losses, parameters, metrics, predictions


def dropout_llama():
    model = tiny_llama(layers=2)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    return model.train()


def with_adapter(config_name: str):
    """A builder of the tiny model wrapped in a PEFT adapter (the same adapter init for both trainers)."""
    import peft

    configs = {
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "p_tuning": lambda: peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16
        ),
    }

    def build():
        torch.manual_seed(0)
        return peft.get_peft_model(tiny_llama(), configs[config_name]())

    return build


def cases() -> dict[str, tuple]:
    """name -> (TrainingArguments options, model builder, trainer kwargs builder, bf16 autocast).

    The options that are not about the optimizer train with SGD, whose update is linear in the gradient (the
    weights stay within the gradients' rounding, `run_bounds`); the optimizer cases keep AdamW / Adafactor, whose
    sign-like steps on a gradient within rounding of zero bound the weights only by steps x lr."""
    train = lambda: labelled(token_rows())  # noqa: E731
    held = lambda: labelled(token_rows(rows=4, seed=1))  # noqa: E731
    plain = lambda: {"train_dataset": train(), "eval_dataset": held()}  # noqa: E731
    # prompt learning: every row's first label real (the last virtual token predicts it; PEFT pads, then shifts)
    first_real = lambda: {  # noqa: E731
        "train_dataset": labelled(token_rows(), first_real=True),
        "eval_dataset": labelled(token_rows(rows=4, seed=1), first_real=True),
    }
    sgd = {"optim": "sgd", "learning_rate": 0.05}
    return {
        "defaults": ({}, tiny_llama, plain, False),  # AdamW
        "accumulation": ({"gradient_accumulation_steps": 2, **sgd}, tiny_llama, plain, False),
        "clipping": ({"max_grad_norm": 0.05, **sgd}, tiny_llama, plain, False),
        "cosine_warmup": ({"lr_scheduler_type": "cosine", "warmup_steps": 2, **sgd}, tiny_llama, plain, False),
        "sgd": ({"optim": "sgd", "learning_rate": 0.5}, tiny_llama, plain, False),
        "adafactor": ({"optim": "adafactor"}, tiny_llama, plain, False),
        "weight_decay": ({"weight_decay": 0.1, "adam_beta2": 0.99}, tiny_llama, plain, False),  # AdamW's own
        "label_smoothing": ({"label_smoothing_factor": 0.1, **sgd}, tiny_llama, plain, False),
        "neftune": ({"neftune_noise_alpha": 5.0, **sgd}, tiny_llama, plain, False),
        "dropout": (sgd, dropout_llama, plain, False),
        "bf16_autocast": ({"bf16": True, **sgd}, tiny_llama, plain, True),  # the plain head is bf16, hf_mrp's float32
        "tokens_seen": ({"include_num_input_tokens_seen": True, **sgd}, tiny_llama, plain, False),
        "gradient_checkpointing": ({"gradient_checkpointing": True, **sgd}, tiny_llama, plain, False),
        "tied_embeddings": (sgd, lambda: tiny_llama(tie=True), plain, False),
        "lora": (sgd, with_adapter("lora"), plain, False),
        "prompt_tuning": (sgd, with_adapter("prompt_tuning"), first_real, False),
        "p_tuning": (sgd, with_adapter("p_tuning"), first_real, False),
        "eval_with_metrics": (
            {"eval_strategy": "steps", "eval_steps": 2, **sgd},
            tiny_llama,
            lambda: {**plain(), "compute_metrics": token_accuracy},
            False,
        ),
        "preprocess_logits": (
            {"eval_strategy": "steps", "eval_steps": 2, **sgd},
            tiny_llama,
            lambda: {**plain(), "compute_metrics": argmax_accuracy, "preprocess_logits_for_metrics": argmax_logits},
            False,
        ),
        "prediction_loss_only": ({"prediction_loss_only": True, **sgd}, tiny_llama, plain, False),
        "remove_unused_columns": (
            sgd,
            tiny_llama,
            lambda: {"train_dataset": labelled(token_rows(), extra_column=True), "eval_dataset": held()},
            False,
        ),
        "lm_collator": (
            sgd,
            tiny_llama,
            lambda: {
                "train_dataset": Dataset.from_dict({"input_ids": token_rows(ragged=True)}),
                "eval_dataset": Dataset.from_dict({"input_ids": token_rows(4, 1, ragged=True)}),
                "data_collator": DataCollatorForLanguageModeling(tiny_tokenizer(), mlm=False),
            },
            False,
        ),
        "save_only_model": (
            {"save_strategy": "steps", "save_steps": 2, "save_only_model": True, **sgd},
            tiny_llama,
            plain,
            False,
        ),
        "load_best_model_at_end": (
            {
                "eval_strategy": "steps",
                "eval_steps": 1,
                "save_strategy": "steps",
                "save_steps": 1,
                "load_best_model_at_end": True,
                "metric_for_best_model": "loss",
                **sgd,
            },
            tiny_llama,
            plain,
            False,
        ),
    }


CASES = cases()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow  # two training runs per option
def test_mrp_trainer_at_lambda_zero_is_the_plain_trainer(tmp_path, name):
    options, build, kwargs, bf16 = CASES[name]
    model = build()
    plain = run(Trainer, TrainingArguments, model, tmp_path, "plain", options, kwargs())
    mrp = run(MRPTrainer, MRPConfig, model, tmp_path, "mrp", options, kwargs())
    assert_same_run(plain, mrp, run_bounds(plain, model, LENGTH, bf16_head=bf16), bf16)


def test_resume_from_checkpoint_continues_like_the_plain_trainer(tmp_path):
    options = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}  # AdamW
    data = lambda: {"train_dataset": labelled(token_rows())}  # noqa: E731
    model = tiny_llama()
    plain = run(Trainer, TrainingArguments, model, tmp_path, "plain", options, data(), resume=True)
    mrp = run(MRPTrainer, MRPConfig, model, tmp_path, "mrp", options, data(), resume=True)
    assert len(mrp[1]) == 4  # steps 1-2 restored from the checkpoint's log, 3-4 trained again
    assert_same_run(plain, mrp, run_bounds(plain, model, LENGTH), bf16=False)


def assert_same_run(plain, mrp, bounds: RunBounds, bf16: bool) -> None:
    """Losses and weights within ``bounds``; then the evaluation and the predictions of the plain Trainer at the
    MRP run's weights: the same weights through the same evaluation (MRPTrainer's real logits are the model's own
    head on the same hidden states), so predictions and metrics agree to the bit, the eval loss within the head's
    rounding."""
    plain_trainer, plain_losses, plain_parameters, _, _ = plain
    _, mrp_losses, mrp_parameters, mrp_metrics, mrp_predictions = mrp
    assert len(plain_losses) == len(mrp_losses) == len(bounds.losses) > 0
    assert all(math.isfinite(value) for value in mrp_losses)
    for step, (got, want, bound) in enumerate(zip(mrp_losses, plain_losses, bounds.losses)):
        assert abs(got - want) <= bound, (step, got, want, bound)
    assert plain_parameters.keys() == mrp_parameters.keys()
    for key, value in plain_parameters.items():
        torch.testing.assert_close(mrp_parameters[key], value, rtol=0, atol=bounds.parameter, msg=key)
    if not mrp_metrics and mrp_predictions is None:
        return
    with torch.no_grad():  # the plain Trainer's model at the MRP run's weights
        for key, value in plain_trainer.model.named_parameters():
            value.copy_(mrp_parameters[key])
    plain_metrics = plain_trainer.evaluate()
    rows = len(plain_trainer.eval_dataset)
    head = head_input_bound(plain_trainer.model)  # at those weights
    for key, value in plain_metrics.items():
        if key.endswith(("_runtime", "_per_second")):
            continue
        assert key in mrp_metrics, key
        if key == "eval_loss":
            width, positions = SMALL["hidden_size"], rows * LENGTH
            bound = 6 * BF16_U * head if bf16 else mean_ce_rounding_bound(VOCAB, width, head, positions, value)
            assert abs(mrp_metrics[key] - value) <= bound, (key, mrp_metrics[key], value, bound)
        else:
            assert mrp_metrics[key] == value, key
    if mrp_predictions is not None:
        plain_predictions = plain_trainer.predict(plain_trainer.eval_dataset)
        if plain_predictions.predictions is None:
            assert mrp_predictions.predictions is None
        else:
            np.testing.assert_array_equal(mrp_predictions.predictions, plain_predictions.predictions)
        np.testing.assert_array_equal(mrp_predictions.label_ids, plain_predictions.label_ids)


def test_compute_loss_func_is_refused_before_any_work(tmp_path):
    with pytest.raises(MRPUserError, match="compute_loss_func") as error:
        MRPTrainer(
            model=tiny_llama(),
            args=MRPConfig(**common_args(tmp_path, "mrp")),
            train_dataset=labelled(token_rows()),
            compute_loss_func=lambda outputs, labels, **kw: 0,
        )
    assert "\n" not in str(error.value)
    assert not (tmp_path / "mrp").exists()


def compiled_run(trainer_class, args_class, tmp_path, steps: int) -> tuple[list[float], int]:
    """Losses of a torch_compile=True run and the number of graphs dynamo compiled for it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    options = {"torch_compile": True, "torch_compile_backend": "eager", "max_steps": steps}
    _, losses, *_ = run(
        trainer_class,
        args_class,
        tiny_llama(),
        tmp_path,
        f"{trainer_class.__name__}{steps}",
        options,
        {"train_dataset": labelled(token_rows())},
    )
    graphs = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return losses, graphs


@pytest.mark.slow  # torch.compile
def test_torch_compile_compiles_once_not_every_step(tmp_path):
    """The head swap hands dynamo the same (opaque) callable every step: the graphs compiled for 2 steps are all
    there are after 5 (before, the swapped forward recompiled the decoder at each step)."""
    plain_losses, _ = compiled_run(Trainer, TrainingArguments, tmp_path, 5)
    _, graphs_two = compiled_run(MRPTrainer, MRPConfig, tmp_path, 2)
    losses, graphs_five = compiled_run(MRPTrainer, MRPConfig, tmp_path, 5)
    assert graphs_five == graphs_two > 0
    # lambda 0: the same body, two float32 heads (the fused one, the model's with the Trainer's CE), each within
    # head_bounds (d = 32, V = 97, 2 rows of 11) of the exact CE (>= 1 here). AdamW's steps move a weight whose
    # gradient differs by dg by lr eps dg / g^2 more: visibly only where |g| ~ 0, which moves the loss by ~ |g| lr.
    np.testing.assert_allclose(losses, plain_losses, rtol=2 * head_bounds(32, VOCAB, 2 * (LENGTH - 1))[0], atol=0)


def test_loss_only_evaluation_forms_no_logits_and_skip_logits_is_honoured(tmp_path):
    """An evaluation without compute_metrics (and the Trainer's ``skip_logits`` flag) asks for no logits: the
    head's [batch x seq x vocab] output is never formed, and no zeros placeholder is handed out as logits."""
    model = tiny_llama()
    trainer = MRPTrainer(
        model=model,
        args=MRPConfig(**common_args(tmp_path, "mrp"), mrp_lambda=0.0, use_lora=False),
        eval_dataset=labelled(token_rows(rows=4, seed=1)),
    )
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(4)])
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    loss, outputs = trainer.compute_loss(model, {**batch, "skip_logits": True}, return_outputs=True)
    assert "logits" not in outputs and shapes == [(4, LENGTH, 1)]
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and all(shape[-1] == 1 for shape in shapes)
    loss_with, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape == (4, LENGTH, VOCAB) and shapes[-1] == (4, LENGTH, VOCAB)
    # the same fused sums with and without the logits handed out, and those logits the model's own head on the same
    # hidden states (one process, same shapes): equal to the bit
    assert torch.equal(loss_with, loss)
    assert torch.equal(outputs.logits, model(input_ids=batch["input_ids"]).logits)
    hook.remove()
