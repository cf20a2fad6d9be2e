"""The refinement pipeline: audit before, MRPTrainer, audit after on identical positions, compare,
model card, optional Hub push. `examples/refine.py` and `hf-mrp refine` run it.

Output folder: the adapter (loadable with `PeftModel.from_pretrained(base, output_dir)`),
README.md (model card), configs (`mrp_config.json`, `run_arguments.json`), `audit_before/`,
`audit_after/` (as `hf-mrp audit` writes them) and `comparison/` (as `hf-mrp compare` writes it),
`runs/` (TensorBoard). With `--eval_strategy steps`, each evaluation (eval loss on the held-out audit
blocks) also audits them into `audit_step_N/` + `comparison_step_N/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from ..audit.summary import AuditSummary
from ..data import check_block_fits
from ..data.sources import check_data_flags_apply
from ..models import decoder_layers
from ..models.layers import check_layer_flag
from ..storage import files
from ..storage.locks import is_main_process, owned_folder
from ..training import MRPConfig, MRPTrainer
from ..training.callbacks import MRPAuditCallback
from ..training.checkpoints import check_resume_target, check_resumed_settings
from ..training.divergence import TrainingDiverged
from .arguments import DataArguments, ModelArguments, audit_options, provenance
from .loading import load_model_from_arguments
from .refine_arguments import DEFAULTS, RefineArguments
from .refine_inputs import head_peft_config, refine_blocks, split_blocks, target_weights, training_dataset
from .reports.paper_curves import write_paper_curves
from .run_folders import TRAINING_LOG, check_may_write, forget_finished_run


def refine(
    model_args: ModelArguments,
    data_args: DataArguments,
    refine_args: RefineArguments,
    config: MRPConfig,
    baseline_dir: str | Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Run the whole pipeline; returns the comparison (flip audit) dictionary.

    The output folder is owned for the run (storage.locks.owned_folder): a second run into it stops at once.
    A folder holding a finished run is only written again with ``overwrite_output_dir`` or a resume.
    ``baseline_dir``: an existing audit of the same blocks to reuse as the "before" audit (a sweep
    shares one across its runs). ``callbacks``: more TrainerCallbacks for the trainer (a sweep's progress report).
    """
    assert config.output_dir is not None  # TrainingArguments.__post_init__ fills in a default
    output_dir = files.ensure_output_dir(config.output_dir)
    main = config.should_save and is_main_process()  # one process of a distributed run owns the folder
    with owned_folder(output_dir, active=main):
        check_may_write(output_dir, refine_args.overwrite_output_dir, config.resume_from_checkpoint)
        check_resume_target(config.resume_from_checkpoint, output_dir)  # before the model loads (MRPTrainer again)
        check_resumed_settings(config, config.resume_from_checkpoint)
        if main and refine_args.overwrite_output_dir and not config.resume_from_checkpoint:
            forget_finished_run(output_dir)
        return _refine_into(output_dir, model_args, data_args, refine_args, config, baseline_dir, callbacks)


def _refine_into(
    output_dir: Path, model_args, data_args, refine_args, config: MRPConfig, baseline_dir, callbacks=()
) -> dict:
    push, config.push_to_hub = config.push_to_hub, False  # push ourselves, after everything is saved
    check_data_flags_apply(data_args)
    if refine_args.downstream is not None:  # lm-eval and the suite's packages, before minutes of training
        from .downstream import check_suite, require_lm_eval

        require_lm_eval()
        check_suite(refine_args.downstream)
    model, tokenizer, model_name = load_model_from_arguments(model_args)
    check_block_fits(model, data_args.block_size)
    if refine_args.audit_layers is not None:  # before any audit folder exists (a Hub / GGUF model's layers)
        check_layer_flag("--audit_layers", refine_args.audit_layers, len(decoder_layers(model)), model_name)
    audit_blocks, train_ids = refine_blocks(tokenizer, data_args, refine_args)
    origin = provenance(model_name, model_args, data_args, refine_args)
    audit = MRPAuditCallback(
        audit_blocks,
        tokenizer=tokenizer,
        chunk_size=config.mrp_chunk_size,
        baseline_dir=baseline_dir,
        provenance=origin,
        max_accuracy_drop=refine_args.max_accuracy_drop,
        **audit_options(refine_args, "audit_"),
    )
    hub = hub_callback(config, config.hub_model_id or output_dir.name) if push else None
    evaluating = str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no"
    peft_config = head_peft_config(model, config) if refine_args.train_lm_head else None
    trainer = MRPTrainer(
        model=model,
        args=config,
        peft_config=peft_config,
        train_dataset=training_dataset(train_ids, target_weights(train_ids, tokenizer, refine_args)),
        eval_dataset=training_dataset(audit_blocks.input_ids) if evaluating else None,
        processing_class=tokenizer,
        callbacks=[audit, *filter(None, [hub]), *callbacks],
    )
    train_to_finite_weights(trainer, output_dir, config.resume_from_checkpoint)
    before, after, comparison = train_end_audits(audit)
    save_adapter(trainer, tokenizer, output_dir)
    if trainer.is_world_process_zero():
        downstream = run_downstream(trainer, tokenizer, output_dir, refine_args.downstream, origin)
        repo_id = None
        if hub is not None:
            hub.wait()  # the pushes made during training land first; the final push replaces their card
            repo_id = hub.resolved_repo_id()  # create_repo's answer: a bare name gets the token's namespace
            config.hub_model_id = hub.repo_id  # create_repo's answer once known: mrp_config.json and the final line
        write_run_files(output_dir, model_name, config, origin, before, after, comparison, repo_id, downstream)
        if refine_args.paper_curves:
            write_paper_curves(
                output_dir, trainer.state.log_history, protocol_of(trainer, model_name, data_args, after)
            )
        files.write_json(output_dir / TRAINING_LOG, trainer.state.log_history)  # last: marks a finished run
        if hub is not None:
            from ..training.hub import push_folder

            push_folder(output_dir, hub.repo_id, config.hub_token, config.hub_private_repo)
            config.push_to_hub = True  # pushed, to config.hub_model_id (the caller's final line names it)
    return comparison


def protocol_of(trainer, model_name: str, data_args, after: AuditSummary) -> dict:
    """What the released protocol is compared with (reports/paper_curves.departures): this run as it ran."""
    args = trainer.args
    return {
        "model": model_name,
        "max_steps": trainer.state.global_step,
        "learning_rate": args.learning_rate,
        "block_size": data_args.block_size,
        "dataset_config": data_args.dataset_config,
        "bf16": bool(args.bf16),
        "effective_batch_blocks": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "full_model": not getattr(args, "use_lora", True),
        "audit_positions": int(after.n_positions),
    }


DOWNSTREAM_HEADING = "## Downstream (the offline suite: a proxy, not the paper's six-task mean)\n\n"


def run_downstream(trainer, tokenizer, output_dir: Path, suite: str | None, origin: dict) -> dict | None:
    """``--downstream SUITE``: the suite on the base model and on base + the trained adapter (still in memory),
    into ``output_dir/downstream/``; its verdicts go into the model card. None without the flag."""
    if suite is None:
        return None
    from .downstream import suite_downstream

    model = trainer.accelerator.unwrap_model(trainer.model)
    return suite_downstream(model, tokenizer, suite, output_dir / "downstream", origin=origin)


def train_end_audits(audit: MRPAuditCallback) -> tuple[AuditSummary, AuditSummary, dict]:
    """(before, after, their comparison): what the audit callback holds once training ended (on every process)."""
    baseline, latest, comparison = audit.baseline, audit.latest, audit.comparison
    assert baseline is not None and latest is not None and comparison is not None  # made in on_train_end
    return baseline.summary, latest.summary, comparison


def train_to_finite_weights(trainer, output_dir: Path, resume_from_checkpoint) -> None:
    """Train; a run that diverges (MRPTrainer checks the weights at every step and after the last one) fails, and
    the after-audit and comparison the audit callback made of non-finite weights at train end are removed."""
    import shutil

    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except TrainingDiverged:
        if trainer.is_world_process_zero():
            for name in ("audit_after", "comparison"):
                shutil.rmtree(output_dir / name, ignore_errors=True)
        raise


def hub_callback(config: MRPConfig, repo_id: str):
    """Pushes during training at each save, by ``config.hub_strategy`` (hub.HubPushCallback)."""
    from ..training.hub import HubPushCallback
    from .reports.model_card import card_from_folder

    settings = config.to_dict()  # token-free
    return HubPushCallback(
        repo_id,
        config.output_dir,
        config.hub_token,
        config.hub_private_repo,
        config.hub_strategy,
        config.hub_revision,
        config.hub_always_push,
        card=lambda folder, step: card_from_folder(folder, settings, step),
    )


def save_size(model, tokenizer) -> int:
    """Bytes the adapter (or the whole model, without LoRA) and the tokenizer take on disk, about."""
    try:
        from peft import PeftModel, get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    except Exception:  # an estimate only: never fail a save over it
        tensors = {}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return size + (len(backend.to_str().encode()) if backend is not None else 0) + 64_000  # + configs, card


def save_adapter(trainer, tokenizer, output_dir: Path) -> None:
    """The adapter and tokenizer, saved atomically: into a staging folder, then moved file by file.

    A full disk or a crash while saving leaves the previous files (or none), never a partial one.
    training_args.bin (a pickle) is dropped: mrp_config.json holds the settings as JSON."""
    needed = save_size(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    with files.staged_folder(output_dir, "saving the adapter and tokenizer", needed) as staging:
        trainer.save_model(str(staging))
        (staging / "training_args.bin").unlink(missing_ok=True)


def write_run_files(
    output_dir: Path,
    model_name: str,
    config: MRPConfig,
    origin: dict,
    before: AuditSummary,
    after: AuditSummary,
    comparison: dict,
    repo_id: str | None = None,
    downstream: dict | None = None,
) -> None:
    """Configs (token-free: TrainingArguments.to_dict redacts *_token fields) and the model card (which names
    ``repo_id``, the Hub repo the run pushes to, when known, and holds ``downstream``'s verdicts)."""
    from ..reporting.markdown import markdown_summary
    from .downstream import invariance_markdown
    from .reports.model_card import evaluation_comparisons, model_card

    settings = config.to_dict()
    files.write_json(output_dir / "mrp_config.json", settings)
    files.write_json(output_dir / "run_arguments.json", origin)
    images = card_images(output_dir)
    card = model_card(
        model_name,
        settings,
        before,
        after,
        markdown_summary(comparison, heading="###"),
        images,
        data_arguments=origin.get("arguments", {}),
        evaluations=evaluation_comparisons(output_dir),
        repo_id=repo_id,
        downstream=DOWNSTREAM_HEADING + invariance_markdown(downstream["invariance"], "###") if downstream else "",
    )
    files.write_text(output_dir / "README.md", card)


def card_images(output_dir: Path) -> list[str]:
    """The model card's pictures, relative to ``output_dir``: the comparison's, then (with --audit_layers) the lens
    pictures of the audits before and after."""
    from ..training.pictures import lens_pictures

    pictures = sorted((output_dir / "comparison").glob("*.png"))
    for audit in ("audit_before", "audit_after"):
        pictures += lens_pictures(output_dir / audit).values()
    pictures += sorted((output_dir / "downstream").glob("invariance.png"))  # refine --downstream
    return [path.relative_to(output_dir).as_posix() for path in pictures]


__all__ = [
    "RefineArguments",
    "refine",
    "DEFAULTS",
    # from refine_arguments and refine_inputs, importable from here as before
    "split_blocks",
    "refine_blocks",
    "training_dataset",
    "target_weights",
    "head_peft_config",
]
