"""Build MAFW's folds as ArrayRecord from the download (common.main; README.md here for its layout).

  python -m data.mafw.build --manual_dir M --data_dir D [--folds 1,2] [--annotations DIR] [--workers N]

Writes `<data_dir>/mafw/fold<k>/2.0.0/` per fold (the splits fold<k>_train, fold<k>_test). Imported, this module
is callable as the package's `build`: `data.mafw.build(manual_dir, data_dir, folds=[1])`.
"""
from data import common
from data.mafw import Mafw

main = common.build_command(__name__, Mafw)
