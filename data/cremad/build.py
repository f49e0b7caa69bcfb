"""Build CREMA-D's folds as ArrayRecord from the download as its owners distribute it.

  python -m data.cremad.build --manual_dir /data/CREMA-D --data_dir datasets [--folds 1,2] [--workers N]

Writes `<data_dir>/cremad/fold<k>/1.0.0/` per fold (the splits fold<k>_train, fold<k>_test), which
`mma_dfer_jax.input_pipeline` reads with config.dataset='cremad', config.data_dir=<data_dir>. A complete fold is
reused; an interrupted one is rebuilt from the start. What is derived from the download is kept in
`<data_dir>/downloads/cremad_*/`. See data/cremad/README.md.
"""
import sys

from data import common
from data.cremad import build_folds
from data.cremad import cremad_dataset_builder


def main(argv=None) -> int:
  return common.main(cremad_dataset_builder.Cremad, 'cremad', argv)


if __name__ == '__main__':
  sys.exit(main())
else:
  # Importing this module rebinds `data.cremad.build` from the function to the module; keep it callable alike.
  common.make_callable(sys.modules[__name__], build_folds)
