"""The bottom layer: files written atomically, staged saves and swapped folders, folder locks (no torch, no HF)."""
