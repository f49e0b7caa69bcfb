"""FERV39k: the TFDS builder `Ferv39k` (ferv39k_dataset_builder.py) and `build(manual_dir, data_dir)`.

Command lines: `python -m data.ferv39k.build --manual_dir M --data_dir D`, or TFDS's own
`tfds build data/ferv39k --manual_dir M --data_dir D [--config fold1]` (where TensorFlow is installed;
`python -m data.tfds_build data/ferv39k ...` takes the same flags without it).
"""
from .ferv39k_dataset_builder import Ferv39k
from data import common  # pylint: disable=g-bad-import-order  (after the builder, which makes `data` importable)

ALL_FOLDS = tuple(range(1, Ferv39k.NUM_FOLDS + 1))


def build_folds(manual_dir, data_dir, folds=ALL_FOLDS, workers: int = 1) -> dict:
  """Builds (or reuses) FERV39k's folds from the download; returns {fold: version directory}."""
  return common.build(Ferv39k, manual_dir, data_dir, folds, None, workers)


build = build_folds  # data.ferv39k.build(manual_dir, data_dir); the `build` submodule is callable the same way
