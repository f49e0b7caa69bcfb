"""FERV39k: the TFDS builder `Ferv39k` (ferv39k_dataset_builder.py) and `build(manual_dir, data_dir, folds=None,
annotations_dir=None, workers=1)` (common.build: all folds by default). Command lines: README.md here."""
import functools

from .ferv39k_dataset_builder import Ferv39k
from data import common  # pylint: disable=g-bad-import-order

build = functools.partial(common.build, Ferv39k)
