"""Orbax checkpoints of parameters, with the experiment config beside them as JSON.

Two kinds of directory hold parameters:
- a *parameter checkpoint* (what `convert` writes): `DIR/params/` (Orbax) and `DIR/config.json`;
- a *training work directory* (what `launch.py` writes): `DIR/checkpoints/<step>/state/` (Orbax, with `params`
  inside) and `DIR/config.json`.
`load_params` and `load_config` accept either, so `init.checkpoint`, `predict --checkpoint` and `--mode eval` do too.

Damaged checkpoints heal: a training step that does not restore (a truncated array file, an empty `_METADATA`, a
garbled iterator state, missing files) while an older one does is moved aside to
`DIR/checkpoints.damaged/<step>-<time>/` (outside Orbax's step folders, never deleted) with one warning, and the
older step is used. When no step restores nothing is moved (NoIntactCheckpointError). Only process 0 moves folders.

Every directory may be local or a URL such as `gs://bucket/run` (etils.epath, as Orbax itself): `as_path` makes
either an epath.Path, local ones absolute (Orbax needs absolute local paths).
"""
import datetime
import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mma_dfer_jax import settings

PARAMS_DIR = 'params'
CONFIG_FILE = 'config.json'
TRAIN_CHECKPOINTS_DIR = 'checkpoints'
DAMAGED_SUFFIX = '.damaged'


class CheckpointNotFoundError(FileNotFoundError):
  pass


def is_url(path) -> bool:
  return '://' in str(path)


def as_path(path) -> epath.Path:
  """An epath.Path for a local path (made absolute: Orbax needs that) or a URL such as gs://bucket/run (kept)."""
  return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(os.fspath(path)))


def write_text_atomically(path, text: str) -> None:
  """Write to a temporary file beside `path`, then rename it over `path`: readers see the old or the new file.
  Object stores (gs://) show an object only once it is complete, so there it is written in place."""
  path = as_path(path)
  if is_url(path):
    path.write_text(text)
    return
  temporary = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  temporary.write_text(text)
  temporary.replace(path)


def save_config(directory, config) -> None:
  directory = as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_text_atomically(directory / CONFIG_FILE, config.to_json_best_effort(indent=2))


def save_params(directory, params, config) -> epath.Path:
  """Write `params` as an Orbax checkpoint under DIR/params and the config as DIR/config.json."""
  directory = as_path(directory)
  target = directory / PARAMS_DIR
  if target.exists():
    raise FileExistsError(f'{target} already exists: choose another --out or remove it')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, params)
  checkpointer.wait_until_finished()
  save_config(directory, config)
  return directory


def train_steps(workdir) -> list:
  """The finalized training steps in `workdir/checkpoints`, oldest first (Orbax's own listing)."""
  root = as_path(workdir) / TRAIN_CHECKPOINTS_DIR
  if not root.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(root))


def move_aside(step_dir, error: BaseException) -> None:
  """Rename a damaged step folder to `<checkpoints>.damaged/<step>-<time>` (process 0 only) with one warning."""
  step_dir = as_path(step_dir)
  reason = ' '.join(f'{type(error).__name__}: {error}'.split())[:300]
  if jax.process_index() != 0:
    return
  aside = step_dir.parent.parent / (step_dir.parent.name + DAMAGED_SUFFIX)
  target = aside / f'{step_dir.name}-{datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")}'
  try:
    aside.mkdir(parents=True, exist_ok=True)
    if is_url(aside):  # object stores have no empty folders, and epath renames only into an existing one
      (aside / 'README.txt').write_text('Checkpoint steps that did not restore, moved here from '
                                        f'{step_dir.parent.name}/ (see the run\'s log).\n')
    step_dir.rename(target)
  except OSError as e:  # a read-only copy: skip the step without moving it
    logging.warning('Checkpoint %s does not restore (%s); skipping it (could not move it aside: %s)',
                    step_dir, reason, e)
    return
  logging.warning('Checkpoint %s does not restore (%s); moved it to %s and using the previous one',
                  step_dir, reason, target)


class NoIntactCheckpointError(CheckpointNotFoundError):
  """No step of a work directory restores: nothing was moved (a systematic cause, such as another config or process
  count, is likelier than every step being damaged)."""


def restore_newest_intact(workdir, restore_step):
  """`(step, restore_step(step))` for the newest step that restores; the newer steps that did not are moved aside.

  `(None, None)` when there is no step. When no step restores, nothing is moved and NoIntactCheckpointError names
  the newest step's error.
  """
  root = as_path(workdir) / TRAIN_CHECKPOINTS_DIR
  steps = train_steps(workdir)
  failed = []
  for step in reversed(steps):
    try:
      restored = restore_step(step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      failed.append((step, e))
      continue
    for damaged, error in failed:
      move_aside(root / str(damaged), error)
    return step, restored
  if not failed:
    return None, None
  step, error = failed[0]
  reason = ' '.join(f'{type(error).__name__}: {error}'.split())[:300]
  raise NoIntactCheckpointError(
      f'{root}: none of the checkpoints {steps} restores (step {step}: {reason}); nothing was moved. If they are '
      f'damaged, move {root} aside to start afresh; else rerun with the config and process count they were made with')


def _restore_tree(path):
  """The tree at `path` on this process's first device, whatever mesh and process count wrote it (a restore without
  a target would ask for the writer's topology: 'Topology mismatch' on a laptop after training on 4 devices)."""
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, 'item_metadata', None) or metadata
  tree = getattr(tree, 'tree', tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)


def load_params(path) -> dict:
  """Parameters from a parameter checkpoint or from the newest intact checkpoint of a training work directory."""
  path = as_path(path)
  if (path / PARAMS_DIR).is_dir():
    return _restore_tree(path / PARAMS_DIR)
  steps = train_steps(path)
  if steps:
    _, state = restore_newest_intact(
        path, lambda step: _restore_tree(path / TRAIN_CHECKPOINTS_DIR / str(step) / 'state'))
    return state['params']
  if (path / '_CHECKPOINT_METADATA').is_file():  # an Orbax tree written directly at `path`
    return _restore_tree(path)
  raise CheckpointNotFoundError(
      f'{path}: no checkpoint here (expected {PARAMS_DIR}/ from `python -m mma_dfer_jax.convert` or '
      f'{TRAIN_CHECKPOINTS_DIR}/<step>/ from launch.py)')


def load_config(path):
  """The experiment config stored with a checkpoint, an older one's missing keys filled from the defaults
  (settings.upgrade), or None when there is none."""
  return settings.load_saved(as_path(path))
