"""`hf-mrp audit`: the float32 geometry audit of a model on fixed positions."""

from __future__ import annotations

from ...storage.locks import is_main_process
from ..arguments import AuditArguments, DataArguments, ModelArguments
from ..audit_run import audit_from_arguments
from . import COMMANDS


def make_parser(subparsers):
    return subparsers.add_parser(
        "audit",
        help=COMMANDS["audit"],
        description=COMMANDS["audit"],
        dataclass_types=(ModelArguments, DataArguments, AuditArguments),
    )


def main(model_args: ModelArguments, data_args: DataArguments, audit_args: AuditArguments) -> None:
    result = audit_from_arguments(model_args, data_args, audit_args)
    if not is_main_process():  # rank 0 of a launch (RANK), as for the folder's lock: one summary
        return
    s = result.summary
    fit = s.gap_fit
    print(
        f"audited {s.n_positions} positions in {result.seconds:.1f}s -> {audit_args.output_dir}\n"
        f"accuracy {s.accuracy:.4f}  median margin {s.median_margin:.4f}  "
        f"Pr(m<0.5) {s.fraction_margin_lt_0_5:.4f}  entropy-margin Spearman {s.entropy_margin_spearman:.4f}\n"
        f"gap fit: beta {fit.beta:.4f}  R^2 {fit.r_squared:.4f}  alpha {fit.alpha:.4f}  "
        f"({fit.fit_points} points)  unique margins {s.n_unique_margins}"
    )
    if s.layers is not None and result.layers is not None:
        print(
            f"{s.layers['lens']} lens: layers with negative Fisher-penalty vs CE correlation: "
            f"{s.layers['negative_fisher_correlation']}"
        )
        print(
            "KL(final || layer) by layer: "
            + " ".join(f"{row['layer']}:{row['mean_kl_to_final']:.3f}" for row in result.layers)
        )
