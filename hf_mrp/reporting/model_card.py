"""The model card (README.md) pushed with a refined adapter: settings, before/after geometry, plots."""

from __future__ import annotations

from pathlib import Path

MRP_FIELDS = ("mrp_objective", "mrp_lambda", "mrp_margin_threshold", "mrp_top_k", "lora_r", "lora_alpha",
              "lora_target_modules", "lora_layers", "learning_rate", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "seed")


def _geometry_rows(before: dict, after: dict) -> list[str]:
    def row(name: str, key) -> str:
        a, b = key(before), key(after)
        return f"| {name} | {a:.4f} | {b:.4f} | {b - a:+.4f} |"

    return [
        "| quantity | before | after | change |",
        "|---|---|---|---|",
        row("accuracy", lambda s: s["accuracy"]),
        row("median margin", lambda s: s["margin_percentiles"]["p50"]),
        row("Pr(m < 0.5)", lambda s: s["fraction_margin_lt_0_5"]),
        row("gap coefficient alpha", lambda s: s["gap_fit"]["alpha"]),
        row("gap fit R^2", lambda s: s["gap_fit"]["r_squared"]),
        row("mean cross-entropy", lambda s: s["mean_cross_entropy"]),
        row("ECE (15 bins)", lambda s: s["ece"]),
    ]


def model_card(
    base_model: str,
    settings: dict,
    before: dict,
    after: dict,
    comparison_markdown: str = "",
    images: list[str] | None = None,
) -> str:
    """Markdown with a YAML header that the Hub reads (library, base model, tags)."""
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base_model}" if "/" in base_model and " " not in base_model else "base_model: null",
        "tags:", "- hf_mrp", "- margin-refinement", "- lora",
        "---",
        "",
        "# Margin-refined adapter (hf_mrp)",
        "",
        f"A LoRA adapter for `{base_model}` trained with the margin refinement procedure: cross-entropy plus "
        f"lambda x the `{settings.get('mrp_objective')}` objective. Load it with "
        "`PeftModel.from_pretrained(base_model, this_repo)`.",
        "",
        "## MRP settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {settings[key]} |" for key in MRP_FIELDS if key in settings],
        "",
        f"## Geometry before and after ({before['n_positions']} audited positions, float32 logits)",
        "",
        *_geometry_rows(before, after),
        "",
    ]
    if comparison_markdown:
        lines += ["## Flip audit", "", comparison_markdown.strip(), ""]
    for image in images or []:
        lines += [f"![{Path(image).stem}]({image})", ""]
    lines += ["Audit JSON: `audit_before/audit.json`, `audit_after/audit.json`, `comparison/flip_audit.json`.", ""]
    return "\n".join(lines)
