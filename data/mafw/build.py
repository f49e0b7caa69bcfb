"""Build MAFW's folds as ArrayRecord from the manual download (with face frames and wavs made from it).

  python -m data.mafw.build --manual_dir /data/MAFW --data_dir datasets [--folds 1,2] [--annotations DIR]
      [--workers N]

Writes `<data_dir>/mafw/fold<k>/1.0.0/` per fold (the splits fold<k>_train, fold<k>_test), which
`mma_dfer_jax.input_pipeline` reads with config.data_dir=<data_dir>. A complete fold is reused; an interrupted one
is rebuilt from the start. Wavs extracted from original clips are kept in `<data_dir>/downloads/mafw_wav/`.
"""
import sys

from data import common
from data.mafw import build_folds
from data.mafw import mafw_dataset_builder


def main(argv=None) -> int:
  return common.main(mafw_dataset_builder.Mafw, 'mafw', argv)


if __name__ == '__main__':
  sys.exit(main())
else:
  # Importing this module rebinds `data.mafw.build` from the function to the module; keep it callable alike.
  common.make_callable(sys.modules[__name__], build_folds)
