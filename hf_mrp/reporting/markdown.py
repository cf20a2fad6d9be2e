"""Markdown number formats and tables: flip_audit.md, the model card's results section and the sweep's results.md."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

MARKDOWN_SPECIALS = "\\`*_[]<>|#"
TOP_TOKEN_ROWS = 10


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def fmt_number(value: Any, digits: int = 3) -> str:
    return "n/a" if _missing(value) else f"{value:.{digits}f}"


def fmt_percent(value: Any, digits: int = 1, signed: bool = False) -> str:
    return "n/a" if _missing(value) else f"{100 * value:{'+' if signed else ''}.{digits}f}%"


def fmt_count(value: Any, signed: bool = False) -> str:
    """A count with thousands separators; a fractional one (a mean over seeds) keeps one decimal."""
    if _missing(value):
        return "n/a"
    sign = "+" if signed else ""
    return f"{value:{sign},.0f}" if float(value).is_integer() else f"{value:{sign},.1f}"


def fmt_ratio(value: Any, missing: str = "n/a (no R->W)") -> str:
    return missing if _missing(value) else f"{value:.2f}x"


def fmt_kind(value: Any, kind: str) -> str:
    """One number by its kind: count, signed_count, percent, signed_percent, ratio, r2 (4 decimals) or number."""
    if _missing(value):
        return "n/a"
    if kind in ("count", "signed_count"):
        return fmt_count(value, signed=kind == "signed_count")
    if kind in ("percent", "signed_percent"):
        return fmt_percent(value, signed=kind == "signed_percent")
    if kind == "ratio":
        return fmt_ratio(value)
    return fmt_number(value, 4 if kind == "r2" else 3)


def escape_cell(text: str) -> str:
    """Backslash-escape the characters Markdown would read as formatting or a column break."""
    return "".join(f"\\{char}" if char in MARKDOWN_SPECIALS else char for char in text)


def escape_token(text: str | None) -> str:
    """A decoded token quoted, with its spaces visible and newlines as escapes, safe in a table cell."""
    return "n/a" if text is None else escape_cell(repr(text))


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _headline(result: dict) -> str:
    rows = []
    for name in ("before", "after"):
        fit = result.get(f"gap_fit_{name}") or {}
        rows.append(
            [
                name,
                fmt_percent(result[f"accuracy_{name}"], 2),
                fmt_number(result[f"median_margin_{name}"]),
                fmt_number(fit.get("alpha")),
                fmt_number(fit.get("beta")),
                fmt_number(fit.get("r_squared"), 4),
                fmt_number(result[f"ece_{name}"], 4),
                fmt_number(result[f"brier_{name}"], 4),
            ]
        )
    header = ["", "accuracy", "median margin", "gap alpha", "gap beta", "gap R^2", "ECE", "Brier"]
    return table(header, rows)


def _flips(result: dict) -> str:
    rotation, expansion = result["runner_up_rotation"], result["expansion"]
    row = [
        fmt_count(result["w2r"]),
        fmt_count(result["r2w"]),
        fmt_count(result["net"]),
        fmt_ratio(result["flip_ratio"]),
        fmt_percent(result["churn"]),
        fmt_percent(rotation["share"]),
        fmt_percent(rotation["widened_share"]),
        fmt_number(rotation.get("mean_margin_change")),
        fmt_percent(result["median_margin_change"], signed=True),
        fmt_percent(expansion["share_wider"]),
        fmt_number(expansion["mean_change"]),
        fmt_percent(result.get("head_share")),
    ]
    header = [
        "W->R",
        "R->W",
        "net",
        "flip ratio",
        "churn",
        "runner-up rotation",
        "rotated & widened",
        "rotated: mean margin change",
        "median margin change",
        "wider margins",
        "mean margin change",
        "head share (100+)",
    ]
    return table(header, [row])


def _group_table(groups: dict, first_column: str, share: bool = False) -> str:
    header = [first_column, "n", "W->R", "R->W", "net"] + (["share of net"] if share else [])
    header += ["accuracy before", "accuracy after"]
    rows = []
    for label, group in groups.items():
        row = [
            escape_cell(str(label)),
            fmt_count(group["n"]),
            fmt_count(group["w2r"]),
            fmt_count(group["r2w"]),
            fmt_count(group["net"]),
        ]
        row += [fmt_percent(group.get("share_of_net"))] if share else []
        row += [fmt_percent(group["accuracy_before"], 2), fmt_percent(group["accuracy_after"], 2)]
        rows.append(row)
    return table(header, rows)


def _own_band_table(bands: dict) -> str:
    rows = [
        [
            escape_cell(str(label)),
            fmt_count(band["n_before"]),
            fmt_percent(band["accuracy_before"], 2),
            fmt_count(band["n_after"]),
            fmt_percent(band["accuracy_after"], 2),
        ]
        for label, band in bands.items()
    ]
    return table(["margin band", "n before", "accuracy before", "n after", "accuracy after"], rows)


def _token_table(entries: list[dict]) -> str:
    rows = [
        [escape_token(e["token"]), str(e["token_id"]), fmt_count(e["w2r"]), fmt_count(e["r2w"]), fmt_count(e["net"])]
        for e in entries[:TOP_TOKEN_ROWS]
    ]
    return table(["token", "id", "W->R", "R->W", "net"], rows) if rows else "(none)"


def markdown_summary(result: dict, heading: str = "##") -> str:
    """The flip audit as Markdown sections; ``heading`` sets their level (deeper inside a model card)."""
    sub = heading + "#"
    parts = [
        f"{heading} Before/after flip audit",
        f"{fmt_count(result['n_positions'])} positions, the same in both audits "
        f"(blocks sha256 {str(result.get('blocks_sha256', ''))[:12]}).",
        _headline(result),
        f"{sub} Flips",
        "W->R: wrong before, right after. R->W: right before, wrong after. Churn: top-1 token changed. "
        "Runner-up rotation: top-1 unchanged, top-2 changed.",
        _flips(result),
        f"{sub} By margin band (before)",
        "Both audits' positions grouped by the margin BEFORE refinement (fixed rows).",
        _group_table(result["accuracy_by_margin_band"], "margin band"),
    ]
    if result.get("accuracy_by_own_margin_band") is not None:
        parts += [
            f"{sub} By each model's own margin band (the paper's convention)",
            "Each audit grouped by its own margins, so a band holds different positions before and after.",
            _own_band_table(result["accuracy_by_own_margin_band"]),
        ]
    parts += [
        *(
            [f"{sub} By token class of the target", _group_table(result["by_class"], "class", share=True)]
            if result.get("by_class") is not None
            else []
        ),
        f"{sub} By frequency of the target in the blocks",
        _group_table(result["by_bucket"], "count bucket"),
        f"{sub} Largest per-token net gains",
        _token_table(result.get("top_gain", [])),
        f"{sub} Largest per-token net losses",
        _token_table(result.get("top_loss", [])),
    ]
    return "\n\n".join(parts) + "\n"


def flip_summary_line(comparison: dict) -> str:
    """The one line `hf-mrp refine` and `hf-mrp compare` print: flips, net, and the median margin before -> after."""
    change = comparison["median_margin_change"]
    return (
        f"W->R {comparison['w2r']}  R->W {comparison['r2w']}  net {comparison['net']}  "
        f"median margin {comparison['median_margin_before']:.4f} -> {comparison['median_margin_after']:.4f} "
        f"({'n/a' if change is None else format(change, '+.1%')})"
    )


MANIFOLD_COLUMNS = (  # (audit.json's layers.manifold.by_layer key, column)
    ("participation_ratio", "participation ratio"),
    ("variance_dims_90", "dims for 90%"),
    ("intrinsic_dimension_twonn", "TwoNN"),
    ("intrinsic_dimension_mle", "MLE"),
    ("curvature", "curvature"),
)


def manifold_table(before: dict | None, after: dict | None, heading: str = "##") -> list[str]:
    """The model card's hidden-state manifold section: per layer, each statistic before -> after (audit.json's
    ``layers.manifold``); nothing unless both audits measured it."""
    before, after = before or {}, after or {}
    if not before.get("manifold") or not after.get("manifold"):
        return []
    was = {line["layer"]: line for line in before["manifold"]["by_layer"]}

    def change(line: dict, key: str) -> str:
        return f"{fmt_number(was.get(line['layer'], {}).get(key))} -> {fmt_number(line.get(key))}"

    lines = after["manifold"]["by_layer"]
    rows = [[str(line["layer"]), *[change(line, key) for key, _ in MANIFOLD_COLUMNS]] for line in lines]
    sample = after["manifold"]
    return [
        f"{heading} Hidden-state manifold per layer, before -> after ({sample['sampled_positions']} of "
        f"{sample['audited_positions']} audited positions, Levina-Bickel k = {sample['k']}; layers.json, manifold.png)",
        "",
        table(["layer", *[column for _, column in MANIFOLD_COLUMNS]], rows),
        "",
    ]
