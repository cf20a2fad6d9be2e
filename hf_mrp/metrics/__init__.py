"""`evaluate` metric modules shipped with hf_mrp, loadable by local path."""

from pathlib import Path

FLIP_AUDIT_PATH = str(Path(__file__).parent / "flip_audit" / "flip_audit.py")


def load_flip_audit():
    """`evaluate.load` of the flip-audit metric from the installed package (no Hub access)."""
    import evaluate

    return evaluate.load(FLIP_AUDIT_PATH)
