"""The research harness around the plugin: the `hf-mrp` CLI and its commands, the argument dataclasses and their
parser, the refine pipeline, presets, the sweep, downstream evaluation and the reports of sweeps and runs.

It imports the plugin core (`hf_mrp.ops`, `stats`, `data`, `models`, `audit`, `training`, ...); nothing in the
plugin core imports it, so a user who only trains with `MRPTrainer` never loads it.
"""
