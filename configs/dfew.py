"""DFEW, the paper's recipe: 7 classes, 25 epochs, batch 8, AdamW 1e-4 / 1e-2, per-epoch cosine, 5 folds."""
from mma_dfer_jax import settings


def get_config():
  return settings.paper_config('dfew', num_classes=7)
