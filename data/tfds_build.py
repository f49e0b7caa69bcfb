"""TFDS's `tfds build` command without TensorFlow.

The `tfds` command line imports TensorFlow at start-up (for commands other than `build`), and this project does
not install it. This runs the same `build` command, with the same flags, on the builders in this folder:

  python -m data.tfds_build data/dfew --manual_dir /data/DFEW --data_dir datasets [--config fold1]
  python -m data.tfds_build data/mafw --manual_dir /data/MAFW --data_dir datasets [--config fold3]

Without --config every fold is built. The output is ArrayRecord (the builders' default file format), in
`<data_dir>/<name>/fold<k>/<version>/`, as `python -m data.<name>.build` writes it; any of data/<name>/ (dfew, mafw,
cremad, ravdess, ferv39k). Where TensorFlow is installed, `PYTHONPATH=. tfds build data/dfew ...` from the
repository root does the same (the builders import the `data` package).
"""
import sys

from absl import logging
from tensorflow_datasets.scripts.cli import build as tfds_build_command
from tensorflow_datasets.scripts.cli import cli_utils


def parse(argv) -> tfds_build_command.Args:
  """`tfds build`'s flags (argv without the program name)."""
  parser = cli_utils.make_flags_parser(tfds_build_command.Args, description=__doc__.split('\n')[0])
  return parser(['tfds build'] + list(argv))


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.INFO)
  args.execute()
  return 0


if __name__ == '__main__':
  sys.exit(main())
