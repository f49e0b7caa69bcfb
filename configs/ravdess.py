"""RAVDESS audio-visual speech with the paper's recipe: 8 classes (neutral, calm, happy, sad, angry, fearful,
disgust, surprised), 6 subject-independent folds of 4 actors (fold k tests actors 4k-3..4k; data/ravdess/README.md),
audio and video.

  python -m data.ravdess.build --manual_dir /data/RAVDESS --data_dir datasets
  python launch.py --config configs/ravdess.py --workdir runs/ravdess --mode cross_validate --folds 1,2,3,4,5,6
"""
from mma_dfer_jax import settings


def get_config():
  return settings.paper_config('ravdess', num_classes=8)
