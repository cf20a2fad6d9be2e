"""The bottom layer: files written atomically, staged saves and reads (files.py), folders swapped in whole
(folders.py), folder locks (locks.py); no torch, no HF."""
