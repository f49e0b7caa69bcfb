"""Build FERV39k's folds as ArrayRecord from the download as its owners distribute it.

  python -m data.ferv39k.build --manual_dir /data/FERV39k --data_dir datasets [--folds 1,2] [--workers N]

Writes `<data_dir>/ferv39k/fold<k>/1.0.0/` per fold (the splits fold<k>_train, fold<k>_test), which
`mma_dfer_jax.input_pipeline` reads with config.dataset='ferv39k', config.data_dir=<data_dir>. A complete fold is
reused; an interrupted one is rebuilt from the start. What is derived from the download is kept in
`<data_dir>/downloads/ferv39k_*/`. See data/ferv39k/README.md.
"""
import sys

from data import common
from data.ferv39k import build_folds
from data.ferv39k import ferv39k_dataset_builder


def main(argv=None) -> int:
  return common.main(ferv39k_dataset_builder.Ferv39k, 'ferv39k', argv)


if __name__ == '__main__':
  sys.exit(main())
else:
  # Importing this module rebinds `data.ferv39k.build` from the function to the module; keep it callable alike.
  common.make_callable(sys.modules[__name__], build_folds)
