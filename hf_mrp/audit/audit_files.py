"""The names of an audit folder's files, in the order geometry.write_audit writes them (integrity.py checks a folder
against that order; the audit's writer swaps them all in at once)."""

AUDIT_MARKER = "audit.json"  # written last: its presence marks a finished audit
# an audit with layers draws these (manifold.png only with the manifold statistics)
LENS_PICTURES = ("layers.png", "lens_heatmap.png", "lens_curves.png", "manifold.png")
# The order in which geometry.write_audit writes an audit's other files (before AUDIT_MARKER).
WRITE_ORDER = (
    "blocks.npy",
    "mask.npy",
    "positions.parquet",
    "gap_curve.png",
    "margins.png",
    "layers.json",
    *LENS_PICTURES,
)

__all__ = ["AUDIT_MARKER", "LENS_PICTURES", "WRITE_ORDER"]
