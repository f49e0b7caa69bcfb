"""CREMA-D: the TFDS builder `Cremad` (cremad_dataset_builder.py) and `build(manual_dir, data_dir)`.

Command lines: `python -m data.cremad.build --manual_dir M --data_dir D`, or TFDS's own
`tfds build data/cremad --manual_dir M --data_dir D [--config fold1]` (where TensorFlow is installed;
`python -m data.tfds_build data/cremad ...` takes the same flags without it).
"""
from .cremad_dataset_builder import Cremad
from data import common  # pylint: disable=g-bad-import-order  (after the builder, which makes `data` importable)

ALL_FOLDS = tuple(range(1, Cremad.NUM_FOLDS + 1))


def build_folds(manual_dir, data_dir, folds=ALL_FOLDS, workers: int = 1) -> dict:
  """Builds (or reuses) CREMA-D's folds from the download; returns {fold: version directory}."""
  return common.build(Cremad, manual_dir, data_dir, folds, None, workers)


build = build_folds  # data.cremad.build(manual_dir, data_dir); the `build` submodule is callable the same way
