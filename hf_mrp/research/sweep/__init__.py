"""`hf-mrp sweep`: a dose-response sweep of MRP over objectives x lambdas x seeds, with controls.

    hf-mrp sweep --objectives margin fisher entropy --lambdas 0.15 0.3 0.6 1.0 --seeds 0 1 2 \\
                 --output_dir outputs/sweep --max_steps 60

Every run is `hf-mrp refine` (`hf_mrp.research.refine.refine`) with the same pass-through flags (model, data,
MRPConfig / TrainingArguments, --audit_positions, --holdout; defaults as examples/refine.py), each a Ray Tune
trial (engine.py; docs/sweep.md: one machine, a Ray cluster, resources). Each seed also gets a control:
lambda = 0 (cross-entropy only; the objective named by --control_objective is carried but has weight 0), with the
same data, steps, adapter and seed, so "net attributable to the objective" = net(run) - net(control of that seed).

Layout of ``--output_dir``:

    sweep_settings.json                      the pass-through settings; a resumed sweep must match them
    baseline/                                the one "before" audit all runs compare against
                                             (as `hf-mrp audit` writes it; computed once)
    runs/control_lam0_seed<S>/               the control of seed S
    runs/<objective>_lam<L>_seed<S>/         one refine output folder per run (adapter, audits, comparison/)
    runs/<objective>_<variant>_lam<L>_seed<S>/, runs/control_<variant>_lam0_seed<S>/   a variant's runs, its control
    results.json, results.md                 the dose-response table (results.json is written last)
    flips_vs_lambda.png, margin_change_vs_lambda.png, class_net_vs_lambda.png

Resuming: a run whose folder reads back whole (``training_log.json``, written last by refine, and its audits) is
finished and is not redone; any other run folder is deleted and the run redone from scratch, on Ray. Running the
same command again therefore finishes an interrupted sweep (a crash, Ctrl-C, a killed driver), and with every run
finished only recomputes the results, without starting Ray.

Rows: the controls, objective x lambda (an objective on its own grid with --objective_lambdas, entropy with
--entropy_lambdas), and on request variant rows (variants.py): the W-trainable rows (--head_lambdas: LoRA +
trainable lm_head, with their own CE-only controls), the targeted rows (--target_lambdas: the objective weighted to
--target_classes / --target_buckets) and rows with any run settings (--variants NAME:OBJECTIVE:LAMBDA[:FIELD=VALUE...]),
each paired with its settings at lambda 0, or with the main control where those change or train nothing.
Every seed audits --audit_blocks blocks (default 64, ~16K positions) unless --audit_positions is given.

Numbers (docs/spec.md, "Before/after audit", "Intervals"): for each row, the mean over seeds, the spread
over seeds (std with ddof = 1, min, max) and a percentile block-bootstrap interval: ``--n_bootstrap``
resamples of the audited BLOCKS with replacement (rng seed ``--bootstrap_seed``, hf_mrp.stats); every run
is resampled with the same blocks and a row's statistic on a resample is the mean over its seeds. Each
non-control row also gets ``vs_control``: run minus the control of its seed for every metric, with a
paired interval (the same resample for both runs) and a t interval of the per-seed differences; and each
fisher lambda is matched with the entropy lambda of the closest median margin change, with the paired
differences fisher - entropy (paired.py). Every per-run number is hf_mrp.stats.flips.flip_numbers, the
function `hf-mrp compare` uses.

Modules: arguments.py (the sweep's own flags), variants.py (variant specs and their controls), plan.py (runs,
names, rows), runs.py (run arguments,
settings, the shared baseline, one refinement per run), engine.py (Ray: the unfinished runs as Tune trials),
trial.py (one trial: the run in its process, or on Ray Train workers), console.py (the trial table),
run_statistics.py (per-position data, per-run numbers),
aggregate.py and paired.py (rows, intervals, paired differences), results.py (results.json as typed records, one
to_json), metrics.py (what each number is), report.py and cells.py (results.md, plots, console summary; how a cell
is printed), command.py (end to end). The `hf-mrp sweep` parser, which
turns the pass-through flags into the runs' shared RunArguments, is hf_mrp/research/commands/sweep.py.
"""

from .arguments import RESERVED_FLAGS, SweepArguments, check_pass_through
from .command import run_sweep
from .plan import RunSpec, plan_runs
from .report import summary_lines
from .runs import RunArguments, with_audit_blocks

__all__ = [
    "RESERVED_FLAGS",
    "RunArguments",
    "SweepArguments",
    "RunSpec",
    "check_pass_through",
    "plan_runs",
    "run_sweep",
    "summary_lines",
    "with_audit_blocks",
]
