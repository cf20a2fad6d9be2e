"""`hf-mrp sweep`: a dose-response sweep of MRP over objectives x lambdas x seeds, with controls.

    hf-mrp sweep --objectives margin fisher entropy --lambdas 0.15 0.3 0.6 1.0 --seeds 0 1 2 \\
                 --output_dir outputs/sweep --max_steps 60

Every run is `hf-mrp refine` (`hf_mrp.refine.refine`) with the same pass-through flags (model, data,
MRPConfig / TrainingArguments, --audit_positions, --holdout; defaults as examples/refine.py), run in
this process one after another. Each seed also gets a control: lambda = 0 (cross-entropy only; the
objective named by --control_objective is carried but has weight 0), with the same data, steps,
adapter and seed, so "net attributable to the objective" = net(run) - net(control of that seed).

Layout of ``--output_dir``:

    sweep_settings.json                      the pass-through settings; a resumed sweep must match them
    baseline/                                the one "before" audit all runs compare against
                                             (as `hf-mrp audit` writes it; computed once)
    runs/control_lam0_seed<S>/               the control of seed S
    runs/<objective>_lam<L>_seed<S>/         one refine output folder per run (adapter, audits, comparison/)
    results.json, results.md                 the dose-response table (results.json is written last)
    flips_vs_lambda.png, margin_change_vs_lambda.png, class_net_vs_lambda.png

Resuming: a run whose ``training_log.json`` (written last by refine) exists is finished and is not redone; any other
run folder is deleted and the run redone from scratch. Running the same command again therefore
finishes an interrupted sweep, and with every run finished only recomputes the results.

Rows: the controls, objective x lambda (entropy on its own grid with --entropy_lambdas), and on request
the W-trainable rows (--head_lambdas: LoRA + trainable lm_head, with their own CE-only controls) and the
targeted rows (--target_lambdas: the objective weighted to --target_classes / --target_buckets).
Every seed audits --audit_blocks blocks (default 64, ~16K positions) unless --audit_positions is given.

Numbers (docs/spec.md, "Before/after audit", "Intervals"): for each row, the mean over seeds, the spread
over seeds (std with ddof = 1, min, max) and a percentile block-bootstrap interval: ``--n_bootstrap``
resamples of the audited BLOCKS with replacement (rng seed ``--bootstrap_seed``, hf_mrp.stats); every run
is resampled with the same blocks and a row's statistic on a resample is the mean over its seeds. Each
non-control row also gets ``vs_control``: run minus the control of its seed for every metric, with a
paired interval (the same resample for both runs) and a t interval of the per-seed differences; and each
fisher lambda is matched with the entropy lambda of the closest median margin change, with the paired
differences fisher - entropy (hf_mrp.sweep_stats).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .errors import MRPUserError
from .ops.gap import fit_gap_law
from .ops.intervals import percentile_interval
from .ops.token_classes import BUCKETS, CLASSES, frequency_bucket, token_class
from .reporting import files
from .reporting.ownership import audit_is_whole, owned_folder, run_is_whole
from .stats import BlockIndex, block_bootstrap_distribution
from .sweep_stats import match_entropy, paired_difference

logger = logging.getLogger(__name__)

CONTROL = "control"
HEAD_BUCKET = "100+"
SETTINGS_FILE = "sweep_settings.json"
RUN_RECORD = "sweep_run.json"
FINISHED_MARKER = Path("training_log.json")  # refine writes it last
PLOTS = {
    "flips": "flips_vs_lambda.png",
    "margin_change": "margin_change_vs_lambda.png",
    "class_net": "class_net_vs_lambda.png",
}
# Flags the sweep sets for each run (flag -> the sweep flag to use instead).
RESERVED_FLAGS = {
    "--mrp_objective": "--objectives (and --control_objective)",
    "--mrp_lambda": "--lambdas",
    "--seed": "--seeds",
    "--push_to_hub": "nothing: a sweep does not push; push a chosen run folder afterwards",
    "--hub_model_id": "nothing: a sweep does not push; push a chosen run folder afterwards",
    "--resume_from_checkpoint": "nothing: rerun the same command; finished runs are kept, unfinished ones redone",
    "--overwrite_output_dir": "a new --output_dir (or delete a run's folder under runs/ to redo it)",
    "--train_lm_head": "--head_lambdas (W-trainable rows, with their own controls)",
    "--mrp_target_classes": "--target_lambdas with --target_classes",
    "--mrp_target_buckets": "--target_lambdas with --target_buckets",
}
HEAD = "head"  # variant: the head W trains too (LoRA + lm_head), with its own CE-only control
TARGET = "target"  # variant: the objective aimed at the targets of --target_classes / --target_buckets
DEFAULT_AUDIT_BLOCKS = 64
# Settings that do not change a run's numbers: a resumed sweep may differ in these.
NEUTRAL_SETTINGS = {
    "output_dir", "logging_dir", "run_name", "seed", "mrp_objective", "mrp_lambda", "audit_batch_size",
    "disable_tqdm", "logging_steps", "logging_first_step", "logging_strategy", "logging_nan_inf_filter",
    "report_to", "log_level", "log_level_replica", "push_to_hub", "hub_model_id", "hub_token",
    "hub_private_repo", "hub_strategy", "save_strategy", "save_steps", "save_total_limit",
    "dataloader_num_workers", "resume_from_checkpoint", "overwrite_output_dir",
}

# (key, table header, format). Per-run numbers first; net_attributable is computed from two runs.
PER_RUN_METRICS = (
    ("median_margin", "median margin", "number"),
    ("median_margin_change", "median margin change", "signed_percent"),
    ("pr_margin_lt_0_5", "Pr(m < 0.5)", "number"),
    ("gap_alpha", "alpha", "number"),
    ("gap_r_squared", "R^2", "r2"),
    ("accuracy", "accuracy", "percent"),
    ("churn", "churn", "percent"),
    ("w2r", "W->R", "count"),
    ("r2w", "R->W", "count"),
    ("flip_ratio", "flip ratio", "ratio"),
    ("net", "net", "count"),
    ("head_share", "head share", "percent"),
    ("structural_share", "structural share", "percent"),
) + tuple((f"net_{label}", label, "count") for label in CLASSES)
ATTRIBUTABLE = ("net_attributable", "net attributable", "signed_count")
METRICS = PER_RUN_METRICS + (ATTRIBUTABLE,)
METRIC_KEYS = tuple(key for key, _, _ in METRICS)
MAIN_TABLE = ("median_margin", "median_margin_change", "pr_margin_lt_0_5", "gap_alpha", "gap_r_squared", "accuracy",
              "churn", "w2r", "r2w", "flip_ratio", "net", "head_share", "structural_share", "net_attributable")
DESCRIPTIONS = {
    "median_margin": "median decision margin after refinement",
    "median_margin_change": "median(m after) / median(m before) - 1",
    "pr_margin_lt_0_5": "share of positions with margin < 0.5, after",
    "gap_alpha": "gap coefficient alpha of eta(eps) = alpha * eps, after",
    "gap_r_squared": "R^2 of the log-log gap fit, after",
    "accuracy": "top-1 accuracy after",
    "churn": "share of positions whose top-1 token changed",
    "w2r": "positions wrong before, right after",
    "r2w": "positions right before, wrong after",
    "flip_ratio": "W->R / R->W (undefined when R->W = 0)",
    "net": "W->R - R->W",
    "head_share": "net of targets counted 100+ times in the audited blocks / net",
    "structural_share": "net of 'structural' targets (punctuation/symbols/whitespace) / net",
    "net_attributable": "net(run) - net(lambda = 0 control of the same seed)",
    **{f"net_{label}": f"net of targets of token class '{label}'" for label in CLASSES},
}


# --------------------------------------------------------------------------------------------------
# Arguments and the plan


@dataclass
class SweepArguments:
    """What `hf-mrp sweep` itself parses; every other flag passes through to each run."""

    output_dir: str = "outputs/sweep"
    objectives: list[str] = field(default_factory=lambda: ["margin", "fisher", "entropy"])
    lambdas: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.6, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_bootstrap: int = 1000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    control_objective: str = "fisher"
    aggregate_only: bool = False
    entropy_lambdas: list[float] | None = None
    head_lambdas: list[float] = field(default_factory=list)
    head_objective: str = "fisher"
    target_lambdas: list[float] = field(default_factory=list)
    target_objective: str = "fisher"
    target_classes: list[str] = field(default_factory=lambda: ["content", "entity"])
    target_buckets: list[str] = field(default_factory=list)
    audit_blocks: int = DEFAULT_AUDIT_BLOCKS

    def __post_init__(self) -> None:
        from .ops import OBJECTIVES
        from .ops.targeting import check_targets

        self.objectives = list(dict.fromkeys(self.objectives))
        self.seeds = [int(seed) for seed in dict.fromkeys(self.seeds)]
        for name in self.objectives + [self.control_objective, self.head_objective, self.target_objective]:
            if name not in OBJECTIVES:
                raise MRPUserError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
        self.lambdas = _positive_lambdas(self.lambdas, "--lambdas")
        if self.entropy_lambdas is not None:
            self.entropy_lambdas = _positive_lambdas(self.entropy_lambdas, "--entropy_lambdas")
        self.head_lambdas = _positive_lambdas(self.head_lambdas, "--head_lambdas")
        self.target_lambdas = _positive_lambdas(self.target_lambdas, "--target_lambdas")
        if not self.objectives or not self.lambdas or not self.seeds:
            raise MRPUserError("a sweep needs at least one objective, one lambda > 0 and one seed")
        try:
            check_targets(self.target_classes, self.target_buckets)
        except ValueError as error:
            raise MRPUserError(f"{error} (--target_classes / --target_buckets)") from None
        if self.target_lambdas and not (self.target_classes or self.target_buckets):
            raise MRPUserError("--target_lambdas needs --target_classes or --target_buckets (what to aim at)")
        if self.audit_blocks < 1:
            raise MRPUserError(f"audit_blocks must be positive, got {self.audit_blocks}")
        if self.n_bootstrap < 0:
            raise MRPUserError(f"n_bootstrap must be >= 0 (0: no confidence intervals), got {self.n_bootstrap}")
        if not 0 < self.confidence < 1:
            raise MRPUserError(f"confidence must be between 0 and 1, got {self.confidence}")


def _positive_lambdas(values, flag: str) -> list[float]:
    lambdas = [float(lam) for lam in dict.fromkeys(float(lam) for lam in values)]
    bad = [lam for lam in lambdas if not (np.isfinite(lam) and lam >= 0)]
    if bad:
        raise MRPUserError(f"{flag} must be finite and >= 0, got {bad}")
    if 0.0 in lambdas:
        logger.warning("lambda 0 is the control every seed gets; dropping it from %s", flag)
    return sorted(lam for lam in lambdas if lam > 0)


class RunSpec(NamedTuple):
    name: str
    objective: str  # the row it belongs to: an objective, or "control"
    lam: float
    seed: int
    train_objective: str  # what --mrp_objective gets (the control's objective has weight 0)
    variant: str = ""  # "", HEAD or TARGET
    flags: tuple[str, ...] = ()  # extra refine flags of the variant

    @property
    def control(self) -> bool:
        return self.objective == CONTROL


def format_lambda(lam: float) -> str:
    """Shortest exact decimal: 0.15, 1, 0.00001 (folder names, tables)."""
    return np.format_float_positional(float(lam), trim="-")


def run_name(objective: str, lam: float, seed: int, variant: str = "") -> str:
    return f"{objective}{'_' + variant if variant else ''}_lam{format_lambda(lam)}_seed{seed}"


def variant_flags(args: SweepArguments, variant: str) -> tuple[str, ...]:
    """The refine flags that make a run of ``variant``."""
    if variant == HEAD:
        return ("--train_lm_head", "true")
    if variant == TARGET:
        return (("--mrp_target_classes", *args.target_classes) if args.target_classes else ()) + \
               (("--mrp_target_buckets", *args.target_buckets) if args.target_buckets else ())
    return ()


def control_name(spec: RunSpec) -> str:
    """The control of a run: CE only, same seed and adapter scope (a targeted run's is the plain control: at
    lambda 0 the objective weights change nothing)."""
    return run_name(CONTROL, 0.0, spec.seed, HEAD if spec.variant == HEAD else "")


def plan_runs(args: SweepArguments) -> list[RunSpec]:
    """Seed by seed (a whole dose-response curve per seed early): the control(s), then objective x lambda,
    then the W-trainable and targeted rows."""
    plan = []
    for seed in args.seeds:
        plan.append(RunSpec(run_name(CONTROL, 0.0, seed), CONTROL, 0.0, seed, args.control_objective))
        if args.head_lambdas:
            plan.append(RunSpec(run_name(CONTROL, 0.0, seed, HEAD), CONTROL, 0.0, seed, args.control_objective,
                                HEAD, variant_flags(args, HEAD)))
        for objective in args.objectives:
            lambdas = args.entropy_lambdas if objective == "entropy" and args.entropy_lambdas else args.lambdas
            for lam in lambdas:
                plan.append(RunSpec(run_name(objective, lam, seed), objective, lam, seed, objective))
        for variant, objective, lambdas in ((HEAD, args.head_objective, args.head_lambdas),
                                            (TARGET, args.target_objective, args.target_lambdas)):
            for lam in lambdas:
                plan.append(RunSpec(run_name(objective, lam, seed, variant), objective, lam, seed, objective,
                                    variant, variant_flags(args, variant)))
    return plan


def build_parser() -> argparse.ArgumentParser:
    from .parser import MRPArgumentParser

    defaults = SweepArguments()
    parser = MRPArgumentParser(
        prog="hf-mrp sweep", allow_abbrev=False,
        description="Dose-response sweep: objectives x lambdas x seeds, each seed with a lambda = 0 control "
                    "(cross-entropy only), one shared baseline audit, resumable.",
        epilog="Every other flag (model, data, --audit_positions, --holdout, MRPConfig / TrainingArguments such "
               "as --max_steps, --lora_layers, --learning_rate, --block_size) passes through to every run, with "
               "the defaults of examples/refine.py; `hf-mrp refine --help` lists them.",
    )
    parser.add_argument("--output_dir", default=defaults.output_dir, help="the sweep folder (default %(default)s)")
    parser.add_argument("--objectives", nargs="+", default=defaults.objectives, metavar="OBJ",
                        help="objectives: margin, fisher, entropy (default: %(default)s)")
    parser.add_argument("--lambdas", nargs="+", type=float, default=defaults.lambdas, metavar="L",
                        help="objective weights > 0; the lambda = 0 control is always added (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds, metavar="S",
                        help="training seeds (default: %(default)s)")
    parser.add_argument("--n_bootstrap", type=int, default=defaults.n_bootstrap,
                        help="bootstrap resamples of the positions for the confidence intervals; 0: none "
                             "(default %(default)s)")
    parser.add_argument("--confidence", type=float, default=defaults.confidence,
                        help="confidence level of the intervals (default %(default)s)")
    parser.add_argument("--bootstrap_seed", type=int, default=defaults.bootstrap_seed,
                        help="rng seed of the bootstrap (default %(default)s)")
    parser.add_argument("--control_objective", default=defaults.control_objective,
                        help="objective name the control carries at weight 0 (MRPConfig needs one; the loss is "
                             "plain cross-entropy either way) (default %(default)s)")
    parser.add_argument("--aggregate_only", action="store_true",
                        help="train nothing: recompute the results from the runs already finished")
    parser.add_argument("--entropy_lambdas", nargs="+", type=float, default=None, metavar="L",
                        help="entropy's own lambda grid (default: --lambdas); the report matches each fisher lambda "
                             "with the entropy lambda of the closest median margin change")
    parser.add_argument("--head_lambdas", nargs="+", type=float, default=[], metavar="L",
                        help="rows with the head W trainable too (--train_lm_head: LoRA + lm_head) at these lambdas, "
                             "each seed with its own CE-only control of the same scope (default: none)")
    parser.add_argument("--head_objective", default=defaults.head_objective,
                        help="objective of the W-trainable rows (default %(default)s)")
    parser.add_argument("--target_lambdas", nargs="+", type=float, default=[], metavar="L",
                        help="targeted rows: the objective weighted to the targets of --target_classes / "
                             "--target_buckets, at these lambdas (default: none)")
    parser.add_argument("--target_objective", default=defaults.target_objective,
                        help="objective of the targeted rows (default %(default)s)")
    parser.add_argument("--target_classes", nargs="*", default=defaults.target_classes, metavar="CLASS",
                        help=f"token classes the targeted rows aim at ({', '.join(CLASSES)}; default %(default)s)")
    parser.add_argument("--target_buckets", nargs="*", default=defaults.target_buckets, metavar="BUCKET",
                        help=f"frequency buckets the targeted rows aim at ({', '.join(BUCKETS)}; default: any)")
    parser.add_argument("--audit_blocks", type=int, default=defaults.audit_blocks,
                        help="blocks audited before/after every run, unless --audit_positions is passed "
                             "(default %(default)s: about 16K positions at --block_size 256)")
    return parser


def parse_sweep_arguments(argv: Sequence[str]) -> tuple[SweepArguments, list[str]]:
    """(the sweep's own arguments, the flags passed through to every run)."""
    namespace, rest = build_parser().parse_known_args(list(argv))
    for token in rest:
        flag = token.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise MRPUserError(f"{flag} is set by the sweep for each run; use {RESERVED_FLAGS[flag]}")
    return SweepArguments(**vars(namespace)), rest


def with_audit_blocks(refine_argv: Sequence[str], audit_blocks: int) -> list[str]:
    """``refine_argv`` plus ``--audit_positions`` for ``audit_blocks`` whole blocks, unless it is set already."""
    argv = list(refine_argv)
    if any(token.split("=", 1)[0] == "--audit_positions" for token in argv):
        return argv
    from .commands.refine import parse_arguments

    block_size = parse_arguments(argv)[1].block_size
    return argv + ["--audit_positions", str(audit_blocks * (block_size - 1))]


def parse_run_arguments(refine_argv: Sequence[str], output_dir: str | Path, objective: str, lam: float, seed: int):
    """The four argument groups of one run, exactly as `hf-mrp refine` would parse them."""
    from .commands.refine import parse_arguments

    argv = list(refine_argv) + ["--output_dir", str(output_dir), "--mrp_objective", objective,
                                "--mrp_lambda", repr(float(lam)), "--seed", str(seed)]
    try:
        return parse_arguments(argv)
    except MRPUserError:
        raise
    except ValueError as error:  # unknown flags, bad TrainingArguments values
        raise MRPUserError(f"invalid flags for the runs: {str(error).splitlines()[0]}") from error


# --------------------------------------------------------------------------------------------------
# Settings, baseline, runs


def run_settings(model_args, data_args, refine_args, config) -> dict:
    """The pass-through settings that change a run's numbers (JSON-normalized)."""
    settings = {}
    for group in (model_args, data_args, refine_args):
        settings.update(dataclasses.asdict(group))
    settings.update(config.to_dict())
    settings = {key: value for key, value in settings.items() if key not in NEUTRAL_SETTINGS}
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def check_settings(sweep_dir: Path, settings: dict) -> None:
    """Refuse to resume a sweep with settings that would change its runs' numbers."""
    path = sweep_dir / SETTINGS_FILE
    if not path.is_file():
        return
    saved = files.read_json(path)["settings"]
    differences = [
        f"{key}: {saved.get(key)!r} -> {settings.get(key)!r}"
        for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)
    ]
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise MRPUserError(
            f"{sweep_dir} holds a sweep made with other run settings ({shown}); pass the same flags to resume it, "
            f"or a new --output_dir"
        )


def record_settings(sweep_dir: Path, settings: dict, command: str) -> None:
    """Written once the baseline exists (a first call that fails earlier may be retried with other flags)."""
    path = sweep_dir / SETTINGS_FILE
    if not path.is_file():
        files.write_json(path, {"command": command, "settings": settings})


def ensure_baseline(baseline_dir: Path, model_args, data_args, refine_args, config):
    """(tokenizer, baseline audit): the shared "before" audit, computed once into ``baseline_dir``.

    The model is audited the way a run's MRPAuditCallback audits it at train begin: LoRA-wrapped
    (the zero-initialized adapter changes no output; 4-bit models get the same k-bit preparation),
    on the trainer's device.
    """
    from .audit.geometry import load_audit, run_audit
    from .arguments import provenance
    from .models import load_tokenizer
    from .refine import refine_blocks

    if audit_is_whole(baseline_dir):  # a baseline whose files do not read back is computed again
        tokenizer = load_tokenizer(model_args.model, model_args.gguf_file, model_args.trust_remote_code)
        blocks = refine_blocks(tokenizer, data_args, refine_args)[0]
        baseline = load_audit(baseline_dir)
        if baseline.blocks.fingerprint() != blocks.fingerprint():
            raise MRPUserError(
                f"the baseline audit in {baseline_dir} is of other positions than these flags give (the data "
                f"changed?); pass a new --output_dir, or delete {baseline_dir} and every run under runs/"
            )
        print(f"baseline: reusing {baseline_dir} ({baseline.summary['n_positions']} positions)", flush=True)
        return tokenizer, baseline

    from .models import load_model_from_arguments
    from .training.adapters import prepare_model

    shutil.rmtree(baseline_dir, ignore_errors=True)  # an interrupted audit (no audit.json) starts over
    model, tokenizer, model_name = load_model_from_arguments(model_args)
    blocks = refine_blocks(tokenizer, data_args, refine_args)[0]
    print(f"baseline: auditing {blocks.n_positions} positions -> {baseline_dir}", flush=True)
    model = prepare_model(model, config)
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        model = model.to(config.device)
    start = time.perf_counter()
    baseline = run_audit(
        model, blocks, output_dir=baseline_dir, batch_size=refine_args.audit_batch_size,
        chunk_size=config.mrp_chunk_size, provenance=provenance(model_name, model_args, data_args, refine_args),
        progress=False,
    )
    print(f"baseline: done in {time.perf_counter() - start:.1f}s", flush=True)
    del model
    _free_memory()
    return tokenizer, baseline


def is_finished(run_dir: Path) -> bool:
    """Finished and readable: a run whose files do not read back counts as unfinished and is redone."""
    return run_is_whole(run_dir)


def execute_run(spec: RunSpec, refine_argv: Sequence[str], run_dir: Path, baseline_dir: Path) -> float:
    """One refinement, from scratch, into ``run_dir``; returns its wall time in seconds."""
    from .refine import refine

    model_args, data_args, refine_args, config = parse_run_arguments(
        list(refine_argv) + list(spec.flags), run_dir, spec.train_objective, spec.lam, spec.seed
    )
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    refine(model_args, data_args, refine_args, config, baseline_dir=baseline_dir)
    seconds = time.perf_counter() - start
    if (run_dir / "audit_before").exists():
        logger.warning("%s audited its own baseline instead of reusing %s (other blocks?)", run_dir, baseline_dir)
    files.write_json(run_dir / RUN_RECORD, {**spec._asdict(), "lambda": spec.lam, "seconds": seconds})
    _free_memory()
    return seconds


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------------------------------
# Per-position data and statistics


@dataclass
class Shared:
    """What every run of the sweep shares: the baseline's per-position columns and target groups."""

    margin_before: np.ndarray
    correct_before: np.ndarray
    top1_before: np.ndarray
    head: np.ndarray  # target counted 100+ times in the audited blocks
    class_code: np.ndarray  # index into CLASSES of the decoded target
    block: np.ndarray  # the audited block of each position (the bootstrap resamples whole blocks)

    @property
    def n(self) -> int:
        return int(self.margin_before.size)


@dataclass
class RunData:
    spec: RunSpec
    margin_after: np.ndarray
    correct_after: np.ndarray
    changed: np.ndarray  # top-1 token changed
    flip: np.ndarray  # +1 W->R, -1 R->W, 0 otherwise (int8)
    record: dict  # steps, seconds, the run's own flip_audit.json headline


def shared_positions(baseline, tokenizer) -> Shared:
    from .audit.compare import decoder_from_tokenizer

    positions = baseline.positions
    target = np.asarray(positions["target_id"], dtype=np.int64)
    counts = np.bincount(np.asarray(baseline.blocks.input_ids, dtype=np.int64).ravel(), minlength=int(target.max()) + 1)
    decode = decoder_from_tokenizer(tokenizer)
    ids, inverse = np.unique(target, return_inverse=True)
    codes = np.asarray([CLASSES.index(token_class(decode(int(token)))) for token in ids], dtype=np.int64)
    return Shared(
        margin_before=np.asarray(positions["margin"], dtype=np.float64),
        correct_before=np.asarray(positions["correct"]).astype(bool),
        top1_before=np.asarray(positions["top1_id"], dtype=np.int64),
        head=frequency_bucket(counts[target]) == HEAD_BUCKET,
        class_code=codes[inverse.reshape(-1)],
        block=np.asarray(positions["block"], dtype=np.int64),
    )


def load_run(spec: RunSpec, run_dir: Path, baseline, shared: Shared) -> RunData:
    from .audit.compare import check_same_positions
    from .audit.geometry import load_audit

    after = load_audit(run_dir / "audit_after")
    check_same_positions(baseline, after)
    correct_after = np.asarray(after.positions["correct"]).astype(bool)
    flip = (~shared.correct_before & correct_after).astype(np.int8) - (shared.correct_before & ~correct_after)
    log = run_dir / "training_log.json"
    steps = max((int(entry.get("step", 0)) for entry in files.read_json(log)), default=0) if log.is_file() else None
    seconds = files.read_json(run_dir / RUN_RECORD).get("seconds") if (run_dir / RUN_RECORD).is_file() else None
    return RunData(
        spec=spec,
        margin_after=np.asarray(after.positions["margin"], dtype=np.float64),
        correct_after=correct_after,
        changed=np.asarray(after.positions["top1_id"], dtype=np.int64) != shared.top1_before,
        flip=flip.astype(np.int8),
        record={"steps": steps, "seconds": seconds, "flip_audit": files.read_json(run_dir / "comparison" / "flip_audit.json")},
    )


def _divide(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def run_statistics(runs: Sequence[RunData], shared: Shared, index: np.ndarray | None = None) -> np.ndarray:
    """[runs, PER_RUN_METRICS] for the positions ``index`` (a bootstrap resample; None: all positions)."""
    pick = slice(None) if index is None else index
    median_before = float(np.median(shared.margin_before[pick]))
    head, codes = shared.head[pick], shared.class_code[pick]
    table = np.empty((len(runs), len(PER_RUN_METRICS)))
    for row, run in enumerate(runs):
        margin, flip = run.margin_after[pick], run.flip[pick]
        w2r, r2w = float(np.count_nonzero(flip == 1)), float(np.count_nonzero(flip == -1))
        net = w2r - r2w
        median = float(np.median(margin))
        fit = fit_gap_law(margin)
        class_net = np.bincount(codes, weights=flip, minlength=len(CLASSES))
        table[row] = (
            median,
            _divide(median, median_before) - 1.0 if median_before else float("nan"),
            float(np.mean(margin < 0.5)),
            fit.alpha,
            fit.r_squared,
            float(np.mean(run.correct_after[pick])),
            float(np.mean(run.changed[pick])),
            w2r,
            r2w,
            _divide(w2r, r2w),
            net,
            _divide(float(flip[head].sum()), net),
            _divide(float(class_net[CLASSES.index("structural")]), net),
            *class_net,
        )
    return table


def with_attributable(table: np.ndarray, control_of: np.ndarray) -> np.ndarray:
    """Append net(run) - net(control of its seed) to [..., runs, PER_RUN_METRICS] (NaN: control or none)."""
    net = table[..., METRIC_KEYS.index("net")]
    padded = np.concatenate([net, np.full(net.shape[:-1] + (1,), np.nan)], axis=-1)  # index -1: no control
    attributable = net - padded[..., control_of]
    return np.concatenate([table, attributable[..., None]], axis=-1)


def row_means(table: np.ndarray, members: Sequence[Sequence[int]]) -> np.ndarray:
    """[..., rows, METRICS]: the mean over each row's runs (seeds), ignoring undefined values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every seed stays NaN
        return np.stack([np.nanmean(table[..., list(m), :], axis=-2) for m in members], axis=-2)


# --------------------------------------------------------------------------------------------------
# Aggregation


def _number(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _spread(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {
        "std": _number(np.std(finite, ddof=1)) if finite.size > 1 else None,
        "min": _number(finite.min()) if finite.size else None,
        "max": _number(finite.max()) if finite.size else None,
    }


def _row_keys(args: SweepArguments) -> list[tuple[str, float, str]]:
    """(objective, lambda, variant) of every row, in report order."""
    keys = [(CONTROL, 0.0, "")] + ([(CONTROL, 0.0, HEAD)] if args.head_lambdas else [])
    for objective in args.objectives:
        lambdas = args.entropy_lambdas if objective == "entropy" and args.entropy_lambdas else args.lambdas
        keys += [(objective, lam, "") for lam in lambdas]
    keys += [(args.head_objective, lam, HEAD) for lam in args.head_lambdas]
    keys += [(args.target_objective, lam, TARGET) for lam in args.target_lambdas]
    return keys


def aggregate(args: SweepArguments, plan: Sequence[RunSpec], sweep_dir: Path, baseline, tokenizer) -> dict:
    """Rows, runs and baseline numbers of the finished runs of ``plan`` (see results.json)."""
    shared = shared_positions(baseline, tokenizer)
    finished = [spec for spec in plan if is_finished(sweep_dir / "runs" / spec.name)]
    runs = [load_run(spec, sweep_dir / "runs" / spec.name, baseline, shared) for spec in finished]
    if not runs:
        raise MRPUserError(f"no finished runs in {sweep_dir / 'runs'} to aggregate; run the sweep without "
                           "--aggregate_only")
    position = {run.spec.name: i for i, run in enumerate(runs)}
    control_of = np.asarray([-1 if run.spec.control else position.get(control_name(run.spec), -1) for run in runs])
    row_keys = _row_keys(args)
    members = [[position[s.name] for s in finished if (s.objective, s.lam, s.variant) == key] for key in row_keys]
    row_keys, members = zip(*[(key, m) for key, m in zip(row_keys, members) if m])

    point_runs = with_attributable(run_statistics(runs, shared), control_of)
    point_rows = row_means(point_runs, members)
    blocks = BlockIndex.from_labels(shared.block)
    distribution = None
    if args.n_bootstrap:
        start = time.perf_counter()
        distribution = with_attributable(block_bootstrap_distribution(
            lambda index: run_statistics(runs, shared, index), blocks, args.n_bootstrap, args.bootstrap_seed
        ), control_of)
        low, high = percentile_interval(row_means(distribution, members), args.confidence)
        print(f"results: {args.n_bootstrap} block-bootstrap resamples of {blocks.n_blocks} blocks "
              f"({shared.n} positions) x {len(runs)} runs in {time.perf_counter() - start:.1f}s", flush=True)
    else:
        low = high = np.full(point_rows.shape, np.nan)

    def paired(pairs: list[tuple[int, int]]) -> dict:
        return paired_difference(point_runs, distribution, pairs, METRIC_KEYS, [runs[a].spec.seed for a, _ in pairs],
                                 args.confidence)

    rows = []
    for r, ((objective, lam, variant), member) in enumerate(zip(row_keys, members)):
        metrics = {}
        for k, key in enumerate(METRIC_KEYS):
            per_seed = point_runs[list(member), k]
            if key == "net_attributable" and objective == CONTROL:
                metrics[key] = None
                continue
            has_ci = np.isfinite(low[r, k]) and np.isfinite(high[r, k])
            metrics[key] = {
                "mean": _number(point_rows[r, k]),
                **_spread(per_seed),
                "ci": [float(low[r, k]), float(high[r, k])] if has_ci else None,
                "per_seed": {str(runs[i].spec.seed): _number(v) for i, v in zip(member, per_seed)},
            }
        pairs = [(i, int(control_of[i])) for i in member if control_of[i] >= 0]
        rows.append({
            "objective": objective, "lambda": lam, "variant": variant, "control": objective == CONTROL,
            "label": row_label(objective, lam, variant, args),
            "seeds": [runs[i].spec.seed for i in member], "runs": [runs[i].spec.name for i in member],
            "metrics": metrics,
            "vs_control": paired(pairs) if pairs and objective != CONTROL else None,
        })
    matches = match_entropy(rows)
    for match in matches:
        by_seed = {key: {runs[i].spec.seed: i for i in m} for key, m in zip(row_keys, members)}
        fisher = by_seed[("fisher", match["reference_lambda"], "")]
        entropy = by_seed[("entropy", match["entropy_lambda"], "")]
        pairs = [(fisher[seed], entropy[seed]) for seed in sorted(set(fisher) & set(entropy))]
        match["fisher_minus_entropy"] = paired(pairs) if pairs else None  # None: no seed has both runs
    run_entries = []
    for i, run in enumerate(runs):
        flip_audit = run.record["flip_audit"]
        run_entries.append({
            "name": run.spec.name, "objective": run.spec.objective, "train_objective": run.spec.train_objective,
            "lambda": run.spec.lam, "seed": run.spec.seed, "control": run.spec.control,
            "dir": f"runs/{run.spec.name}", "steps": run.record["steps"], "seconds": run.record["seconds"],
            "variant": run.spec.variant, "flags": list(run.spec.flags),
            "control_run": None if run.spec.control else control_name(run.spec),
            "metrics": {key: _number(point_runs[i, k]) for k, key in enumerate(METRIC_KEYS)},
            "flip_audit": {key: flip_audit.get(key) for key in ("w2r", "r2w", "net", "flip_ratio", "churn",
                                                                 "median_margin_change", "head_share")},
        })
    summary = baseline.summary
    return {
        "rows": rows,
        "entropy_matched": matches,
        "runs": run_entries,
        "missing_runs": [spec.name for spec in plan if spec not in finished],
        "baseline": {
            "dir": "baseline",
            "n_positions": summary["n_positions"],
            "accuracy": summary["accuracy"],
            "median_margin": summary["margin_percentiles"]["p50"],
            "pr_margin_lt_0_5": summary["fraction_margin_lt_0_5"],
            "gap_alpha": summary["gap_fit"].get("alpha"),
            "gap_r_squared": summary["gap_fit"].get("r_squared"),
            "blocks_sha256": summary["provenance"].get("blocks_sha256"),
            "model": summary["provenance"].get("model"),
        },
    }


# --------------------------------------------------------------------------------------------------
# Reports


def _fmt(value, kind: str) -> str:
    from .reporting.markdown import fmt_number, fmt_percent

    if value is None or not np.isfinite(value):
        return "n/a"
    if kind in ("count", "signed_count"):
        sign = "+" if kind == "signed_count" else ""
        return f"{value:{sign},.0f}" if float(value).is_integer() else f"{value:{sign},.1f}"
    if kind == "percent":
        return fmt_percent(value)
    if kind == "signed_percent":
        return fmt_percent(value, signed=True)
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "r2":
        return fmt_number(value, 4)
    return fmt_number(value)


KINDS = {key: kind for key, _, kind in METRICS}
HEADERS = {key: header for key, header, _ in METRICS}


def _cell_ci(entry: dict | None, key: str) -> str:
    if entry is None:
        return "-"
    text = _fmt(entry["mean"], KINDS[key])
    if entry.get("ci"):
        text += f" [{_fmt(entry['ci'][0], KINDS[key])}, {_fmt(entry['ci'][1], KINDS[key])}]"
    return text


def _cell_spread(entry: dict | None, key: str) -> str:
    """std over seeds; min to max. A std of counts keeps one decimal; of shares, percentage points."""
    if entry is None:
        return "-"
    kind = KINDS[key]
    if entry["std"] is None:
        std = "n/a"
    elif kind in ("count", "signed_count"):
        std = f"{entry['std']:,.1f}"
    elif kind in ("percent", "signed_percent"):
        std = f"{100 * entry['std']:.1f} pp"
    else:
        std = _fmt(entry["std"], kind)
    return f"{std}; {_fmt(entry['min'], kind)} to {_fmt(entry['max'], kind)}"


def row_label(objective: str, lam: float, variant: str, args: SweepArguments) -> str:
    """How a row is named in reports: 'fisher', 'control (CE only, W trainable)', 'fisher (targeted: content, ...)'."""
    name = "control (CE only" if objective == CONTROL else objective
    detail = {HEAD: "W trainable",
              TARGET: "targeted: " + ", ".join(list(args.target_classes) + list(args.target_buckets))}.get(variant)
    if objective == CONTROL:
        return name + (f", {detail})" if detail else ")")
    return name + (f" ({detail})" if detail else "")


def _row_label(row: dict) -> list[str]:
    from .reporting.markdown import escape_cell

    return [escape_cell(row["label"]), format_lambda(row["lambda"])]


def _fmt_diff(value, key: str) -> str:
    """A difference of two runs' metric: signed counts, percentage points for shares, signed numbers."""
    if value is None or not np.isfinite(value):
        return "n/a"
    kind = KINDS[key]
    if kind in ("count", "signed_count"):
        return _fmt(value, "signed_count")
    if kind in ("percent", "signed_percent"):
        return f"{100 * value:+.2f} pp"
    return f"{value:+.4g}"


def _cell_paired(entry: dict | None, key: str) -> str:
    """mean [paired block-bootstrap CI] {seed t CI}."""
    if entry is None:
        return "-"
    text = _fmt_diff(entry["mean"], key)
    if entry.get("ci"):
        text += f" [{_fmt_diff(entry['ci'][0], key)}, {_fmt_diff(entry['ci'][1], key)}]"
    if entry.get("seed_ci"):
        text += f" {{{_fmt_diff(entry['seed_ci'][0], key)}, {_fmt_diff(entry['seed_ci'][1], key)}}}"
    return text


PAIRED_TABLE = ("net", "w2r", "r2w", "accuracy", "median_margin_change", "median_margin", "churn", "structural_share")


def markdown_report(results: dict) -> str:
    from .reporting.markdown import escape_cell, fmt_count, fmt_number, fmt_percent, table

    base, pos, boot = results["baseline"], results["positions"], results["bootstrap"]
    rows = results["rows"]
    confidence = f"{boot['confidence']:.0%}"
    held = ("held out from training (--holdout true: training used the blocks after them)" if pos["holdout"]
            else "also part of the training data (--holdout false)")
    steps = sorted({run["steps"] for run in results["runs"] if run["steps"] is not None})
    training = results["training"]
    adapter = (f"LoRA r={training['lora_r']} on layers {training['lora_layers'] or 'all'}" if training["use_lora"]
               else "full weights (no LoRA)")
    parts = [
        "# MRP dose-response sweep",
        f"Model: {escape_cell(str(base['model']))}. Objectives: {', '.join(results['objectives'])}; "
        f"lambdas: {', '.join(format_lambda(v) for v in results['lambdas'])}; seeds: "
        f"{', '.join(str(s) for s in results['seeds'])}; each seed has a control at lambda = 0 (cross-entropy "
        f"only: same data, steps, adapter and seed; objective '{results['control']['objective']}' at weight 0).",
        f"Audited positions: {fmt_count(pos['n'])} (the first {fmt_count(pos['n'])} positions of the data, in "
        f"blocks of {pos['block_size']} tokens; blocks sha256 {str(pos['blocks_sha256'])[:12]}), {held}. The same "
        f"positions are audited before (one shared baseline audit, `baseline/`) and after every run.",
        f"Training: {training['max_steps']} steps per run (trained: {', '.join(str(s) for s in steps) or 'n/a'}), "
        f"batch {training['per_device_train_batch_size']} x {training['gradient_accumulation_steps']} x "
        f"{training['block_size']} tokens, learning rate {training['learning_rate']}, {adapter}.",
        f"Baseline: accuracy {fmt_percent(base['accuracy'], 2)}, median margin {fmt_number(base['median_margin'])}, "
        f"Pr(m < 0.5) {fmt_number(base['pr_margin_lt_0_5'])}, alpha {fmt_number(base['gap_alpha'])}, "
        f"R^2 {fmt_number(base['gap_r_squared'], 4)}.",
        "Command:",
        f"```\n{results['command']}\n```",
    ]
    if results["missing_runs"]:
        parts.append(f"**Not finished (left out):** {', '.join(results['missing_runs'])}.")
    ci_note = (f"brackets: block-bootstrap {confidence} CI ({boot['n_resamples']} resamples of the "
               f"{pos['n_blocks']} audited blocks with replacement, every position of a drawn block kept, rng seed "
               f"{boot['seed']}; each seed resampled with the same blocks, then averaged)"
               if boot["n_resamples"] else "no bootstrap (--n_bootstrap 0)")
    paired_rows = [r for r in rows if r.get("vs_control")]
    header = ["objective", "lambda", "seeds"] + [HEADERS[key] for key in MAIN_TABLE]
    parts += [
        "## Dose-response",
        f"Mean over seeds; {ci_note}. Net attributable = net(run) - net(control of the same seed).",
        table(header, [_row_label(r) + [str(len(r["seeds"]))] + [_cell_ci(r["metrics"][k], k) for k in MAIN_TABLE]
                       for r in rows]),
        "## Spread over seeds",
        "Standard deviation over seeds (ddof = 1; n/a with one seed); min to max.",
        table(header, [_row_label(r) + [str(len(r["seeds"]))] + [_cell_spread(r["metrics"][k], k) for k in MAIN_TABLE]
                       for r in rows]),
        "## Net corrections by token class of the target",
        f"Net = W->R - R->W of the targets of each class. Mean over seeds; bootstrap {confidence} CI in brackets.",
        table(["objective", "lambda"] + list(CLASSES),
              [_row_label(r) + [_cell_ci(r["metrics"][f"net_{c}"], f"net_{c}") for c in CLASSES] for r in rows]),
        "## Against the control (paired)",
        f"Run minus the CE-only control of the same seed and adapter scope, mean over seeds; [paired "
        f"block-bootstrap {confidence} CI: both runs on the same resampled blocks]; {{t {confidence} CI of the "
        f"per-seed differences, with n - 1 degrees of freedom; absent with one seed}}. Shares in percentage points.",
        table(["row", "lambda"] + [HEADERS[key] for key in PAIRED_TABLE],
              [_row_label(r) + [_cell_paired(r["vs_control"][k], k) for k in PAIRED_TABLE] for r in paired_rows])
        if paired_rows else "(no run with a finished control)",
        "## Attributable net by token class of the target",
        "net(class) of the run minus net(class) of its control; intervals as above. Classes are the paper's "
        "(docs/spec.md, Token breakdowns).",
        table(["row", "lambda"] + list(CLASSES),
              [_row_label(r) + [_cell_paired(r["vs_control"][f"net_{c}"], f"net_{c}") for c in CLASSES]
               for r in paired_rows]) if paired_rows else "(no run with a finished control)",
        "## Next to the paper (same units)",
        _paper_section(results),
        "## Geometry or sharpening: Fisher against entropy at matched strength",
        _entropy_section(results["entropy_matched"], confidence),
        "## Runs",
        table(["run", "seed", "steps", "seconds", "W->R", "R->W", "net", "net attributable", "median margin change",
               "churn"],
              [[escape_cell(run["name"]), str(run["seed"]), str(run["steps"]),
                "n/a" if run["seconds"] is None else f"{run['seconds']:.0f}"]
               + [_fmt(run["metrics"][k], KINDS[k]) for k in ("w2r", "r2w", "net", "net_attributable",
                                                              "median_margin_change", "churn")]
               for run in results["runs"]]),
        "## Plots",
        *[f"![{name}]({file})" for name, file in results["plots"].items()],
        "## Definitions",
        "\n".join(f"- {HEADERS[key]}: {DESCRIPTIONS[key]}" for key in MAIN_TABLE),
    ]
    return "\n\n".join(parts) + "\n"


def _paper_section(results: dict) -> str:
    from .reporting.markdown import table
    from .reporting.paper_reference import PAPER_MODEL, paper_comparison_rows

    rows = paper_comparison_rows(results["rows"], results["positions"]["n"], results["baseline"]["accuracy"])
    if not rows:
        return "No row of this sweep has a published paper number at the same objective and lambda."
    normalization = results["training"].get("mrp_margin_normalization")
    units = ("margin lambdas are in the paper's units (the penalty divided by the gated positions)"
             if normalization in (None, "gated") else
             f"margin lambdas are NOT in the paper's units (mrp_margin_normalization = {normalization})")
    return (f"Paper: {PAPER_MODEL}; its counts as rates per 1,000 positions. Here: mean over seeds [block-bootstrap "
            f"CI]; minus control: the part attributable to the objective [paired CI]. The paper has no control, so "
            f"its numbers compare with 'this sweep', not with the attributable part; {units}.\n\n"
            + table(["objective", "lambda", "quantity", "paper", "this sweep", "minus control"], rows))


def _entropy_section(matches: list[dict], confidence: str) -> str:
    if not matches:
        return ("No match: the sweep has no plain fisher row or no plain entropy row (run entropy on a lambda grid "
                "with --entropy_lambdas).")
    text = ("For each fisher lambda, the entropy lambda (from its grid) whose median margin change, mean over seeds, "
            "is closest; then fisher minus entropy per seed on the same resampled blocks [paired block-bootstrap "
            f"{confidence} CI] {{t CI over seeds}}. A difference that excludes 0 is what geometry adds over "
            "sharpening of equal strength.")
    keys = ("net", "w2r", "r2w", "accuracy", "churn")
    rows = [[format_lambda(m["reference_lambda"]), _fmt(m["reference_value"], "signed_percent"),
             format_lambda(m["entropy_lambda"]), _fmt(m["entropy_value"], "signed_percent")]
            + [_cell_paired((m["fisher_minus_entropy"] or {}).get(k), k) for k in keys] for m in matches]
    from .reporting.markdown import table

    header = ["fisher lambda", "its median margin change", "entropy lambda", "its median margin change"]
    return text + "\n\n" + table(header + [f"fisher - entropy: {HEADERS[k]}" for k in keys], rows)


def write_plots(sweep_dir: Path, results: dict) -> dict[str, str]:
    from .reporting import sweep_plots

    rows = [row for row in results["rows"] if not row.get("variant")]  # the plain dose-response curves
    confidence = results["bootstrap"]["confidence"]
    objectives = [o for o in results["objectives"] if any(r["objective"] == o for r in rows)] or [CONTROL]
    sweep_plots.plot_flips_vs_lambda(sweep_dir / PLOTS["flips"], rows, objectives, confidence)
    sweep_plots.plot_margin_change_vs_lambda(sweep_dir / PLOTS["margin_change"], rows, objectives, confidence)
    sweep_plots.plot_class_net_vs_lambda(sweep_dir / PLOTS["class_net"], rows, objectives, CLASSES, confidence)
    return dict(PLOTS)


# --------------------------------------------------------------------------------------------------
# The sweep


def run_sweep(args: SweepArguments, refine_argv: Sequence[str] = (), command: str | None = None) -> dict:
    """Run (or resume) the sweep and write results.json, results.md and the plots; returns the results."""
    command = command or "hf-mrp sweep " + shlex.join(_own_flags(args) + list(refine_argv))
    refine_argv = with_audit_blocks(refine_argv, args.audit_blocks)
    baseline_dir = Path(args.output_dir) / "baseline"
    plan = plan_runs(args)
    model_args, data_args, refine_args, config = parse_run_arguments(  # bad flags fail here, before any work
        refine_argv, baseline_dir, args.control_objective, 0.0, args.seeds[0]
    )
    sweep_dir = files.ensure_output_dir(args.output_dir)
    with owned_folder(sweep_dir, command):  # one sweep at a time per folder
        groups = (model_args, data_args, refine_args, config)
        return _run_owned_sweep(args, refine_argv, command, plan, sweep_dir, groups)


def _run_owned_sweep(args: SweepArguments, refine_argv, command: str, plan, sweep_dir: Path, groups) -> dict:
    model_args, data_args, refine_args, config = groups
    runs_dir, baseline_dir = sweep_dir / "runs", sweep_dir / "baseline"
    settings = run_settings(model_args, data_args, refine_args, config)
    check_settings(sweep_dir, settings)
    tokenizer, baseline = ensure_baseline(baseline_dir, model_args, data_args, refine_args, config)
    record_settings(sweep_dir, settings, command)

    executed = []
    for number, spec in enumerate(plan, 1):
        run_dir = runs_dir / spec.name
        if is_finished(run_dir):
            print(f"[{number}/{len(plan)}] skipping finished run {spec.name}", flush=True)
            continue
        if args.aggregate_only:
            print(f"[{number}/{len(plan)}] not finished, left out: {spec.name}", flush=True)
            continue
        if run_dir.exists():
            print(f"[{number}/{len(plan)}] redoing unfinished run {spec.name} from scratch", flush=True)
        print(f"[{number}/{len(plan)}] training {spec.name} (objective {spec.train_objective}, lambda "
              f"{format_lambda(spec.lam)}, seed {spec.seed})", flush=True)
        seconds = execute_run(spec, refine_argv, run_dir, baseline_dir)
        executed.append(spec.name)
        print(f"[{number}/{len(plan)}] finished {spec.name} in {seconds:.1f}s", flush=True)

    results = {
        "command": command,
        "objectives": args.objectives,
        "lambdas": args.lambdas,
        "seeds": args.seeds,
        "control": {"objective": args.control_objective, "lambda": 0.0,
                    "runs": [spec.name for spec in plan if spec.control],
                    "note": "cross-entropy only: same data, steps, adapter and seed as the runs of its seed"},
        "positions": {
            "n": int(baseline.summary["n_positions"]),
            "holdout": bool(refine_args.holdout),
            "held_out_from_training": bool(refine_args.holdout),
            "block_size": int(baseline.blocks.block_size),
            "n_blocks": int(len(baseline.blocks.input_ids)),
            "blocks_sha256": baseline.blocks.fingerprint(),
            "source": baseline.blocks.source,
        },
        "training": {
            "max_steps": config.max_steps, "num_train_epochs": config.num_train_epochs,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps, "learning_rate": config.learning_rate,
            "block_size": data_args.block_size, "max_positions": data_args.max_positions,
            "use_lora": config.use_lora, "lora_r": config.lora_r, "lora_layers": config.lora_layers,
            "mrp_margin_normalization": getattr(config, "mrp_margin_normalization", None),
        },
        "bootstrap": {
            "n_resamples": args.n_bootstrap, "confidence": args.confidence, "seed": args.bootstrap_seed,
            "method": "percentile block (cluster) bootstrap: each resample draws the audited blocks with "
                      "replacement and keeps every position of a drawn block; every run is resampled with the same "
                      "blocks; a row's statistic is the mean over its seeds",
            "paired": "vs_control and fisher_minus_entropy: differences taken on the same resample for both runs; "
                      "seed_ci: Student t interval of the per-seed differences (n_seeds - 1 degrees of freedom)",
        },
        "variants": {
            HEAD: {"objective": args.head_objective, "lambdas": args.head_lambdas,
                   "flags": list(variant_flags(args, HEAD)),
                   "control": "its own CE-only control per seed with the same flags (LoRA + trainable lm_head)"},
            TARGET: {"objective": args.target_objective, "lambdas": args.target_lambdas,
                     "classes": args.target_classes, "buckets": args.target_buckets,
                     "flags": list(variant_flags(args, TARGET)),
                     "control": "the plain control of the seed (at lambda 0 the objective weights change nothing)"},
        },
        "entropy_lambdas": args.entropy_lambdas,
        "spread": "over seeds: std (ddof = 1), min, max",
        "metrics": {key: {"header": HEADERS[key], "description": DESCRIPTIONS[key]} for key in METRIC_KEYS},
        "executed_now": executed,
        **aggregate(args, plan, sweep_dir, baseline, tokenizer),
    }
    results["plots"] = write_plots(sweep_dir, results)
    files.write_text(sweep_dir / "results.md", markdown_report(results))
    files.write_json(sweep_dir / "results.json", results)  # last: its presence marks a complete report
    return results


def _own_flags(args: SweepArguments) -> list[str]:
    flags = ["--output_dir", args.output_dir, "--objectives", *args.objectives,
             "--lambdas", *map(format_lambda, args.lambdas), "--seeds", *map(str, args.seeds),
             "--n_bootstrap", str(args.n_bootstrap), "--audit_blocks", str(args.audit_blocks)]
    if args.entropy_lambdas:
        flags += ["--entropy_lambdas", *map(format_lambda, args.entropy_lambdas)]
    if args.head_lambdas:
        flags += ["--head_lambdas", *map(format_lambda, args.head_lambdas), "--head_objective", args.head_objective]
    if args.target_lambdas:
        flags += ["--target_lambdas", *map(format_lambda, args.target_lambdas), "--target_objective",
                  args.target_objective, "--target_classes", *args.target_classes, "--target_buckets",
                  *args.target_buckets]
    return flags


def summary_lines(results: dict) -> list[str]:
    lines = []
    for row in results["rows"]:
        m = row["metrics"]
        attributable = m["net_attributable"]
        lines.append(
            f"{' '.join(_row_label(row)):<22} W->R {_fmt(m['w2r']['mean'], 'count'):>8}  R->W "
            f"{_fmt(m['r2w']['mean'], 'count'):>8}  net {_fmt(m['net']['mean'], 'count'):>8}  attributable "
            f"{_fmt(attributable['mean'] if attributable else None, 'signed_count'):>8}  median margin "
            f"{_fmt(m['median_margin_change']['mean'], 'signed_percent')}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parse_sweep_arguments(argv)
    results = run_sweep(args, rest, command="hf-mrp sweep " + shlex.join(argv))
    print(f"sweep -> {args.output_dir}  ({len(results['runs'])} runs, results.md / results.json)")
    print("\n".join(summary_lines(results)))


if __name__ == "__main__":
    try:
        main()
    except MRPUserError as error:
        sys.exit(f"hf-mrp sweep: error: {error}")


__all__ = ["SweepArguments", "RunSpec", "plan_runs", "run_sweep", "parse_sweep_arguments", "main"]
