"""The settings of a training run that TrainingArguments accepts but the run cannot use (an empty output_dir, zero
steps, a seed numpy refuses, a reporter that is unknown or not installed, a top-k beyond the machine's memory),
refused in one line before any work; `MRPConfig` and `MRPSFTConfig` both run them."""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from ..errors import MRPUserError
from ..ops import MRPSettings

SEED_RANGE = (0, 2**32 - 1)  # numpy's generator (transformers.set_seed seeds it) takes seeds in this range
# --report_to name -> (transformers' availability check, what to install)
REPORTER_PACKAGES = {
    "azure_ml": ("is_azureml_available", "azureml-core"),
    "comet_ml": ("is_comet_available", "comet_ml"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "neptune": ("is_neptune_available", "neptune"),
    "tensorboard": ("is_tensorboard_available", '"hf_mrp[tensorboard]"'),
    "trackio": ("is_trackio_available", '"hf_mrp[trackio]"'),
    "wandb": ("is_wandb_available", "wandb"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "clearml": ("is_clearml_available", "clearml"),
    "dagshub": ("is_dagshub_available", "dagshub"),
    "flyte": ("is_flytekit_available", "flytekit"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "kubeflow": ("is_kubeflow_available", "kubeflow"),
}


def check_training_settings(args) -> None:
    """The settings of a training run that TrainingArguments accepts but the run cannot use, refused in one line
    before any work (MRPConfig and MRPSFTConfig both call it after TrainingArguments.__post_init__): an empty
    output_dir, a run that would train zero steps (or at a learning rate that is not positive, or on batches of
    no rows), a seed outside numpy's range, a reporter that is unknown or
    whose package is missing (report_to becomes the list of names the Trainer takes)."""
    if not str(args.output_dir or "").strip():
        raise MRPUserError(f"output_dir is empty ({args.output_dir!r}); pass a folder path")
    _check_zero_steps(args.max_steps, args.num_train_epochs)
    if not args.learning_rate > 0:  # NaN too
        raise MRPUserError(
            f"learning_rate must be > 0, got {args.learning_rate}; 0 trains nothing and a negative rate climbs the "
            "loss: pass e.g. --learning_rate 2e-4"
        )
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise MRPUserError(f"{name} must be at least 1, got {getattr(args, name)}")
    for name in ("seed", "data_seed"):
        value = getattr(args, name)
        if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise MRPUserError(
                f"{name} must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]:,}] (the range numpy's random "
                f"generator takes), got {value:,}; pass e.g. --{name} 0"
            )
    args.report_to = _known_reporters(args.report_to)


def _check_zero_steps(max_steps: int, epochs: float) -> None:
    """max_steps 0, or max_steps -1 (train for num_train_epochs) with no epochs, would train nothing."""
    if max_steps == 0 or max_steps < -1 or (max_steps < 0 and not (math.isfinite(epochs) and epochs > 0)):
        raise MRPUserError(
            f"max_steps must be a positive number of optimizer steps (or -1: train for num_train_epochs > 0); got "
            f"max_steps {max_steps} with num_train_epochs {epochs:g}: the run would train "
            f"{'zero' if not epochs > 0 else 'endless'} steps"
        )


def _known_reporters(report_to: list[str]) -> list[str]:
    """``--report_to tensorboard,trackio`` as the list the Trainer takes, each one known and installed."""
    from transformers.integrations import integration_utils

    names = [name.strip() for entry in report_to for name in entry.split(",") if name.strip() not in ("", "none")]
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise MRPUserError(
                f"unknown reporter {name!r} in --report_to; choose from none, all, "
                f"{', '.join(INTEGRATION_TO_CALLBACK)} (several: comma-separated)"
            )
        check, package = REPORTER_PACKAGES.get(name, (None, name))
        available = getattr(integration_utils, check, None) if check else None
        installed = available() if available is not None else importlib.util.find_spec(name) is not None
        if not installed:
            raise MRPUserError(
                f"--report_to {name} needs the {name} package, which is not installed: pip install "
                f"{package} (or pass --report_to none)"
            )
    return names


def memory_limit(use_cpu: bool = False) -> int:
    """Bytes of memory the objective may use at most: the GPU's memory when one is used, else the machine's RAM."""
    if not use_cpu and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_objective_memory(settings: MRPSettings, limit: int) -> None:
    """An objective whose per-position tensors grow with k (Fisher: [chunk x k x k x k] float32, its record's
    ``memory``): refuse a k whose chunk of tensors exceeds ``limit`` bytes."""
    record = settings.record
    if record.memory is None:
        return
    k, chunk = settings.k, settings.chunk_size
    needed = record.memory(k) * chunk
    if needed > limit:
        largest, too_large = 1, k  # the largest k that fits, by bisection (memory grows with k)
        while too_large - largest > 1:
            middle = (largest + too_large) // 2
            largest, too_large = (middle, too_large) if record.memory(middle) * chunk <= limit else (largest, middle)
        raise MRPUserError(
            f"mrp_top_k {k} would need about {needed / 1e9:,.0f} GB for the {record.name} objective's per-position "
            f"tensors (mrp_chunk_size {chunk}), more than the {limit / 1e9:.0f} GB of memory here; use mrp_top_k <= "
            f"{largest} (the paper uses 5), or a smaller mrp_chunk_size"
        )
