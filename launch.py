"""Train, evaluate and cross-validate MMA-DFER.

  python launch.py --config configs/mafw.py --workdir runs/mafw_fold1 [--config.fold=2 ...]
  python launch.py --config configs/mafw.py --workdir runs/mafw_cv --mode cross_validate
  python launch.py --config configs/mafw.py --workdir runs/eval --mode eval --config.init.checkpoint=converted/

Re-running a command resumes from its work directory. Multi-host (not needed on TPU pods, where JAX finds its
peers): --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host.
"""
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/ import `configs.common`

config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/mafw.py.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs, plots and summary.json go.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'cross_validate'], 'What to run.')
flags.DEFINE_list('folds', ['1', '2', '3', '4', '5'], 'Folds for --mode cross_validate.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: address:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.DEFINE_bool('cpu_collectives_gloo', True, 'Use gloo for cross-process collectives on CPU.')
FLAGS = flags.FLAGS

DATASETS = ('dfew', 'mafw', 'synthetic')


def fail(message: str):
  """One clear line, no traceback."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def validate(config):
  if config.dataset not in DATASETS:
    fail(f'config.dataset={config.dataset!r}: unknown dataset; use one of {", ".join(DATASETS)}')
  if not 1 <= config.fold <= 5:
    fail(f'config.fold={config.fold}: folds are numbered 1..5')
  if config.model.depth % 6:
    fail(f'config.model.depth={config.model.depth}: must be a multiple of 6 (prompt stages every 6 blocks)')


def initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.num_processes and FLAGS.num_processes > 1:
    if FLAGS.cpu_collectives_gloo:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()  # TPU pods: JAX discovers the peers itself


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  if config is None:
    fail('--config is required, e.g. --config configs/demo.py')
  if not FLAGS.workdir:
    fail('--workdir is required')
  validate(config)
  logging.set_verbosity(logging.WARNING)
  from mma_dfer_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure(config)  # before JAX starts its CPU client
  initialize_distributed()

  from mma_dfer_jax import experiment  # pylint: disable=g-import-not-at-top
  from mma_dfer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  user_errors = (experiment.UserError, input_pipeline.DatasetError, FileNotFoundError)
  try:
    if FLAGS.mode == 'train':
      experiment.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      experiment.evaluate_checkpoint(config, FLAGS.workdir)
    else:
      folds = [int(f) for f in FLAGS.folds]
      if any(not 1 <= f <= 5 for f in folds):
        fail(f'--folds={",".join(FLAGS.folds)}: folds are numbered 1..5')
      experiment.cross_validate(config, FLAGS.workdir, folds)
  except user_errors as e:
    fail(str(e))


def parse_flags(argv):
  """absl's parsing, with a bad --config.key=value override reported as one line."""
  for i, arg in enumerate(argv):
    path = arg.split('=', 1)[1] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path is not None and not os.path.isfile(path.split(':')[0]):
      fail(f'--config {path}: no such file (configs/dfew.py, configs/mafw.py and configs/demo.py come with the code)')
  try:
    return FLAGS(argv)
  except (KeyError, AttributeError) as e:  # ml_collections: the overridden key does not exist
    text = str(e).replace('\\', '')
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    fail(f'config key {key.group(1) if key else text!r} does not exist'
         + (f' (did you mean {hint.group(1)!r}?)' if hint else '') + '; see the config file for the available keys')
  except flags.Error as e:
    fail(' '.join(str(e).split()))


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
