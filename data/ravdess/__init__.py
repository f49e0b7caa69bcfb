"""RAVDESS: the TFDS builder `Ravdess` (ravdess_dataset_builder.py) and `build(manual_dir, data_dir)`.

Command lines: `python -m data.ravdess.build --manual_dir M --data_dir D`, or TFDS's own
`tfds build data/ravdess --manual_dir M --data_dir D [--config fold1]` (where TensorFlow is installed;
`python -m data.tfds_build data/ravdess ...` takes the same flags without it).
"""
from .ravdess_dataset_builder import Ravdess
from data import common  # pylint: disable=g-bad-import-order  (after the builder, which makes `data` importable)

ALL_FOLDS = tuple(range(1, Ravdess.NUM_FOLDS + 1))


def build_folds(manual_dir, data_dir, folds=ALL_FOLDS, workers: int = 1) -> dict:
  """Builds (or reuses) RAVDESS's folds from the download; returns {fold: version directory}."""
  return common.build(Ravdess, manual_dir, data_dir, folds, None, workers)


build = build_folds  # data.ravdess.build(manual_dir, data_dir); the `build` submodule is callable the same way
