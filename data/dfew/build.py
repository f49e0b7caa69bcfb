"""Build DFEW's folds as ArrayRecord from the manual download.

  python -m data.dfew.build --manual_dir /data/DFEW --data_dir datasets [--folds 1,2] [--annotations DIR]
      [--workers N]

Writes `<data_dir>/dfew/fold<k>/1.0.0/` per fold (the splits fold<k>_train, fold<k>_test), which
`mma_dfer_jax.input_pipeline` reads with config.data_dir=<data_dir>. A complete fold is reused; an interrupted one
is rebuilt from the start. Wavs extracted from original clips are kept in `<data_dir>/downloads/dfew_wav/`.
"""
import sys

from data import common
from data.dfew import build_folds
from data.dfew import dfew_dataset_builder


def main(argv=None) -> int:
  return common.main(dfew_dataset_builder.Dfew, 'dfew', argv)


if __name__ == '__main__':
  sys.exit(main())
else:
  # Importing this module rebinds `data.dfew.build` from the function to the module; keep it callable alike.
  common.make_callable(sys.modules[__name__], build_folds)
