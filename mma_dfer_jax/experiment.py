"""The experiment loop of the paper's protocol: train a fold, evaluate after every epoch, cross-validate folds.

Works unchanged on one CPU, many devices and many hosts: every process runs this code, feeds its slice of each
global batch, and only process 0 writes logs, plots and summaries (Orbax writes checkpoints collectively). The work
directory is a local path or a gs:// URL (etils.epath, as Orbax). Every decision that takes a collective path (the
resume step, the epochs still to evaluate, the final figures, a finished fold, a rerun's config check) is made on
process 0 and broadcast (multihost.py): no process decides from a file another process wrote. A work directory that
is not shared between the processes stops the run at start. SIGTERM to any process makes every process save at the
same step and exit 0 (JAX's preemption sync point). Checkpoints hold the train state only: the input position
follows from the step (the global batches do not depend on the process count), so a run resumes on any number of
processes and devices, and evaluation and prediction read a checkpoint onto one device whatever wrote it.

Faults. Before anything is written: the work directory must be writable (a probe file in checkpoints/); a rerun of a
work directory that holds checkpoints must use the config they were made with, except for `RERUN_MAY_CHANGE` (more
epochs, logging, checkpoint frequency, eval batch, input threads, mesh, compute-only model settings), else one
UserError names the differing keys; only then is config.json (re)written, atomically. Resume takes the newest
checkpoint that restores; a damaged one is moved aside to checkpoints.damaged/ (checkpoint.py; with several processes
process 0 picks the step and broadcasts it). A torn last line of metrics.jsonl is dropped with a warning. Checkpoints
are written synchronously, so a write that fails (full disk, lost permissions) stops the run at that save with one
line naming the path and the OS error, instead of Orbax's background error and 300 s signal timeout. A step whose
loss or gradient norm is NaN/inf stops the run (NonFiniteError: the step and the clip ids of its batch) when the
losses are next fetched, which is before any checkpoint: no non-finite state is saved, and the finite steps'
arithmetic is untouched (no extra host sync: the check reads the metrics the loop fetches anyway).
"""
import dataclasses
import json
import logging as pylogging
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mma_dfer_jax import checkpoint
from mma_dfer_jax import convert
from mma_dfer_jax import cpu
from mma_dfer_jax import input_pipeline
from mma_dfer_jax import labels as labels_lib
from mma_dfer_jax import metrics as metrics_lib
from mma_dfer_jax import models
from mma_dfer_jax import multihost
from mma_dfer_jax import sharding
from mma_dfer_jax import train

METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'


class UserError(Exception):
  """A mistake in the command line, config or files: reported as one line, without a traceback."""


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (a full disk, lost permissions): the path and the OS error, in one line."""


class NonFiniteError(UserError):
  """The loss or the gradient of a step was NaN or infinite: the step and the clip ids of its batch."""


def is_main_process() -> bool:
  return jax.process_index() == 0


as_path = checkpoint.as_path  # a gs:// URL as it is, a local path made absolute (as Orbax takes them)


def say(message: str) -> None:
  if is_main_process():
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Starting parameters.

def _check_param_shapes(params, model_config, where):
  expected = convert.param_shapes(model_config)
  import flax  # pylint: disable=g-import-not-at-top
  got = {p: tuple(np.shape(v)) for p, v in flax.traverse_util.flatten_dict(params).items()}
  bad = sorted('/'.join(p) for p in set(expected) | set(got) if expected.get(p) != got.get(p))
  if bad:
    raise UserError(f'{where}: parameters do not fit config.model ({", ".join(bad[:6])}'
                    f'{" ..." if len(bad) > 6 else ""}); use the config the checkpoint was made with')


def initial_params(config, rng):
  """init.checkpoint, else the SSL encoders, else random encoders (said loudly)."""
  init = config.init
  if init.checkpoint:
    if not as_path(init.checkpoint).exists():
      raise UserError(f'init.checkpoint={init.checkpoint}: no such directory')
    try:
      params = checkpoint.load_params(init.checkpoint)
    except checkpoint.CheckpointNotFoundError as e:
      raise UserError(str(e)) from None
    _check_param_shapes(params, config.model, init.checkpoint)
    say(f'Starting from the Flax checkpoint {init.checkpoint}')
    return params
  if init.face_checkpoint or init.audio_checkpoint:
    needed = [f'{role}_checkpoint' for _, role in convert.ssl_encoders(config.model)]  # a unimodal model: one file
    for name in needed:
      path = init[name]
      if not path or not as_path(path).is_file():
        raise UserError(f'init.{name}={path!r}: file not found. Download the SSL weights (see README), or pass '
                        f'--config.init.{name}=PATH; --config.init.face_checkpoint= --config.init.audio_checkpoint= '
                        'trains from random encoders')
    say(f'Starting from the SSL encoders {" and ".join(init[name] for name in needed)}')
    try:
      return convert.init_from_ssl(config.model, init.face_checkpoint, init.audio_checkpoint, rng)
    except (convert.ConversionError, ValueError) as e:
      raise UserError(str(e)) from None
  banner = '!' * 100
  logging.warning('No init.checkpoint and no SSL files: training from RANDOM encoders.')
  say(f'{banner}\n!! WARNING: no init.checkpoint and no init.face_checkpoint/audio_checkpoint: the encoders are RANDOM.\n'
      f'!! Fine for the synthetic demo; for DFEW/MAFW convert the SSL weights first (see README).\n{banner}')
  return models.init_params(config.model, rng)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: the train state, the epoch's running loss and the input iterator, every N steps and every epoch.

def _checkpoint_tree(state, loss_sum, loss_count):
  return {'params': state.params, 'opt_state': state.opt_state, 'step': state.step,
          'epoch_loss_sum': np.asarray(loss_sum, np.float64), 'epoch_loss_count': np.asarray(loss_count, np.int64)}


# Settings a rerun may change: they do not change what the checkpoints hold or how the next steps are computed
# (more epochs extends the run; the epoch-cosine schedule then follows the new length, as a longer run would).
RERUN_MAY_CHANGE = (
    'num_epochs', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval_batch_size', 'data_dir',
    'init.', 'input.read_threads', 'input.worker_count', 'input.prefetch', 'mesh.', 'cpu_keep_freed_memory',
    'model.remat', 'model.remat_policy', 'model.scan_unroll', 'model.attention_impl', 'model.matmul_impl',
)


def _flat_settings(tree: dict, prefix='') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_settings(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def changed_settings(saved: dict, config) -> list:
  """Keys whose value differs between a saved config (as JSON) and `config`, except `RERUN_MAY_CHANGE`. A key only
  one of them has (a setting added or retired since the run began) keeps its old behaviour by default: not compared."""
  old = _flat_settings(saved)
  new = _flat_settings(json.loads(config.to_json_best_effort()))
  return sorted(k for k in set(old) & set(new)
                if old.get(k) != new.get(k) and not any(k == a or (a.endswith('.') and k.startswith(a))
                                                          for a in RERUN_MAY_CHANGE))


def check_rerun_config(workdir, config) -> None:
  """A work directory holding checkpoints is resumed only with the config they were made with (config.json).
  Decided on process 0 (which reads the files) and raised on every process alike."""
  problem = None
  if is_main_process():
    try:
      _check_rerun_config(workdir, config)
    except UserError as e:
      problem = str(e)
  problem = multihost.broadcast_json(problem)
  if problem:
    raise UserError(problem)


def _check_rerun_config(workdir, config) -> None:
  if not checkpoint.train_steps(workdir):
    return  # nothing depends on the saved config: it is simply replaced
  saved_file = as_path(workdir) / checkpoint.CONFIG_FILE
  try:
    saved = json.loads(saved_file.read_text())
  except FileNotFoundError:
    return  # an older work directory: the restore itself checks the shapes
  except (OSError, ValueError) as e:
    raise UserError(f'{saved_file}: unreadable ({e}); restore it or start a new --workdir') from None
  changed = changed_settings(saved, config)
  if changed:
    old, new = _flat_settings(saved), _flat_settings(json.loads(config.to_json_best_effort()))
    shown = ', '.join(f'{k} ({old.get(k)!r} -> {new.get(k)!r})' for k in changed[:6])
    raise UserError(f'{workdir} holds checkpoints of another config: {shown}{" ..." if len(changed) > 6 else ""}; '
                    'rerun with the saved settings (see its config.json) or use a new --workdir')


def check_writable(directory: epath.Path) -> None:
  """Create `directory` and a probe file in it (one per process), so an unwritable place fails before training."""
  probe = directory / f'.write-probe-{jax.process_index()}'
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    raise UserError(f'{directory}: cannot write there ({e.strerror or e}); fix its permissions or choose another '
                    '--workdir') from None


def read_metrics(workdir: epath.Path, repair=False) -> list:
  """The records of metrics.jsonl; a torn last line (a write cut short) is dropped with a warning, and with
  `repair` also removed from the file, so the next record starts on a line of its own."""
  path = workdir / METRICS_FILE
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if number < len(lines):
        raise UserError(f'{path}: line {number} is not JSON; repair or remove that line') from None
      logging.warning('%s: dropped its torn last line %r (a write cut short)', path, line[:80])
      if repair and is_main_process():
        checkpoint.write_text_atomically(path, ''.join(f'{x}\n' for x in lines[:-1]))
  return records


def _checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
  # Synchronous writes: a failed write (full disk, lost permissions) raises here at once; Orbax's background save
  # would surface it only after its 300 s signal timeout. The cost is the write time at each checkpoint.
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=False)
  # The state only: the input position follows from the step (older checkpoints' `data` items are not read).
  return ocp.CheckpointManager(workdir / checkpoint.TRAIN_CHECKPOINTS_DIR, options=options, item_names=('state',))


def _write_error(error: BaseException, step: int, directory: epath.Path):
  """A CheckpointWriteError for an OSError or a TensorStore write error (the path written and the OS's reason in
  one line); None for anything else, which is a bug to show with its traceback."""
  text = str(error)
  if isinstance(error, OSError) and error.strerror:
    where, reason = error.filename or directory, error.strerror
  elif 'Failed writing' in text or 'Error writing' in text or 'os_error_code' in text:
    path = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'local file "([^"]+)"', text)
    code = re.search(r"os_error_code='(\d+)'", text)
    where = path.group(1) if path else directory
    reason = os.strerror(int(code.group(1))) if code else ' '.join(text.split())[:200]
  else:
    return None
  return CheckpointWriteError(f'could not write the checkpoint of step {step} to {where}: {reason}; free space or '
                              'fix permissions, then run the same command to resume from the last checkpoint')


class _WriteErrorEchoes(pylogging.Filter):
  """Drops the echoes of one failed write: Orbax logs it from every thread of the save, asyncio logs the gathered
  futures nobody retrieved; the save's exception reports it once."""

  def filter(self, record):
    return record.levelno < pylogging.ERROR or not (record.name == 'asyncio' or '/orbax/' in record.pathname)


def _save(manager, state, loss_sum, loss_count):
  step = int(state.step)
  if step in manager.all_steps():
    return
  echoes = _WriteErrorEchoes()
  loggers = (logging.get_absl_logger(), pylogging.getLogger('asyncio'))
  for logger in loggers:
    logger.addFilter(echoes)
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_checkpoint_tree(state, loss_sum, loss_count))))
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-exception-caught
    error = _write_error(e, step, epath.Path(manager.directory))
    if error is None:
      raise
    raise error from e  # the filter stays: the failed save's other writes end while the run stops
  for logger in loggers:
    logger.removeFilter(echoes)


def _restore(manager, step, state, mesh):
  """The state of `step`, laid out on this run's mesh (Orbax reshards whatever mesh and process count wrote it)."""
  def as_target(x):
    if isinstance(x, np.ndarray):  # host values (the running loss) restore as numpy
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh))
  target = jax.tree_util.tree_map(as_target, _checkpoint_tree(state, 0.0, 0))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  tree = restored['state']
  state = state.replace(params=tree['params'], opt_state=tree['opt_state'], step=tree['step'])
  return state, float(tree['epoch_loss_sum']), int(tree['epoch_loss_count'])


def _verify_on_this_process(step_dir: epath.Path, abstract):
  """Read a whole step's state on this process alone (no collectives), onto a local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda x: x if isinstance(x, np.ndarray) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      _checkpoint_tree(abstract, 0.0, 0))
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler(), multiprocessing_options=alone)
  checkpointer.restore(step_dir / 'state', args=ocp.args.StandardRestore(target))


def _resume(manager, workdir: epath.Path, abstract, mesh):
  """`(step, (state, loss_sum, loss_count))` from the newest checkpoint that restores, or `(None, None)`.

  One process: restore the steps newest first; once one restores, the newer ones are moved aside (when none
  does, nothing is moved: a UserError). Several: process 0 reads the steps
  on its own to find the newest intact one (a collective restore that fails on one process only would leave the
  others waiting at Orbax's barrier), broadcasts it, and every process restores that step.
  """
  none_restores = -2
  if jax.process_count() == 1:
    try:
      found = checkpoint.restore_newest_intact(workdir, lambda s: _restore(manager, s, abstract, mesh))
    except checkpoint.NoIntactCheckpointError as e:
      raise UserError(str(e)) from None
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    step, message = -1, ''
    if is_main_process():
      root = workdir / checkpoint.TRAIN_CHECKPOINTS_DIR
      try:
        chosen, _ = checkpoint.restore_newest_intact(
            workdir, lambda s: _verify_on_this_process(root / str(s), abstract))
        step = -1 if chosen is None else chosen
      except checkpoint.NoIntactCheckpointError as e:
        step, message = none_restores, str(e)
    step = int(multihost_utils.broadcast_one_to_all(np.int64(step)))
    if step == none_restores:
      raise UserError(message or f'{workdir}: no checkpoint restores (process 0 says which and why)')
    found = (None, None) if step < 0 else (step, _restore(manager, step, abstract, mesh))
  manager.reload()  # forget the steps moved aside
  return found


# ---------------------------------------------------------------------------------------------------------------
# Compiled steps with their shardings.

def compiled_steps(state, mesh):
  def predictions(logits, batch):
    return jnp.argmax(logits, -1), batch['label'], batch['mask']
  return train.jit_train_step(state, mesh), train.jit_eval_step(state, mesh, outputs=predictions)


def evaluate_split(eval_step, state, config, mesh, class_names, desc='eval') -> dict:
  """Every test clip exactly once (the pipeline pads the last batch and masks the padding)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  num_classes = config.model.num_classes
  matrix = np.zeros((num_classes, num_classes), np.int64)
  iterator = input_pipeline.create_eval_iterator(config, jax.process_index(), jax.process_count())
  total = math.ceil(input_pipeline.num_eval_examples(config) / config.eval_batch_size)
  for local in tqdm(iterator, total=total, desc=desc, disable=not is_main_process(), leave=False):
    batch = sharding.global_batch({k: local[k] for k in ('video', 'audio', 'label', 'mask') if k in local}, mesh)
    predictions, labels, mask = (np.asarray(x) for x in eval_step(state, batch))
    mask = mask.astype(bool)
    matrix += metrics_lib.confusion_matrix(labels[mask], predictions[mask], num_classes)
  return metrics_lib.summarize(matrix, class_names)


# ---------------------------------------------------------------------------------------------------------------
# Training a fold.

@dataclasses.dataclass
class _Writers:
  workdir: epath.Path
  class_names: tuple

  def __post_init__(self):
    self.tensorboard = None
    if is_main_process():
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tensorboard = SummaryWriter(str(self.workdir / 'tensorboard'))

  def scalars(self, step, values: dict):
    if self.tensorboard:
      for k, v in values.items():
        self.tensorboard.add_scalar(k, v, step)

  def epoch(self, record: dict):
    if not is_main_process():
      return
    metrics_lib.append_jsonl(self.workdir / METRICS_FILE, record)
    self.scalars(record['step'], {'test/war': record['war'], 'test/uar': record['uar'],
                                  'train/epoch_loss': record['train_loss']})
    self.tensorboard.flush()
    metrics_lib.plot_learning_curves(read_metrics(self.workdir),
                                     self.workdir / 'learning_curves.png')
    metrics_lib.plot_confusion_matrix(record['confusion_matrix'], self.class_names,
                                      self.workdir / 'confusion_matrix.png',
                                      f'epoch {record["epoch"] + 1}: WAR {record["war"]:.1f}, UAR {record["uar"]:.1f}')

  def close(self):
    if self.tensorboard:
      self.tensorboard.close()


def _evaluated_epochs(workdir: epath.Path) -> set:
  """The epochs metrics.jsonl has figures for, as process 0 reads them (every process gets the same set)."""
  epochs = sorted({r['epoch'] for r in read_metrics(workdir, repair=True) if r.get('kind') == 'epoch'}
                  ) if is_main_process() else None
  return set(multihost.broadcast_json(epochs))


def _last_epoch_record(workdir: epath.Path):
  """The last epoch's record of metrics.jsonl as process 0 reads it, on every process (None when there is none)."""
  record = None
  if is_main_process():
    records = [r for r in read_metrics(workdir) if r.get('kind') == 'epoch']
    record = records[-1] if records else None
  return multihost.broadcast_json(record)


def train_and_evaluate(config, workdir) -> dict:
  """Train config.fold for config.num_epochs, evaluating after every epoch; resumes from `workdir`."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  workdir = as_path(workdir)
  check_writable(workdir / checkpoint.TRAIN_CHECKPOINTS_DIR)
  if not multihost.check_shared_workdir(workdir):
    raise UserError(f'--workdir {workdir}: the {jax.process_count()} processes do not see the same files there; '
                    'give every process one shared place (a gs:// bucket or a shared disk)')
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  total_steps = steps_per_epoch * config.num_epochs
  class_names = labels_lib.class_names(config.dataset, config.model.num_classes)
  check_rerun_config(workdir, config)
  if is_main_process():
    checkpoint.save_config(workdir, config)  # only once the config is known to fit the checkpoints

  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  manager = _checkpoint_manager(workdir, config)
  latest, restored = None, None
  if multihost.broadcast_json(bool(checkpoint.train_steps(workdir)) if is_main_process() else None):
    latest, restored = _resume(manager, workdir, _abstract_state(config, steps_per_epoch), mesh)
  if latest is None:
    params = initial_params(config, init_rng)
    state = train.create_train_state(config, params, steps_per_epoch)
    loss_sum, loss_count = 0.0, 0
  else:
    state, loss_sum, loss_count = restored
    say(f'Resumed from {workdir} at step {latest} (epoch {latest // steps_per_epoch + 1})')
  state = jax.device_put(state, sharding.state_sharding(state, mesh))
  train_step, eval_step = compiled_steps(state, mesh)
  cpu_hook = cpu.step_hook()  # the CPU speed work's step hook (prepared in launch.py)
  writers = _Writers(workdir, class_names)
  preemption = multihost.PreemptionWatch()
  say(f'{config.dataset} fold {config.fold}: {steps_per_epoch} steps/epoch x {config.num_epochs} epochs, '
      f'global batch {config.batch_size} on {mesh.size} device(s) in {jax.process_count()} process(es); '
      f'{train.count_parameters(train.partition(state.params)[0]) / 1e6:.2f}M trainable parameters')

  schedule = train.learning_rate_schedule(config, steps_per_epoch)
  step = int(state.step)
  train_iter = input_pipeline.create_train_iterator(config, jax.process_index(), jax.process_count(), step=step)
  done = _evaluated_epochs(workdir)
  last = None  # the last epoch's figures, once evaluated in this run
  bar = None
  try:
    while True:
      epoch = step // steps_per_epoch
      # An epoch whose steps are done but whose evaluation was interrupted is evaluated first.
      if step == (epoch * steps_per_epoch) and epoch > 0 and (epoch - 1) not in done:
        last = _finish_epoch(epoch - 1, step, state, eval_step, config, mesh, class_names, writers, loss_sum,
                             loss_count)
        done.add(epoch - 1)
        loss_sum, loss_count = 0.0, 0
      if step >= total_steps:
        break
      end = (epoch + 1) * steps_per_epoch
      bar = tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch, desc=f'epoch {epoch + 1}',
                 disable=not is_main_process(), unit='step', dynamic_ncols=True)
      started, clips = time.perf_counter(), 0
      pending = []  # device scalars, fetched in groups so the host does not wait on every step
      while step < end:
        batch = sharding.global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, step))
        cpu_hook.after_step(metrics)
        pending.append((step, metrics['loss'], metrics['grad_norm']))
        step += 1
        clips += config.batch_size
        bar.update(1)
        at_checkpoint = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        stop_now = preemption.stop_now(step)  # the same answer on every process at this step
        if len(pending) >= config.log_every_steps or step == end or stop_now or at_checkpoint:
          # Fetch the losses (the running epoch loss is part of every checkpoint); every save comes after a fetch,
          # so a non-finite step stops the run before its state can be saved.
          fetched = [(at, float(loss), float(norm)) for at, loss, norm in pending]
          _stop_if_not_finite(fetched, config)
          losses = [loss for _, loss, _ in fetched]
          loss_sum, loss_count = loss_sum + sum(losses), loss_count + len(losses)
          pending = []
          rate = clips / (time.perf_counter() - started)
          bar.set_postfix(loss=f'{losses[-1]:.4f}', clips_per_s=f'{rate:.1f}')
          writers.scalars(step, {'train/loss': losses[-1], 'train/clips_per_s': rate,
                                 'train/learning_rate': float(schedule(step - 1))})
        if stop_now:
          _save(manager, state, loss_sum, loss_count)
          manager.wait_until_finished()
          bar.close()
          say(f'SIGTERM: saved a checkpoint at step {step}; run the same command to resume.')
          raise SystemExit(0)
        if at_checkpoint and step < end:
          _save(manager, state, loss_sum, loss_count)
      bar.close()
      _save(manager, state, loss_sum, loss_count)
  finally:
    if bar is not None:
      bar.close()  # before an error's message, so that message is the last line
    preemption.close()
    manager.wait_until_finished()
    writers.close()

  if last is None:  # every epoch was evaluated before this run: the figures process 0 logged
    last = _last_epoch_record(workdir)
  if last is None:  # the log is gone: evaluate again (every process agrees, the value above was broadcast)
    last = evaluate_split(eval_step, state, config, mesh, class_names)
    last['train_loss'] = None
  summary = {
      'dataset': config.dataset, 'fold': config.fold, 'war': last['war'], 'uar': last['uar'],
      'epochs': config.num_epochs, 'steps': int(state.step), 'train_loss': last['train_loss'],
      'trainable_l2': float(train.trainable_l2(state.params)), 'per_class_recall': last['per_class_recall'],
      'confusion_matrix': last['confusion_matrix'], 'num_test_clips': last['num_clips'],
  }
  if is_main_process():
    checkpoint.write_text_atomically(workdir / SUMMARY_FILE, json.dumps(summary, indent=2))
  say(f'Done: WAR {summary["war"]:.2f}  UAR {summary["uar"]:.2f} after {summary["steps"]} steps '
      f'-> {workdir / SUMMARY_FILE}')
  return summary


def batch_clip_ids(config, step: int) -> list:
  """The ids of the clips in global training batch `step` (input_pipeline.train_dataset's order: positions
  step * batch_size ... of the stream, epoch e's clips in the permutation epoch_order(seed, e))."""
  source = input_pipeline.get_source(config, 'train')
  per_epoch = input_pipeline.steps_per_epoch(config) * config.batch_size
  ids = []
  for position in range(step * config.batch_size, (step + 1) * config.batch_size):
    clip_epoch, offset = divmod(position, per_epoch)
    clip = int(input_pipeline.epoch_order(config.seed, clip_epoch, len(source))[offset])
    record = source[clip]
    ids.append(str(record.get('id', clip) if hasattr(record, 'get') else clip))
  return ids


def _stop_if_not_finite(fetched, config) -> None:
  """Stop at the first step whose loss or gradient norm is NaN/inf (the norm is finite only if every gradient is)."""
  for step, loss, norm in fetched:
    if not (math.isfinite(loss) and math.isfinite(norm)):
      ids = batch_clip_ids(config, step)
      raise NonFiniteError(
          f'step {step + 1}: non-finite loss ({loss}) or gradient norm ({norm}); its batch holds the clips '
          f'{", ".join(ids)}; nothing from this step on was saved: check those clips\' audio and frames, then run the '
          'same command to resume from the last checkpoint')


def _finish_epoch(epoch, step, state, eval_step, config, mesh, class_names, writers, loss_sum, loss_count):
  result = evaluate_split(eval_step, state, config, mesh, class_names, desc=f'eval epoch {epoch + 1}')
  record = {'kind': 'epoch', 'epoch': epoch, 'step': step, 'train_loss': loss_sum / max(1, loss_count), **result}
  writers.epoch(record)
  say(f'epoch {epoch + 1}: train loss {record["train_loss"]:.4f}  WAR {result["war"]:.2f}  UAR {result["uar"]:.2f}')
  return record


def _abstract_state(config, steps_per_epoch):
  """The train state's structure, shapes and dtypes, without computing anything (the target of a restore)."""
  c = config.model

  def make_state():
    return train.create_train_state(config, models.init_params(c, jax.random.key(0)), steps_per_epoch)
  return jax.eval_shape(make_state)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of a checkpoint, and the 5-fold protocol.

def evaluate_checkpoint(config, workdir) -> dict:
  """--mode eval: the checkpoint in init.checkpoint (or the latest in workdir) on the fold's test split."""
  workdir = as_path(workdir)
  source = config.init.checkpoint or str(workdir)
  try:
    params = checkpoint.load_params(source)
  except checkpoint.CheckpointNotFoundError as e:
    raise UserError(f'{e}; pass --config.init.checkpoint=DIR') from None
  _check_param_shapes(params, config.model, source)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  state = train.create_train_state(config, params)
  state = jax.device_put(state, sharding.state_sharding(state, mesh))
  _, eval_step = compiled_steps(state, mesh)
  class_names = labels_lib.class_names(config.dataset, config.model.num_classes)
  result = evaluate_split(eval_step, state, config, mesh, class_names)
  result.update(dataset=config.dataset, fold=config.fold, checkpoint=source)
  if is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text_atomically(workdir / f'eval_fold{config.fold}.json', json.dumps(result, indent=2))
    metrics_lib.plot_confusion_matrix(result['confusion_matrix'], class_names,
                                      workdir / f'eval_fold{config.fold}_confusion.png')
  say(f'{config.dataset} fold {config.fold}: WAR {result["war"]:.2f}  UAR {result["uar"]:.2f} '
      f'over {result["num_clips"]} clips')
  return result


def cross_validate(config, workdir, folds=None) -> dict:
  """Train and evaluate every fold in workdir/fold<k>/ (a finished fold is skipped), then the paper's table.
  `folds`: all of the dataset's protocol by default."""
  folds = folds or list(range(1, input_pipeline.num_folds(config.dataset) + 1))
  workdir = as_path(workdir)
  summaries = {}
  for fold in folds:
    fold_config = ml_collections.ConfigDict(config.to_dict())
    fold_config.fold = fold
    fold_dir = workdir / f'fold{fold}'
    summary_file = fold_dir / SUMMARY_FILE
    finished = None  # process 0 reads the fold's summary; every process takes the same path
    if is_main_process() and summary_file.exists():
      finished = json.loads(summary_file.read_text())
    finished = multihost.broadcast_json(finished)
    if finished is not None:
      say(f'fold {fold}: already done ({summary_file})')
      summaries[fold] = finished
      continue
    say(f'=== fold {fold} ===')
    summaries[fold] = train_and_evaluate(fold_config, fold_dir)
  markdown, table = metrics_lib.cross_validation_table(summaries)
  if is_main_process():
    checkpoint.write_text_atomically(workdir / 'cross_validation.md',
                                     f'# {config.dataset}: {len(folds)}-fold cross-validation\n\n' + markdown)
    checkpoint.write_text_atomically(workdir / 'cross_validation.json', json.dumps(table, indent=2))
  say(markdown)
  return table
