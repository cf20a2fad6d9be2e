"""audit.json as a typed record: what `summarize_positions` measures, the provenance, the layer-wise lens.

Every reader takes attributes (``summary.accuracy``, ``summary.gap_fit.alpha``), so a renamed field fails at
type-check time instead of printing "n/a"; `to_json` writes the keys in the order audit.json has always had.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import MRPUserError
from ..ops.gap import GapFit


@dataclass
class AuditSummary:
    """The numbers of one audit (docs/spec.md, "Audit"): margins m = top-1 minus top-2 logit, float32."""

    provenance: dict[str, Any]  # model, arguments, versions, data source, blocks and tokenizer sha256, dtypes
    n_positions: int
    accuracy: float
    margin_percentiles: dict[str, float]  # "p05" ... "p95"
    mean_margin: float
    fraction_margin_lt_0_5: float
    entropy_margin_spearman: float
    gap_fit: GapFit
    n_unique_margins: int
    mean_entropy: float
    mean_cross_entropy: float
    ece: float
    brier: float
    layers: dict[str, Any] | None = None  # the layer-wise lens' summary, when the audit ran one
    # mean margin of correct minus wrong predictions with its block-bootstrap interval (run_audit writes it; None
    # in an audit.json written before it existed, and in summaries built from positions alone)
    correct_wrong_gap: dict[str, Any] | None = None

    @property
    def median_margin(self) -> float:
        return self.margin_percentiles["p50"]

    def to_json(self) -> dict[str, Any]:
        """audit.json's content (``layers`` only when the lens ran)."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["gap_fit"] = self.gap_fit.to_dict()
        for optional in ("layers", "correct_wrong_gap"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditSummary:
        names = [field.name for field in dataclasses.fields(cls)]
        required = [field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise MRPUserError(
                f"audit.json lacks {', '.join(missing)}: it was not written by this hf_mrp; run "
                "`hf-mrp audit` again into a new folder"
            )
        values = {name: data[name] for name in names if name in data}
        return cls(**{**values, "gap_fit": GapFit(**data["gap_fit"])})
