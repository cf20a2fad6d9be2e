"""Trainer glue: MRPConfig, MRPTrainer and the adapter set-up they share."""

from .config import MRPConfig
from .trainer import MRPTrainer

__all__ = ["MRPConfig", "MRPTrainer"]
