"""The `hf-mrp` commands, one module each (TRL's pattern): ``make_parser(subparsers)`` registers the command's
parser, built from its argument dataclasses, and ``main(*arguments)`` runs it on the parsed dataclasses, whole.

The one-line descriptions live here so that `hf-mrp --help` lists every command without importing any of them
(the training stack takes seconds to import).
"""

COMMANDS = {
    "audit": "float32 geometry audit of a model on fixed positions",
    "refine": "audit, refine with MRPTrainer (LoRA), audit again, compare (same flags as examples/refine.py)",
    "compare": "flip audit of two audit folders: hf-mrp compare BEFORE_DIR AFTER_DIR --output_dir D",
    "sweep": "dose-response sweep: objectives x lambdas x seeds, with a lambda = 0 control",
    "downstream": "downstream invariance through lm-evaluation-harness: base vs base + adapter",
    "push": "push a run folder to the Hub as the run does (what a failed push prints): hf-mrp push OUT",
    "lens": "tuned lens: hf-mrp lens train fits one affine translator per layer (then audit --lens tuned)",
}
