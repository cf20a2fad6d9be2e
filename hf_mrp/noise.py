"""Third-party noise: the exact warnings other libraries print on a healthy run that say nothing true and actionable
about it, silenced one message at a time, each with its reason. Everything else (all other warnings, every other
message of these loggers) still shows.

The command line (`hf_mrp.research.cli.main`, so `hf-mrp` and examples/refine.py) and examples/sft_mrp.py call
`quiet_third_party_noise()` first, before the imports that print these. The library itself never changes the
warning filters or the loggers of a program that imports it: a program that wants the same quiet calls it too.
What could be avoided at the source is avoided there instead (no filter): pin_memory without an accelerator
(`training.config`), TRL's default for the deprecated ``gradient_checkpointing`` (`training.sft`), Spearman
correlations of constant input (`stats.correlation`), legends without labelled artists (`reporting.plots.legend`),
all-NaN columns of the lens heatmap (`reporting.lens_plots.column_ranges`).

Torch- and transformers-free: it only installs filters, so it runs before anything heavy is imported.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

# (category, message regex, module regex, why it is noise) for `warnings.filterwarnings`.
WARNINGS = (
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.modeling_utils",
        "PEFT's PeftModel.__init__ reads transformers' deprecated alias `is_gradient_checkpointing` (peft 0.21); "
        "nothing the user does changes it, and it goes away when PEFT reads `is_activation_checkpointing`",
    ),
)


@dataclass(frozen=True)
class LoggedNoise:
    """One message of one library logger, dropped unless ``shown_when`` (an environment variable set to true)."""

    logger: str
    message: str  # regex, matched at the start of the formatted message
    why: str
    shown_when: str | None = None


LOGGED = (
    LoggedNoise(
        "kernels._internals.hf_hub",
        r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
        "PEFT imports bitsandbytes on every import of peft (peft/helpers.py), used or not; on a CPU with AVX-512 "
        "BF16, bitsandbytes' import fetches an optional faster 4-bit CPU kernel from the Hub and, offline, the "
        "kernels library says it skips the publisher check of that kernel: nothing about a run that does not "
        "quantize, and nothing a QLoRA user can act on (bitsandbytes makes the call)",
    ),
    LoggedNoise(
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "the same import: bitsandbytes could not fetch or verify that optional kernel (offline, or the publisher "
        "check could not reach the Hub) and falls back to its own CPU kernel, which gives the same results",
    ),
    LoggedNoise(
        "DeepSpeed",
        r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.",
        "accelerate imports deepspeed, when it is installed, only to ask whether the model is a DeepSpeedEngine "
        "(Trainer.__init__ -> unwrap_model); the import makes DeepSpeed pick its accelerator and say so. Shown "
        "when the run uses DeepSpeed (ACCELERATE_USE_DEEPSPEED, set by --deepspeed and by accelerate's DeepSpeed "
        "configs): there it says which device DeepSpeed will train on",
        shown_when="ACCELERATE_USE_DEEPSPEED",
    ),
)


class DropMessage(logging.Filter):
    """A logger filter that drops the records of one `LoggedNoise` (the logger's other records pass)."""

    def __init__(self, noise: LoggedNoise):
        super().__init__()
        self.noise = noise
        self.pattern = re.compile(noise.message)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.noise.shown_when and os.environ.get(self.noise.shown_when, "").lower() in ("1", "true", "yes", "on"):
            return True
        return not self.pattern.match(record.getMessage())


def quiet_third_party_noise() -> None:
    """Install every filter above (once per process; calling it again adds nothing). Logger filters are set on
    the libraries' named loggers before they are imported: ``logging.getLogger`` hands them the same objects."""
    for category, message, module, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for noise in LOGGED:
        logger = logging.getLogger(noise.logger)
        if not any(isinstance(each, DropMessage) and each.noise == noise for each in logger.filters):
            logger.addFilter(DropMessage(noise))


__all__ = ["LOGGED", "WARNINGS", "DropMessage", "LoggedNoise", "quiet_third_party_noise"]
