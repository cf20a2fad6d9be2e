"""A sweep's runs: their arguments, the settings a resumed sweep must match, the shared baseline audit, and one
refinement per run (execute_run: what each Ray trial calls, engine.py)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from ...audit.geometry import AuditResult, load_audit
from ...errors import MRPUserError
from ...models import load_tokenizer
from ...storage import files
from ...training import MRPConfig
from ...training.adapters import prepare_model
from ...training.callbacks import MRPAuditCallback
from ...training.divergence import TrainingDiverged
from ..arguments import DataArguments, ModelArguments, audit_options, provenance
from ..loading import load_model_from_arguments
from ..refine_arguments import RefineArguments
from ..refine_inputs import refine_blocks
from ..run_folders import audit_is_whole
from .plan import RunSpec
from .variants import grouped_fields

logger = logging.getLogger(__name__)

SETTINGS_FILE = "sweep_settings.json"
RUN_RECORD = "sweep_run.json"
FAILED_RECORD = "sweep_failed.json"  # a run that diverged: counted as failed, never as a row of numbers
BASELINE = "baseline"
# Settings that do not change a run's numbers: a resumed sweep may differ in these.
NEUTRAL_SETTINGS = {
    "output_dir",
    "logging_dir",
    "run_name",
    "seed",
    "mrp_objective",
    "mrp_lambda",
    "audit_batch_size",
    "disable_tqdm",
    "logging_steps",
    "logging_first_step",
    "logging_strategy",
    "logging_nan_inf_filter",
    "report_to",
    "log_level",
    "log_level_replica",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
    "hub_strategy",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "dataloader_num_workers",
    "resume_from_checkpoint",
    "overwrite_output_dir",
}


class RunArguments(NamedTuple):
    """The four argument groups of a run, as `hf-mrp refine` takes them."""

    model: ModelArguments
    data: DataArguments
    refine: RefineArguments
    config: MRPConfig


def with_audit_blocks(shared: RunArguments, audit_blocks: int) -> RunArguments:
    """``shared`` auditing ``audit_blocks`` whole blocks before and after each run (--audit_blocks, for flags that do
    not set --audit_positions)."""
    positions = audit_blocks * (shared.data.block_size - 1)
    return shared._replace(refine=dataclasses.replace(shared.refine, audit_positions=positions))


def run_arguments(shared: RunArguments, spec: RunSpec, run_dir: Path, fields: dict) -> RunArguments:
    """One run's arguments: the parsed pass-through flags with the run's fields (plan.run_fields: its variant's, in
    whichever argument group has each) and its own output folder, objective, lambda and seed (the dataclasses
    rebuilt, so each checks its fields again)."""
    model, data, refine, config = grouped_fields(tuple(shared), fields)
    try:
        return RunArguments(
            dataclasses.replace(shared.model, **model),
            dataclasses.replace(shared.data, **data),
            dataclasses.replace(shared.refine, **refine),
            dataclasses.replace(  # type: ignore[call-arg]  # mrp_* fields: generated (config.py), unseen
                shared.config,
                **config,
                output_dir=str(run_dir),
                mrp_objective=spec.train_objective,
                mrp_lambda=float(spec.lam),
                seed=int(spec.seed),
            ),
        )
    except MRPUserError:
        raise
    except ValueError as error:
        raise MRPUserError(f"invalid flags for the runs: {str(error).splitlines()[0]}") from error


def run_settings(arguments: RunArguments) -> dict:
    """The pass-through settings that change a run's numbers (JSON-normalized)."""
    settings = {}
    for group in (arguments.model, arguments.data, arguments.refine):
        settings.update(dataclasses.asdict(group))
    settings.update(arguments.config.to_dict())
    settings = {key: value for key, value in settings.items() if key not in NEUTRAL_SETTINGS}
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def check_settings(sweep_dir: Path, settings: dict, defaults: dict | None = None) -> None:
    """Refuse to resume a sweep with settings that would change its runs' numbers (``defaults``: see `changes`)."""
    path = sweep_dir / SETTINGS_FILE
    if not path.is_file():
        return
    differences = changes(files.read_json(path)["settings"], settings, defaults or {})
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise MRPUserError(
            f"{sweep_dir} holds a sweep made with other run settings ({shown}); pass the same flags to resume it, "
            f"or a new --output_dir"
        )


def changes(saved: dict, now: dict, defaults: dict) -> list[str]:
    """The settings that differ, as 'key: saved -> now'. A setting ``saved`` lacks was added to hf_mrp after that
    record was written: it counts as unchanged when ``now`` holds its default (``defaults``, `default_settings`),
    since the run then trained as it did before the setting existed."""
    absent = object()
    shown = []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key, absent), now.get(key, absent)
        if before is absent and key in defaults and after == defaults[key]:
            continue
        if before != after:
            old, new = ("(absent)" if value is absent else repr(value) for value in (before, after))
            shown.append(f"{key}: {old} -> {new}")
    return shown


def default_settings(arguments: RunArguments) -> dict:
    """Every field of a run's argument groups at its declared default, normalized as `run_settings` writes them
    (what a setting absent from an older record stood for)."""
    values = {}
    for group in arguments:
        for field in dataclasses.fields(group):
            if field.default is not dataclasses.MISSING:
                values[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                values[field.name] = field.default_factory()
    return json.loads(json.dumps(values, default=str, sort_keys=True))


def record_settings(sweep_dir: Path, settings: dict, command: str) -> None:
    """Written once the baseline exists (a first call that fails earlier may be retried with other flags)."""
    path = sweep_dir / SETTINGS_FILE
    if not path.is_file():
        files.write_json(path, {"command": command, "settings": settings})


def ensure_baseline(sweep_dir: Path, arguments: RunArguments) -> tuple[object, AuditResult]:
    """(tokenizer, baseline audit): the shared "before" audit, computed once into ``sweep_dir / BASELINE``.

    The model is prepared as the trainer prepares it (LoRA-wrapped: the zero-initialized adapter changes no
    output; 4-bit models get the same k-bit preparation), on the trainer's device, and audited by the
    MRPAuditCallback a run would use at train begin.
    """
    model_args, data_args, refine_args, config = arguments
    baseline_dir = sweep_dir / BASELINE
    if audit_is_whole(baseline_dir):  # a baseline whose files do not read back is computed again
        tokenizer = load_tokenizer(model_args.model, model_args.gguf_file, model_args.trust_remote_code)
        blocks = refine_blocks(tokenizer, data_args, refine_args)[0]
        baseline = load_audit(baseline_dir)
        if baseline.blocks.fingerprint() != blocks.fingerprint():
            raise MRPUserError(
                f"the baseline audit in {baseline_dir} is of other positions than these flags give (the data "
                f"changed?); pass a new --output_dir, or delete {baseline_dir} and every run under runs/"
            )
        print(f"baseline: reusing {baseline_dir} ({baseline.summary.n_positions} positions)", flush=True)
        return tokenizer, baseline

    shutil.rmtree(baseline_dir, ignore_errors=True)  # an interrupted audit (no audit.json) starts over
    model, tokenizer, model_name = load_model_from_arguments(model_args)
    blocks = refine_blocks(tokenizer, data_args, refine_args)[0]
    print(f"baseline: auditing {blocks.n_positions} positions -> {baseline_dir}", flush=True)
    model = prepare_model(model, config)
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        model = model.to(config.device)
    start = time.perf_counter()
    auditor = MRPAuditCallback(  # what each run's own before-audit would measure: its lens layers and manifold too
        blocks,
        output_dir=sweep_dir,
        chunk_size=config.mrp_chunk_size,
        provenance=provenance(model_name, model_args, data_args, refine_args),
        **audit_options(refine_args, "audit_"),
    )
    baseline = auditor.audit(model, BASELINE)
    print(f"baseline: done in {time.perf_counter() - start:.1f}s", flush=True)
    del model
    free_memory()
    return tokenizer, baseline


def check_finished_runs(sweep_dir: Path, arguments: dict[str, RunArguments], defaults: dict | None = None) -> None:
    """Refuse to resume a run folder trained with other settings than its run would get now (a variant whose
    settings changed under the same name), before any work; records without settings (older sweeps) pass, and so
    do settings added to hf_mrp since, at their defaults (`changes`)."""
    for name, run_args in arguments.items():
        path = sweep_dir / "runs" / name / RUN_RECORD
        saved = files.read_json(path).get("settings") if path.is_file() else None
        shown = "; ".join(changes(saved, run_settings(run_args), defaults or {})) if saved is not None else ""
        if not shown:
            continue
        raise MRPUserError(
            f"{path.parent} was trained with other settings ({shown}); give the variant another name, or delete "
            f"that folder to redo the run"
        )


def failed_reason(run_dir: Path) -> str | None:
    """Why a run of an earlier call failed (it diverged), or None."""
    path = run_dir / FAILED_RECORD
    if not path.is_file():
        return None
    try:
        return str(files.read_json(path).get("reason") or "failed")
    except MRPUserError:
        return None  # a record cut short: the run counts as unfinished and is redone


def execute_run(
    spec: RunSpec, arguments: RunArguments, run_dir: Path, baseline_dir: Path, train: Callable[[RunArguments], object]
) -> float:
    """One refinement of ``arguments`` (run_arguments), from scratch, into ``run_dir``; returns its wall time.

    ``train`` runs it (trial.py: in this process with a progress report, or on several processes; it reuses
    ``baseline_dir``). A run that diverges (TrainingDiverged) is recorded as failed in ``run_dir /
    FAILED_RECORD`` and raises again."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    try:
        train(arguments)
    except TrainingDiverged as error:
        files.write_json(
            run_dir / FAILED_RECORD,
            {**spec._asdict(), "lambda": spec.lam, "reason": str(error), "seconds": time.perf_counter() - start},
        )
        free_memory()
        raise
    seconds = time.perf_counter() - start
    if (run_dir / "audit_before").exists():
        logger.warning("%s audited its own baseline instead of reusing %s (other blocks?)", run_dir, baseline_dir)
    record = {**spec._asdict(), "lambda": spec.lam, "seconds": seconds, "settings": run_settings(arguments)}
    files.write_json(run_dir / RUN_RECORD, record)
    free_memory()
    return seconds


def free_memory() -> None:
    """Release a finished run's model before the next one loads (GPU caches too)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = [
    "RunArguments",
    "with_audit_blocks",
    "run_arguments",
    "run_settings",
    "check_settings",
    "record_settings",
    "ensure_baseline",
    "execute_run",
    "failed_reason",
    "check_finished_runs",
    "default_settings",
    "RUN_RECORD",
    "FAILED_RECORD",
    "SETTINGS_FILE",
]
