"""Training objectives, one module per method: its pure loss functions and its Objective subclass
(registered in wcl_fast.objectives.base). Shared row primitives: wcl_fast.objectives.rows."""
from wcl_fast.objectives import clinfonce, co2, simclr, slr, wcl  # noqa: F401 (each registers its objective)
from wcl_fast.objectives.base import (OBJECTIVES, BufferGuard, Objective, TrainingSet, autocast_factory,
                                      build_objective, register, two_heads)
from wcl_fast.objectives.rows import contrastive_rows
from wcl_fast.objectives.wcl import KNN_LABEL_BLOCKS, compute_loss, wcl_loss, wcl_loss_terms, weak_labels, weak_labels_sharded

__all__ = ["OBJECTIVES", "BufferGuard", "KNN_LABEL_BLOCKS", "Objective", "TrainingSet", "autocast_factory",
           "build_objective", "compute_loss", "contrastive_rows", "register", "two_heads", "wcl_loss", "wcl_loss_terms",
           "weak_labels", "weak_labels_sharded"]
