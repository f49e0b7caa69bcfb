"""Build RAVDESS's folds as ArrayRecord from the download as its owners distribute it.

  python -m data.ravdess.build --manual_dir /data/RAVDESS --data_dir datasets [--folds 1,2] [--workers N]

Writes `<data_dir>/ravdess/fold<k>/1.0.0/` per fold (the splits fold<k>_train, fold<k>_test), which
`mma_dfer_jax.input_pipeline` reads with config.dataset='ravdess', config.data_dir=<data_dir>. A complete fold is
reused; an interrupted one is rebuilt from the start. What is derived from the download is kept in
`<data_dir>/downloads/ravdess_*/`. See data/ravdess/README.md.
"""
import sys

from data import common
from data.ravdess import build_folds
from data.ravdess import ravdess_dataset_builder


def main(argv=None) -> int:
  return common.main(ravdess_dataset_builder.Ravdess, 'ravdess', argv)


if __name__ == '__main__':
  sys.exit(main())
else:
  # Importing this module rebinds `data.ravdess.build` from the function to the module; keep it callable alike.
  common.make_callable(sys.modules[__name__], build_folds)
