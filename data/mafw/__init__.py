"""MAFW: the TFDS builder `Mafw` (mafw_dataset_builder.py) and `build(manual_dir, data_dir)`.

Command lines: `python -m data.mafw.build --manual_dir M --data_dir D`, or TFDS's own
`tfds build data/mafw --manual_dir M --data_dir D [--config fold1]` (where TensorFlow is installed;
`python -m data.tfds_build data/mafw ...` takes the same flags without it).
"""
from .mafw_dataset_builder import Mafw
from data import common  # pylint: disable=g-bad-import-order  (after the builder, which makes `data` importable)

ALL_FOLDS = tuple(range(1, common.NUM_FOLDS + 1))


def build_folds(manual_dir, data_dir, folds=ALL_FOLDS, annotations_dir=None, workers: int = 1) -> dict:
  """Builds (or reuses) MAFW's folds from the manual download; returns {fold: version directory}.

  annotations_dir: read the folds from the reference's `MAFW_set_<k>_{train,test}_faces.txt` lists instead of the
  official split files. workers: processes preparing clips.
  """
  return common.build(Mafw, manual_dir, data_dir, folds, annotations_dir, workers)


build = build_folds  # data.mafw.build(manual_dir, data_dir); the `build` submodule is callable the same way
