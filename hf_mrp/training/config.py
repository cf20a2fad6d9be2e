"""MRPConfig: TrainingArguments plus the MRP objective and the LoRA adapter it trains.

The MRP objective's fields live in `MRPArguments`, which `MRPSFTConfig` (TRL) shares."""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import TrainingArguments
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from ..errors import MRPUserError, require_number
from ..models.layers import parse_layer_spec
from ..ops import LOGITS_PRECISIONS, MRPSettings

logger = logging.getLogger(__name__)


def _launched_without_accelerators(use_cpu: bool) -> bool:
    """Several processes were launched (WORLD_SIZE > 1) but there is no GPU / XPU / MPS device to give them."""
    if use_cpu or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available() or (xpu is not None and xpu.is_available()) or torch.backends.mps.is_available()
    )


DEFAULTS = MRPSettings()
# the fields MRPSettings is built from (TrainingArguments' label_smoothing_factor too)
SETTINGS_FIELDS = frozenset(
    {
        "mrp_objective",
        "mrp_lambda",
        "mrp_margin_threshold",
        "mrp_top_k",
        "mrp_chunk_size",
        "mrp_margin_normalization",
        "label_smoothing_factor",
        "mrp_logits_precision",
    }
)


if TYPE_CHECKING:  # the type checker sees the TrainingArguments fields the mixin reads; at run time a plain base
    _ArgumentsBase = TrainingArguments
else:
    _ArgumentsBase = object


@dataclass
class MRPArguments(_ArgumentsBase):
    """The MRP objective's fields (loss = CE + mrp_lambda * L_objective, see docs/spec.md), mixed into
    `MRPConfig` and `MRPSFTConfig` ahead of their TrainingArguments base, so both read and check them alike."""

    mrp_objective: str = field(
        default=DEFAULTS.objective,
        metadata={
            "help": "Objective added to cross-entropy: 'margin' (maximize top-1 minus top-2 logit below "
            "the threshold), 'fisher' (Fisher distance penalty over the top-k tokens, minimized) "
            "or 'entropy' (full-vocabulary entropy)."
        },
    )
    mrp_lambda: float = field(
        default=DEFAULTS.lam, metadata={"help": "Weight of the objective (>= 0; 0 gives plain CE)."}
    )
    mrp_margin_threshold: float = field(
        default=DEFAULTS.tau,
        metadata={"help": "tau: the margin objective only acts on positions with margin below tau (> 0)."},
    )
    mrp_margin_normalization: str = field(
        default=DEFAULTS.normalization,
        metadata={
            "help": "How the margin objective is averaged: 'gated' divides it by the positions whose margin is "
            "below tau (the paper's mean over gated positions, per micro-batch), 'valid' by all valid "
            "positions like CE (exact under gradient accumulation). Other objectives: always 'valid'."
        },
    )
    mrp_top_k: int = field(
        default=DEFAULTS.top_k, metadata={"help": "k: tokens in the Fisher objective (2 <= k <= vocab)."}
    )
    mrp_chunk_size: int = field(
        default=DEFAULTS.chunk_size,
        metadata={"help": "Positions per float32 [chunk x vocab] logits chunk (memory vs. speed)."},
    )
    mrp_logits_precision: str = field(
        default=DEFAULTS.precision,
        metadata={
            "help": "Precision of the fused loss' head matmuls: 'float32' (default: float32 logits and "
            "gradients whatever bf16 / fp16 autocast or the model's dtype) or 'bfloat16' (opt-in, "
            "speed over the float32 guarantee: h, W and the logits' gradient rounded to bfloat16 "
            "operands, products and sums in float32, float32 logits; tensor cores on CUDA). The "
            "audit is always float32.",
            "choices": list(LOGITS_PRECISIONS),
        },
    )

    def __getstate__(self) -> dict:
        """Pickled (``training_args.bin`` of every save, checkpoint and Trainer push) without any Hub token."""
        return {name: None if name.endswith("_token") else value for name, value in self.__dict__.items()}

    def __copy__(self) -> MRPArguments:  # copies keep the token: only pickles drop it
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> MRPArguments:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _join_cpu_launch(self) -> None:
        """Before TrainingArguments.__post_init__: several processes on a machine without accelerators run as one
        distributed CPU job (gloo), as with --use_cpu true; else each would run as its own job, all writing one
        output folder."""
        if _launched_without_accelerators(self.use_cpu):
            logger.warning(
                "%s processes were launched on a machine without accelerators: running them as one "
                "distributed CPU job (gloo), as with --use_cpu true",
                os.environ["WORLD_SIZE"],
            )
            self.use_cpu = True

    def _check_mrp_fields(self) -> None:
        """One clear line for each bad MRP field; the one check both configs (`MRPConfig`, `MRPSFTConfig`) run,
        before their TrainingArguments base, so they refuse exactly the same settings with the same words. Builds
        ``mrp_settings``, the checked `MRPSettings` the loss takes whole (rebuilt, and checked, when a field
        changes later)."""
        settings = self._built_mrp_settings()
        if settings.objective == "fisher":
            check_fisher_memory(settings.top_k, settings.chunk_size, memory_limit(self.use_cpu))
        self.mrp_settings = settings

    def _built_mrp_settings(self) -> MRPSettings:
        return MRPSettings(
            self.mrp_objective,
            self.mrp_lambda,
            self.mrp_margin_threshold,
            self.mrp_top_k,
            self.mrp_chunk_size,
            self.mrp_margin_normalization,
            self.label_smoothing_factor,
            self.mrp_logits_precision,
        )

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in SETTINGS_FIELDS and "mrp_settings" in self.__dict__:  # built already: build and check anew
            self._check_mrp_fields()


@dataclass
class MRPConfig(MRPArguments, TrainingArguments):
    """Training arguments for `MRPTrainer`: the MRP fields (`MRPArguments`) and the LoRA adapter it trains."""

    use_lora: bool = field(
        default=True,
        metadata={
            "help": "Train LoRA adapters (built from the lora_* fields) unless a peft_config is passed; "
            "False trains the model's own weights (the paper's full-model scope)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names to adapt, e.g. q_proj v_proj; 'all-linear' adapts every linear layer "
            "of the decoder blocks (not lm_head)."
        },
    )
    lora_layers: str | None = field(
        default=None,
        metadata={
            "help": "0-based decoder layers to adapt: 'all', a range like '20-29' or a list like '3,5,7'; default all."
        },
    )

    def __post_init__(self) -> None:
        self._join_cpu_launch()
        if isinstance(self.lora_target_modules, str):  # 'all-linear' / 'q_proj' mean the one-element list
            self.lora_target_modules = [self.lora_target_modules]
        self._check_mrp_fields()
        _check_numbers(self)  # before TrainingArguments, which would fail on them with a traceback
        super().__post_init__()
        check_training_settings(self)
        if self.lora_r < 1 or not 0 <= self.lora_dropout < 1:
            raise MRPUserError(
                f"lora_r must be >= 1 and lora_dropout in [0, 1), got {self.lora_r}, {self.lora_dropout}"
            )
        if not self.lora_alpha > 0:
            raise MRPUserError(
                f"lora_alpha must be > 0 (the adapter's output is scaled by lora_alpha / lora_r; 0 "
                f"makes it do nothing), got {self.lora_alpha}; the usual choice is 2 x lora_r"
            )
        if self.lora_layers is not None and self.lora_layers.strip().lower() != "all":
            parse_layer_spec(self.lora_layers, n_layers=10**6)  # syntax now; the range is checked against the model
        _check_training_steps(self)

    def lora_layer_indices(self, n_layers: int) -> list[int] | None:
        """The adapted layers as 0-based indices (None: all layers), checked against the model."""
        if self.lora_layers is None or self.lora_layers.strip().lower() == "all":
            return None
        return parse_layer_spec(self.lora_layers, n_layers)


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
    output_dir, a run that would train zero steps, a seed outside numpy's range, a reporter that is unknown or
    whose package is missing (report_to becomes the list of names the Trainer takes)."""
    if not str(args.output_dir or "").strip():
        raise MRPUserError(f"output_dir is empty ({args.output_dir!r}); pass a folder path")
    _check_zero_steps(args.max_steps, args.num_train_epochs)
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
    if max_steps == 0 or (max_steps < 0 and not (math.isfinite(epochs) and epochs > 0)):
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


FISHER_LIVE_COPIES = 4  # [chunk x k x k x k] float32 tensors alive at once in ops.objectives.fisher_penalty


def _check_numbers(config: MRPConfig) -> None:
    """Types and finiteness a command line cannot get wrong but Python callers can ('0.5', 2.5, inf)."""
    for name in ("lora_alpha", "learning_rate"):
        require_number(name, getattr(config, name))
    for name in ("lora_r", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps"):
        require_number(name, getattr(config, name), integer=True)
    if config.lora_layers is not None and not isinstance(config.lora_layers, str):
        raise MRPUserError(
            f"lora_layers must be a string such as '1,2', '20-29' or 'all', got "
            f"{type(config.lora_layers).__name__} {config.lora_layers!r}"
        )


def _check_training_steps(config: MRPConfig) -> None:
    if config.max_steps == 0 or config.max_steps < -1:
        raise MRPUserError(
            f"max_steps must be a positive number of optimizer steps (or -1: train for "
            f"num_train_epochs), got {config.max_steps}"
        )
    if config.learning_rate < 0:
        raise MRPUserError(f"learning_rate must be >= 0, got {config.learning_rate}; a negative rate climbs the loss")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise MRPUserError(f"{name} must be at least 1, got {getattr(config, name)}")


def memory_limit(use_cpu: bool = False) -> int:
    """Bytes of memory the objective may use at most: the GPU's memory when one is used, else the machine's RAM."""
    if not use_cpu and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_fisher_memory(top_k: int, chunk_size: int, limit: int) -> None:
    """The Fisher objective holds [chunk x k x k x k] float32 tensors; refuse a k whose tensors exceed ``limit``."""
    needed = FISHER_LIVE_COPIES * 4 * chunk_size * top_k**3
    if needed > limit:
        largest = int((limit / (FISHER_LIVE_COPIES * 4 * chunk_size)) ** (1 / 3))
        raise MRPUserError(
            f"mrp_top_k {top_k} would need about {needed / 1e9:,.0f} GB for the Fisher objective's "
            f"[chunk x k x k x k] tensors (mrp_chunk_size {chunk_size}), more than the {limit / 1e9:.0f} GB of memory "
            f"here; use mrp_top_k <= {largest} (the paper uses 5), or a smaller mrp_chunk_size"
        )
