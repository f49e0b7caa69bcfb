"""CREMA-D with the paper's recipe: 6 classes (anger, disgust, fear, happy, neutral, sad), 5 subject-independent
folds (HiCMAE's actor split; data/cremad/README.md), audio and video.

  python -m data.cremad.build --manual_dir /data/CREMA-D --data_dir datasets
  python launch.py --config configs/cremad.py --workdir runs/cremad --mode cross_validate
"""
from mma_dfer_jax import settings


def get_config():
  return settings.paper_config('cremad', num_classes=6)
