"""MAFW, the paper's recipe: 11 classes, 25 epochs, batch 8, AdamW 1e-4 / 1e-2, per-epoch cosine, 5 folds."""
from mma_dfer_jax import settings


def get_config():
  return settings.paper_config('mafw', num_classes=11)
