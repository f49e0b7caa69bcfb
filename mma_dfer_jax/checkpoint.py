"""Orbax checkpoints of parameters, with the experiment config beside them as JSON.

Two kinds of directory hold parameters:
- a *parameter checkpoint* (what `convert` writes): `DIR/params/` (Orbax) and `DIR/config.json`;
- a *training work directory* (what `launch.py` writes): `DIR/checkpoints/<step>/state/` (Orbax, with `params`
  inside) and `DIR/config.json`.
`load_params` and `load_config` accept either, so `init.checkpoint`, `predict --checkpoint` and `--mode eval` do too.
"""
import json
import os
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp

PARAMS_DIR = 'params'
CONFIG_FILE = 'config.json'
TRAIN_CHECKPOINTS_DIR = 'checkpoints'


class CheckpointNotFoundError(FileNotFoundError):
  pass


def save_config(directory, config) -> None:
  Path(directory).mkdir(parents=True, exist_ok=True)
  (Path(directory) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def save_params(directory, params, config) -> Path:
  """Write `params` as an Orbax checkpoint under DIR/params and the config as DIR/config.json."""
  directory = Path(directory).absolute()
  target = directory / PARAMS_DIR
  if target.exists():
    raise FileExistsError(f'{target} already exists: choose another --out or remove it')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, params)
  checkpointer.wait_until_finished()
  save_config(directory, config)
  return directory


def latest_train_step(workdir):
  root = Path(workdir).absolute() / TRAIN_CHECKPOINTS_DIR
  if not root.is_dir():
    return None
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / 'state').is_dir()]
  return max(steps) if steps else None


def load_params(path) -> dict:
  """Parameters from a parameter checkpoint or from the latest checkpoint of a training work directory."""
  path = Path(path).absolute()
  if (path / PARAMS_DIR).is_dir():
    return ocp.StandardCheckpointer().restore(path / PARAMS_DIR)
  step = latest_train_step(path)
  if step is not None:
    state = ocp.StandardCheckpointer().restore(path / TRAIN_CHECKPOINTS_DIR / str(step) / 'state')
    return state['params']
  if (path / '_CHECKPOINT_METADATA').is_file():  # an Orbax tree written directly at `path`
    return ocp.StandardCheckpointer().restore(path)
  raise CheckpointNotFoundError(
      f'{path}: no checkpoint here (expected {PARAMS_DIR}/ from `python -m mma_dfer_jax.convert` or '
      f'{TRAIN_CHECKPOINTS_DIR}/<step>/ from launch.py)')


def load_config(path):
  """The experiment config stored with a checkpoint, or None when there is none."""
  file = Path(path) / CONFIG_FILE
  if not file.is_file():
    return None
  return ml_collections.ConfigDict(json.loads(file.read_text()))
