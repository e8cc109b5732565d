"""Training objectives: pure loss functions on embeddings."""
from wcl_fast.objectives.wcl import wcl_loss, wcl_loss_terms, weak_labels, weak_labels_sharded, contrastive_rows

__all__ = ["wcl_loss", "wcl_loss_terms", "weak_labels", "weak_labels_sharded", "contrastive_rows"]
