"""The training command (`mma-dfer-train`, or `python launch.py` in a checkout): train, evaluate, cross-validate.

  mma-dfer-train --config configs/mafw.py --workdir runs/mafw_fold1 [--config.fold=2 ...]
  mma-dfer-train --config configs/mafw.py --workdir runs/mafw_cv --mode cross_validate
  mma-dfer-train --config configs/mafw.py --workdir runs/eval --mode eval --config.init.checkpoint=converted/
  mma-dfer-train --workdir runs/mafw_fold1 --mode eval [--config.eval_batch_size=4]  (the run's saved config)
  mma-dfer-train --config configs/mafw.py --workdir runs/mafw_fold1 --mode extract [--split train]  (extract.py)

Re-running a command resumes from its work directory. Multi-host (not needed on TPU pods, where JAX finds its
peers): --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host. The config and the work
directory are checked before anything is computed or written; a user error is one line and exit code 2 (cli.py).
"""
import sys

from absl import app
from absl import flags
from absl import logging

from mma_dfer_jax import cli
from mma_dfer_jax import settings

FLAGS = flags.FLAGS
MODES = ('train', 'eval', 'cross_validate', 'extract')
CHECKPOINT_MODES = ('eval', 'extract')  # they start from the checkpoint's saved config when --config is not given


FLAG_NAMES = ('config', 'workdir', 'mode', 'folds', 'split', 'coordinator_address', 'num_processes', 'process_id',
              'cpu_collectives_gloo')


def stored_config(argv):
  """For the modes that read a checkpoint, without --config: the config saved with it (--config.init.checkpoint,
  else --workdir), pointed at that checkpoint. None otherwise. Read without JAX (the allocator is not set yet)."""
  if cli.flag_value(argv, 'mode') not in CHECKPOINT_MODES or cli.flag_value(argv, 'config') is not None:
    return None
  source = cli.flag_value(argv, 'config.init.checkpoint') or cli.flag_value(argv, 'workdir')
  config = settings.load_saved(source) if source else None
  if config is not None:
    config.init.checkpoint = source  # the checkpoint evaluated, not the one its training started from
  return config


def define_flags(argv) -> None:
  """The command's flags, listed by --help under the program being run (launch.py or mma-dfer-train)."""
  cli.define_config_flag(FLAGS, argv, 'Experiment config file, e.g. configs/mafw.py. --mode eval without it: the '
                         'config saved with the checkpoint.', stored=stored_config(argv),
                         no_config_hint='give --config FILE, e.g. --config configs/demo.py (--mode eval: or a '
                         'checkpoint that holds a config.json)')
  flags.DEFINE_string('workdir', None, 'Where checkpoints, logs, plots and summary.json go.')
  flags.DEFINE_enum('mode', 'train', list(MODES), 'What to run.')
  flags.DEFINE_list('folds', None, "Folds for --mode cross_validate (default: all of the dataset's protocol).")
  flags.DEFINE_enum('split', 'test', ['test', 'train'], 'The split --mode extract writes features of.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: address:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes (1: one process, no cluster detection).')
  flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
  flags.DEFINE_bool('cpu_collectives_gloo', True, 'Use gloo for cross-process collectives on CPU.')
  for name in FLAG_NAMES:  # absl's --help lists the flags of the module named like sys.argv[0]
    FLAGS.register_flag_by_module(argv[0], FLAGS[name])


def initialize_distributed():
  """A multi-process runtime wherever JAX knows the cluster (TPU VM pods, GKE, SLURM, Open MPI) or the flags say
  so; one process otherwise (mma_dfer_jax/distributed.py)."""
  from mma_dfer_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         cpu_collectives='gloo' if FLAGS.cpu_collectives_gloo else None)


def _folds(dataset: str) -> list:
  count = settings.num_folds(dataset)
  if FLAGS.folds is None:
    return list(range(1, count + 1))
  try:
    folds = [int(f) for f in FLAGS.folds]
  except ValueError:
    folds = []
  if not folds or any(not 1 <= f <= count for f in folds):
    raise cli.UserError(f'--folds={",".join(FLAGS.folds)}: {dataset} folds are numbered 1..{count}, e.g. '
                        f'--folds={",".join(map(str, range(1, min(count, 3) + 1)))}')
  return folds


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])} (settings go as --config.key=value)')
  config = FLAGS.config
  if config is None:
    raise cli.UserError('--config is required, e.g. --config configs/demo.py' + (
        f' (--mode {FLAGS.mode}: or a --workdir / --config.init.checkpoint holding a config.json)'
        if FLAGS.mode in CHECKPOINT_MODES else ''))
  if not FLAGS.workdir:
    raise cli.UserError('--workdir is required: the directory for checkpoints, logs and summary.json')
  cli.check_config(config)
  folds = _folds(config.dataset) if FLAGS.mode == 'cross_validate' else None
  cli.check_writable_dir(FLAGS.workdir, '--workdir')
  logging.set_verbosity(logging.WARNING)
  from mma_dfer_jax import cpu  # pylint: disable=import-outside-toplevel
  cpu.prepare_host(config)  # before JAX starts its CPU client
  initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  cli.check_config(config, jax.device_count(), jax.process_count())

  from mma_dfer_jax import experiment  # pylint: disable=import-outside-toplevel
  if FLAGS.mode == 'train':
    experiment.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'eval':
    experiment.evaluate_checkpoint(config, FLAGS.workdir)
  elif FLAGS.mode == 'extract':  # WORKDIR/features_fold<k>_<split>.npz (mma_dfer_jax/extract.py)
    from mma_dfer_jax import extract  # pylint: disable=import-outside-toplevel
    extract.extract_checkpoint(config, FLAGS.workdir, FLAGS.split)
  else:
    experiment.cross_validate(config, FLAGS.workdir, folds)


def run(argv=None):
  """The console script's entry point."""
  argv = list(sys.argv if argv is None else argv)
  cli.guard(define_flags, hard_exit=True)(argv)  # a missing --config file or an unknown key: one line
  app.run(cli.guard(main, hard_exit=True), argv=argv, flags_parser=cli.guard(lambda args: cli.parse_flags(FLAGS, args)))


if __name__ == '__main__':
  run()
