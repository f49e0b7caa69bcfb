"""FERV39k with the paper's recipe: 7 classes (DFEW's), the official train/test split (built as fold 1; fold is
always 1), no audio: every clip's fbank is the silent one, as MAFW's clips without audio get (data/ferv39k/README.md).

The model is the audio-visual one fed the silent fbank; a video-only model (--config.model.modalities=video) is the
natural choice for this dataset.

  python -m data.ferv39k.build --manual_dir /data/FERV39k --data_dir datasets
  python launch.py --config configs/ferv39k.py --workdir runs/ferv39k
"""
from mma_dfer_jax import settings


def get_config():
  return settings.paper_config('ferv39k', num_classes=7)
