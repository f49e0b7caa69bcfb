"""DFEW: the TFDS builder `Dfew` (dfew_dataset_builder.py) and `build(manual_dir, data_dir)`.

Command lines: `python -m data.dfew.build --manual_dir M --data_dir D`, or TFDS's own
`tfds build data/dfew --manual_dir M --data_dir D [--config fold1]` (where TensorFlow is installed;
`python -m data.tfds_build data/dfew ...` takes the same flags without it).
"""
from .dfew_dataset_builder import Dfew
from data import common  # pylint: disable=g-bad-import-order  (after the builder, which makes `data` importable)

ALL_FOLDS = tuple(range(1, common.NUM_FOLDS + 1))


def build_folds(manual_dir, data_dir, folds=ALL_FOLDS, annotations_dir=None, workers: int = 1) -> dict:
  """Builds (or reuses) DFEW's folds from the manual download; returns {fold: version directory}.

  annotations_dir: read the folds from the reference's `DFEW_set_<k>_{train,test}.txt` lists instead of the
  official split CSVs. workers: processes preparing clips.
  """
  return common.build(Dfew, manual_dir, data_dir, folds, annotations_dir, workers)


build = build_folds  # data.dfew.build(manual_dir, data_dir); the `build` submodule is callable the same way
