"""MRPAuditCallback: the geometry and flip audit of fixed positions, during training.

Audits the positions at train begin (the baseline; reused from disk when it is already there),
at each evaluation and at train end, compares each audit with the baseline, writes the files
`hf-mrp audit` / `hf-mrp compare` write, and logs the headline numbers and the breakdowns by
token class and frequency bucket through the trainer, so every reporting integration
(TensorBoard, trackio, W&B, ...) receives them. (Keys a callback adds to `metrics` inside
`on_evaluate` never reach the reporters, hence `trainer.log`.) The flip tables go to the
reporters that show tables (`tables.log_tables`). docs/logging.md lists every name.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers import TrainerCallback

from ..audit.compare import compare_audits, decoder_from_tokenizer, write_comparison
from ..audit.geometry import AuditResult, audited_layers, check_blocks_to_audit, load_audit, run_audit
from ..audit.manifold import MANIFOLD_STATISTICS, ManifoldOptions, manifold_options
from ..audit.manifold import headline as manifold_headline
from ..data import Blocks
from ..errors import MRPUserError
from .console import audit_table, class_codes, console_write, evaluation_line, hide_audit_from_console
from .divergence import DEFAULT_MAX_ACCURACY_DROP, check_accuracy_kept, check_decisions_alive, check_max_accuracy_drop
from .pictures import lens_pictures, log_pictures
from .tables import flip_tables, log_tables

if TYPE_CHECKING:
    from transformers import Trainer

    from ..audit.tuned_lens import TunedLens

logger = logging.getLogger(__name__)

HEADLINE = ("w2r", "r2w", "net", "flip_ratio", "median_margin_change", "head_share", "churn")
FLIP_COUNTS = ("w2r", "r2w", "net")
UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9+._<>=-]+")


def name_part(label: str) -> str:
    """A class or bucket label as one segment of a logged name: lower case, other characters -> '_'.

    "100+" stays "100+"; a label with spaces or a slash ("fragment/other") cannot add a level.
    """
    return UNSAFE_IN_NAME.sub("_", str(label).strip().lower()).strip("_") or "_"


def headline_scalars(comparison: dict, after: AuditResult) -> dict[str, float]:
    """The numbers worth a curve: flips, margin change, head share, accuracy and the gap coefficient."""
    scalars = {f"audit/{key}": comparison[key] for key in HEADLINE if comparison.get(key) is not None}
    scalars["audit/accuracy"] = after.summary.accuracy
    scalars["audit/median_margin"] = after.summary.median_margin
    alpha = after.summary.gap_fit.alpha
    if alpha is not None:
        scalars["audit/gap_alpha"] = alpha
    if comparison.get("ece_after") is not None:
        scalars["audit/ece"] = comparison["ece_after"]
    return {key: float(value) for key, value in scalars.items()}


def breakdown_scalars(comparison: dict) -> dict[str, float]:
    """W->R, R->W and net per token class and per frequency bucket: where corrections and damage fall.

    Names: ``audit/class/<class>/<count>`` and ``audit/bucket/<bucket>/<count>``; the labels are
    read from the comparison's own dictionaries (``name_part`` of each), not from a fixed list.
    """
    scalars = {}
    for kind, groups in (("class", comparison.get("by_class")), ("bucket", comparison.get("by_bucket"))):
        for label, group in (groups or {}).items():
            for count in FLIP_COUNTS:
                scalars[f"audit/{kind}/{name_part(label)}/{count}"] = float(group[count])
    return scalars


LAYER_STATISTICS = {  # logged name: the lens row's key (layers.json)
    "kl_to_final": "mean_kl_to_final",
    "agreement_with_final": "agreement_with_final",
    "accuracy": "accuracy",
    "spearman_margin_vs_final_ce": "spearman_margin_vs_final_ce",
}


def layer_scalars(after: AuditResult) -> dict[str, float]:
    """Per audited layer (with ``layers``): KL to the final layer, agreement with it, accuracy and the margin-vs-CE
    correlation of the lens, and with the manifold its statistics (variance_dims as variance_dims_<level>), as
    ``audit/layer/<layer>/<statistic>`` (layers.json holds every other number)."""
    scalars = {}
    for row in after.layers or []:
        found = {name: row.get(key) for name, key in LAYER_STATISTICS.items()}
        if "participation_ratio" in row:
            found.update(manifold_headline(row))
        for name, value in found.items():
            if value is not None:
                scalars[f"audit/layer/{row['layer']}/{name}"] = float(value)
    return scalars


def audit_scalars(comparison: dict, after: AuditResult) -> dict[str, float]:
    """Every scalar logged at one audit: the headline numbers, the class and bucket breakdowns, and the layers'."""
    return {**headline_scalars(comparison, after), **breakdown_scalars(comparison), **layer_scalars(after)}


class MRPAuditCallback(TrainerCallback):
    """Audit ``blocks`` before, during and after training (see module docstring).

    Files go to ``output_dir`` (default: the trainer's): ``audit_before/``, ``audit_step_N/`` +
    ``comparison_step_N/`` at evaluations, ``audit_after/`` + ``comparison/`` at the end.
    ``baseline_dir`` reuses an existing audit of the same blocks as the baseline. ``layers`` (a layer spec such as
    "20-29", or indices) adds the layer-wise lens to every audit: layers.json and the lens pictures in each audit
    folder, per-layer scalars in the logs, the pictures in the reporters that show images; ``lens`` (a TunedLens)
    makes it the tuned lens. ``console``: print a table of the audit at train begin and train end, and one line
    at each evaluation (world process zero); the Trainer's own console then leaves the ``audit/*`` scalars out
    (the trackers get every one), see training/console.py.
    ``manifold`` (True, or `ManifoldOptions`) adds each audited layer's hidden-state
    manifold statistics (layers.json, manifold.png, ``audit/layer/<layer>/<statistic>`` in the logs).
    ``max_accuracy_drop``: the run fails as collapsed (`TrainingCollapsed`, at train end) when the after-audit's
    top-1 accuracy is more than this many points (of 100) below the before-audit's; None or 100: never.
    """

    def __init__(
        self,
        blocks: Blocks,
        output_dir: str | Path | None = None,
        tokenizer=None,
        batch_size: int = 8,
        chunk_size: int = 1024,
        baseline_dir: str | Path | None = None,
        provenance: dict | None = None,
        audit_on_evaluate: bool = True,
        layers: str | list[int] | None = None,
        lens: TunedLens | None = None,
        console: bool = True,
        manifold: bool | ManifoldOptions | None = None,
        max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
    ):
        check_blocks_to_audit(blocks)  # before training starts, not at its first audit
        check_max_accuracy_drop(max_accuracy_drop)
        self.max_accuracy_drop = max_accuracy_drop
        self.blocks = blocks
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.decode = decoder_from_tokenizer(tokenizer) if tokenizer is not None else None
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.baseline_dir = None if baseline_dir is None else Path(baseline_dir)
        self.provenance = provenance or {}
        self.audit_on_evaluate = audit_on_evaluate
        self.layers, self.lens = layers, lens
        self.console = console
        self._class_code: np.ndarray | None = None  # each position's token class, for the console's table
        self.manifold = manifold_options(manifold)
        if self.manifold is not None and layers is None and lens is None:
            raise MRPUserError("manifold=True measures the audited layers: pass layers= too (e.g. 'all')")
        self.trainer: Trainer | None = None
        self.baseline: AuditResult | None = None
        self.latest: AuditResult | None = None
        self.comparison: dict | None = None
        self._pending_baseline_log: dict[str, float] | None = None
        self._baseline_folder: Path | None = None  # where the baseline audit is (audit_before/, or baseline_dir)

    def attach(self, trainer) -> MRPAuditCallback:
        """Register with a (plain or MRP) Trainer, ahead of the reporters so its logs reach them."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.callback_handler.callbacks.insert(0, self)
        if self.console:
            hide_audit_from_console(trainer.callback_handler.callbacks)
        return self

    def _attached(self) -> Trainer:
        if self.trainer is None:
            raise MRPUserError(
                "MRPAuditCallback logs through its trainer: use MRPTrainer(callbacks=[...]) "
                "or callback.attach(trainer) for a plain Trainer"
            )
        return self.trainer

    def _folder(self, name: str) -> Path:
        if self.output_dir is None:
            raise MRPUserError(
                "MRPAuditCallback has no output_dir yet: pass output_dir=..., or let training start "
                "(it then writes under the Trainer's output_dir)"
            )
        return self.output_dir / name

    def audit(self, model, folder: str) -> AuditResult:
        """Audit ``model`` on the blocks into ``output_dir / folder`` (the sweep's shared baseline is one too)."""
        return run_audit(
            model,
            self.blocks,
            output_dir=self._folder(folder),
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
            provenance=self.provenance,
            progress=False,
            layers=self.layers,
            lens=self.lens,
            manifold=self.manifold,
        )

    def _cached_baseline(self, model) -> AuditResult | None:
        for folder in filter(None, (self.baseline_dir, self._folder("audit_before"))):
            if (folder / "audit.json").is_file():
                cached = load_audit(folder)
                missing = self._missing_from(cached, model)
                if missing is None:
                    self._baseline_folder = folder
                    return cached
                logger.warning("ignoring the audit in %s: %s; auditing the baseline again", folder, missing)
        return None

    def _missing_from(self, cached: AuditResult, model) -> str | None:
        """What this callback measures that an audit on disk lacks (None: it can stand as the baseline): the same
        blocks, and every asked-for lens layer with the manifold statistics when asked (a baseline without them
        would leave the comparison's layer pictures and numbers silently out)."""
        if cached.blocks.fingerprint() != self.blocks.fingerprint():
            return "it is of other blocks"
        layers = None if model is None else audited_layers(model, self.blocks, self.layers, self.lens)
        if layers is None:
            return None
        rows = {row["layer"]: row for row in cached.layers or []}
        if not set(layers) <= set(rows):
            return f"it has no lens rows for layers {sorted(set(layers) - set(rows))}"
        if self.manifold is not None and not all(MANIFOLD_STATISTICS[0] in rows[layer] for layer in layers):
            return "it has no manifold statistics"
        return None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attached()
        self.output_dir = self.output_dir or Path(args.output_dir)
        self.baseline = self._cached_baseline(model)
        if self.baseline is None:
            if state.global_step > 0:
                raise MRPUserError(
                    f"resuming at step {state.global_step} without the baseline audit: it would be taken from the "
                    f"partly trained model; resume into the original output_dir (which holds audit_before/)"
                )
            self.baseline, self._baseline_folder = self.audit(model, "audit_before"), self._folder("audit_before")
        if self.console and state.is_world_process_zero:
            title = f"audit before training: {self.baseline.summary.n_positions} positions ({self._baseline_folder})"
            console_write(audit_table(title, self.baseline, self._class_codes()))
        if state.global_step == 0:  # step 0: the baseline against itself (no flips by definition)
            self._pending_baseline_log = audit_scalars(
                compare_audits(self.baseline, self.baseline, self.decode), self.baseline
            )

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush_baseline_log()

    def _flush_baseline_log(self) -> None:
        """Log the step-0 scalars once every reporter has run its own on_train_begin (set its log dir)."""
        if self._pending_baseline_log is not None:
            scalars, self._pending_baseline_log = self._pending_baseline_log, None
            trainer = self._attached()
            trainer.log(scalars)
            if trainer.is_world_process_zero():
                self._log_lens_pictures(trainer.callback_handler.callbacks, self._baseline_folder, 0)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.audit_on_evaluate and self.baseline is not None:
            step = state.global_step
            self._audit_compare_log(model, f"audit_step_{step}", f"comparison_step_{step}")
            if self.console and state.is_world_process_zero and self.comparison is not None:
                console_write(evaluation_line(step, self.comparison))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._flush_baseline_log()
        self._audit_compare_log(model, "audit_after", "comparison")
        if self.console and state.is_world_process_zero and self.latest is not None:
            title = f"audit after training (step {state.global_step}), flips against the audit before training"
            console_write(audit_table(title, self.latest, self._class_codes(), self.baseline, self.comparison))
        assert self.baseline and self.latest and self.comparison  # made in on_train_begin and just now
        check_decisions_alive(self.baseline.summary.mean_margin, self.latest.summary.mean_margin, self._attached())
        check_accuracy_kept(self.comparison, self.max_accuracy_drop, self._attached())

    def _class_codes(self) -> np.ndarray | None:
        """The positions' token classes (decoded once: the positions are fixed)."""
        if self._class_code is None and self.baseline is not None:
            self._class_code = class_codes(self.baseline, self.decode)
        return self._class_code

    def _audit_compare_log(self, model, audit_folder: str, comparison_folder: str) -> None:
        trainer, baseline = self._attached(), self.baseline
        assert baseline is not None  # taken (or read) in on_train_begin
        self.latest = self.audit(model, audit_folder)
        self.comparison = compare_audits(baseline, self.latest, self.decode)
        if trainer.is_world_process_zero():
            write_comparison(self.comparison, baseline, self.latest, self._folder(comparison_folder))
        trainer.log(audit_scalars(self.comparison, self.latest))
        if trainer.is_world_process_zero():
            reporters, step = trainer.callback_handler.callbacks, trainer.state.global_step
            log_tables(reporters, flip_tables(self.comparison), step)
            self._log_lens_pictures(reporters, self._folder(audit_folder), step)

    def _log_lens_pictures(self, reporters, folder: Path | None, step: int) -> None:
        if folder is not None and (self.layers is not None or self.lens is not None):
            log_pictures(reporters, lens_pictures(folder), step)
