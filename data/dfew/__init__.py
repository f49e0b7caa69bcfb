"""DFEW: the TFDS builder `Dfew` (dfew_dataset_builder.py) and `build(manual_dir, data_dir, folds=None,
annotations_dir=None, workers=1)` (common.build: all folds by default). Command lines: README.md here."""
import functools

from .dfew_dataset_builder import Dfew
from data import common  # pylint: disable=g-bad-import-order

build = functools.partial(common.build, Dfew)
