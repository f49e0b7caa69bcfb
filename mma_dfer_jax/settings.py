"""The experiment settings in one place: their defaults, the choices and ranges of every key, and one `validate`.

- `base_config()` / `model_config(num_classes)`: the paper's training recipe and the ViT-B model; every key a run
  reads is here, so a module never needs a `.get` default of its own. `paper_config(dataset, num_classes)` is the
  recipe for one of the paper's datasets (configs/dfew.py, mafw.py, ...).
- `DATASETS` (name -> folds of its protocol) and `CHOICES` (key -> allowed values): the one table of choices.
- `validate(config, device_count=None, process_count=1)`: every range checked once, the key named in a one-line
  `ConfigError` (a cli.UserError: exit code 2 on the command line; and a ValueError).
- `upgrade(config)`: a config saved by an older version (config.json beside a checkpoint) with the keys it lacks
  filled from the defaults; `load_saved(directory)` reads one that way.

This module imports neither JAX nor anything that does: the training command configures the host allocator from
the config before JAX starts.
"""
import json
from typing import Optional

import ml_collections

from mma_dfer_jax import cli

SAVED_CONFIG_FILE = 'config.json'  # beside every checkpoint (checkpoint.CONFIG_FILE)

# Folds of each dataset's protocol, numbered 1..folds: RAVDESS 6 folds of 4 actors; FERV39k its one official
# train/test split, built as fold 1; 'synthetic' the demo's clips generated from the seed.
DATASETS = {'dfew': 5, 'mafw': 5, 'cremad': 5, 'ravdess': 6, 'ferv39k': 1, 'synthetic': 5}
PROMPT_STAGE_EVERY = 6  # the model adds progressive prompts every 6 encoder blocks

# model.modalities -> the inputs the model reads (the batch keys the pipeline prepares, what predict computes).
MODEL_INPUTS = {'audio_video': ('video', 'audio'), 'video': ('video',), 'audio': ('audio',)}

CHOICES = {
    'dataset': tuple(DATASETS),
    'schedule': ('epoch_cosine', 'warmup_cosine', 'constant'),
    'model.modalities': tuple(MODEL_INPUTS),  # the paper's model, face-only, audio-only
    'model.dtype': ('float32', 'bfloat16'),
    'model.attention_impl': ('', 'cpu_fused', 'einsum', 'xla', 'cudnn'),  # '': chosen for the platform
    'model.matmul_impl': ('', 'xla', 'openblas'),
}
# Integer keys and their least value.
COUNTS = {
    'num_epochs': 1, 'batch_size': 1, 'eval_batch_size': 1, 'grad_accum_steps': 1, 'warmup_steps': 0,
    'checkpoint_every_steps': 0, 'keep_checkpoints': 1, 'log_every_steps': 1,
    'model.num_classes': 1, 'model.img_size': 1, 'model.patch_size': 1, 'model.num_frames': 1,
    'model.audio_frames': 1, 'model.audio_mels': 1, 'model.width': 1, 'model.num_heads': 1, 'model.mlp_dim': 1,
    'model.prompts_per_stage': 1, 'model.fusion_width': 1, 'model.temporal_width': 1, 'model.temporal_layers': 1,
    'model.temporal_heads': 1, 'model.temporal_head_dim': 1, 'model.temporal_mlp_dim': 1, 'model.scan_unroll': 1,
    'input.read_threads': 1, 'input.worker_count': 0, 'input.prefetch': 0, 'input.synthetic_train_size': 1,
    'input.synthetic_test_size': 1, 'input.synthetic_frame_size': 1,
}
# Real-valued keys: (low, high, interval) with interval '[)', '()', '[]' or '(]' saying which ends are allowed.
RANGES = {
    'learning_rate': (0.0, None, '()'), 'weight_decay': (0.0, None, '[)'), 'label_smoothing': (0.0, 1.0, '[)'),
    'adam_b1': (0.0, 1.0, '[)'), 'adam_b2': (0.0, 1.0, '[)'), 'adam_eps': (0.0, None, '()'),
    'model.drop_path_rate': (0.0, 1.0, '[)'), 'input.synthetic_colour_jitter': (0.0, 1.0, '[]'),
    'input.synthetic_silent_fraction': (0.0, 1.0, '[]'),
}


# ---------------------------------------------------------------------------------------------------------------
# Defaults.

def model_config(num_classes: int) -> ml_collections.ConfigDict:
  """MMA-DFER at the paper's size: two ViT-B/16 encoders, one temporal layer."""
  m = ml_collections.ConfigDict()
  m.num_classes = num_classes
  # 'audio_video': the paper's model; 'video' (face ViT only) or 'audio' (AudioMAE only): a unimodal model without the
  # other encoder and without the fusion adapters (README.md, "Unimodal models"). Released checkpoints are audio_video.
  m.modalities = 'audio_video'
  m.img_size = 224               # face crops are img_size x img_size
  m.patch_size = 16
  m.num_frames = 16              # frames sampled per clip (one per segment)
  m.audio_frames = 512           # fbank rows (10 ms hops) after pad/cut
  m.audio_mels = 128             # fbank mel bins
  m.width = 768                  # ViT width D (both encoders)
  m.depth = 12                   # ViT blocks; a multiple of 6 (one prompt stage per 6 blocks)
  m.num_heads = 12
  m.mlp_dim = 3072
  m.prompts_per_stage = 3        # progressive prompts added every 6 blocks
  m.fusion_width = 128           # the adapters' bottleneck
  m.temporal_width = 512
  m.temporal_layers = 1
  m.temporal_heads = 8
  m.temporal_head_dim = 64
  m.temporal_mlp_dim = 1024
  m.drop_path_rate = 0.1         # stochastic depth in the frozen encoders (train only)
  m.dtype = 'float32'            # encoder compute dtype: 'float32' (CPU) or 'bfloat16' (GPU/TPU)
  # Rematerialisation of the lockstep layers: keep the outputs of the weight matmuls, recompute the rest (norms,
  # softmax, GELU, the attention score matmul) in the backward pass. Half the memory of keeping everything and, on
  # CPU, faster (less memory to fault in); BENCHMARKS.md. remat=False keeps every activation.
  m.remat = True
  m.remat_policy = 'dots_with_no_batch_dims_saveable'  # a name in jax.checkpoint_policies, or
                                 # 'dots_and_attention_probs' (also keeps the softmax: more memory, no recompute)
  m.scan_unroll = 1              # unroll factor of the scan over the lockstep layers
  m.attention_impl = ''          # '' = on CPU the fused kernel of cpu/ (float32) or einsum, elsewhere
                                 # jax.nn.dot_product_attention's choice; 'cpu_fused', 'einsum', 'xla' or 'cudnn'
  m.matmul_impl = ''             # the encoder blocks' and adapters' Dense matmuls: '' = OpenBLAS (cpu/) on
                                 # one CPU device in float32, XLA elsewhere; 'xla' or 'openblas' to force one
  return m


def base_config() -> ml_collections.ConfigDict:
  """The paper's recipe on DFEW fold 1, without SSL weights: what every experiment file starts from."""
  c = ml_collections.ConfigDict()
  c.dataset = 'dfew'             # a name in DATASETS
  c.fold = 1                     # 1..DATASETS[dataset]
  c.data_dir = 'datasets'        # where the TFDS builders wrote the ArrayRecord folds
  c.num_epochs = 25
  c.batch_size = 8               # global batch, over every device and process
  c.eval_batch_size = 8
  c.grad_accum_steps = 1         # micro-batches per optimizer step (same result as one large batch)
  c.learning_rate = 1e-4
  c.weight_decay = 1e-2
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.schedule = 'epoch_cosine'    # reference: CosineAnnealingLR(T_max=epochs) stepped per epoch
  c.warmup_steps = 0             # only for schedule='warmup_cosine' (per-step)
  c.label_smoothing = 0.0
  c.seed = 1

  c.model = model_config(num_classes=7)

  c.init = ml_collections.ConfigDict()
  c.init.face_checkpoint = ''    # MAE-Face mae_face_pretrain_vit_base.pth
  c.init.audio_checkpoint = ''   # AudioMAE pretrained.pth
  c.init.checkpoint = ''         # a converted or trained Flax checkpoint to start from

  c.input = ml_collections.ConfigDict()
  c.input.read_threads = 2       # Grain read threads per process
  c.input.worker_count = 0       # Grain worker processes (0: threads only)
  c.input.prefetch = 2           # batches prefetched ahead of the device
  c.input.augment = True
  c.input.synthetic_train_size = 256  # clips of the synthetic dataset (dataset='synthetic')
  c.input.synthetic_test_size = 64
  c.input.synthetic_frame_size = 48   # frames of synthetic clips are this many pixels square
  c.input.synthetic_colour_jitter = 0.0   # harder synthetic set: face hue spread toward the next class's (0..1)
  c.input.synthetic_silent_fraction = 0.0  # harder synthetic set: this fraction of clips without audio

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # devices on the 'data' axis (-1: all)

  # XLA:CPU only: glibc keeps freed memory for reuse, so each step's temporary buffer is not page-faulted in anew
  # (5-12% faster steps at batch 1), where the machine has room for it after the first step (two step buffers and a
  # third's margin), with a guard that hands memory back if the heap grows; mma_dfer_jax/cpu/, BENCHMARKS.md.
  c.cpu_keep_freed_memory = True

  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.log_every_steps = 10
  return c


def paper_config(dataset: str, num_classes: int) -> ml_collections.ConfigDict:
  """The paper's recipe on `dataset` (fold 1) from the SSL weights in weights/ (README: setup)."""
  c = base_config()
  c.dataset = dataset
  c.model = model_config(num_classes)
  c.init.face_checkpoint = 'weights/mae_face_pretrain_vit_base.pth'
  c.init.audio_checkpoint = 'weights/audiomae_pretrained.pth'
  return c


def num_folds(dataset: str) -> int:
  """Folds of the dataset's protocol, numbered 1..num_folds."""
  return DATASETS.get(dataset, 5)


# ---------------------------------------------------------------------------------------------------------------
# Checks.

_MISSING = object()


def _get(config, key: str):
  """config's value at the dotted `key`, or _MISSING (a config saved before the key existed)."""
  value = config
  for part in key.split('.'):
    if not hasattr(value, 'get'):
      return _MISSING
    value = value.get(part, _MISSING)
    if value is _MISSING:
      return _MISSING
  return value


class ConfigError(cli.UserError, ValueError):
  """A setting out of its range or choices: a user error (one line, exit 2) and, for library callers, a ValueError.
  The message starts with `config.<key>`."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_count(config, key: str, minimum: int) -> None:
  value = _get(config, key)
  if value is not _MISSING:
    _require(_is_int(value) and value >= minimum, f'config.{key}={value!r}: must be an integer >= {minimum}')


def _check_range(config, key: str, low: float, high: Optional[float], interval: str) -> None:
  value = _get(config, key)
  if value is _MISSING:
    return
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  above = number and (value >= low if interval[0] == '[' else value > low)
  below = number and (high is None or (value <= high if interval[1] == ']' else value < high))
  _require(above and below, f'config.{key}={value!r}: must be a number in {interval[0]}{low}, '
           f'{"inf" if high is None else high}{interval[1]}')


def _check_choice(config, key: str, choices: tuple) -> None:
  value = _get(config, key)
  if value is not _MISSING:
    shown = ', '.join(repr(c) if c == '' else c for c in choices)
    unknown = 'unknown dataset; ' if key == 'dataset' else ''
    _require(value in choices, f'config.{key}={value!r}: {unknown}use one of {shown}')


def _check_tables(config, wanted) -> None:
  """The CHOICES, COUNTS and RANGES entries whose key `wanted(key)` accepts."""
  for key, choices in CHOICES.items():
    if wanted(key):
      _check_choice(config, key, choices)
  for key, minimum in COUNTS.items():
    if wanted(key):
      _check_count(config, key, minimum)
  for key, bounds in RANGES.items():
    if wanted(key):
      _check_range(config, key, *bounds)


def model_inputs(model_config) -> tuple:
  """The inputs ('video', 'audio') a model of `model_config` reads; a config without model.modalities reads both."""
  kind = getattr(model_config, 'modalities', 'audio_video')
  _require(kind in MODEL_INPUTS, f'config.model.modalities={kind!r}: use one of {", ".join(MODEL_INPUTS)}')
  return MODEL_INPUTS[kind]


def validate_model(model_config) -> None:
  """config.model's choices and ranges (convert and export need no more than the model)."""
  _check_tables({'model': model_config}, lambda key: key.startswith('model.'))
  m = model_config
  _require(_is_int(m.depth) and m.depth >= PROMPT_STAGE_EVERY and m.depth % PROMPT_STAGE_EVERY == 0,
           f'config.model.depth={m.depth!r}: must be a positive multiple of {PROMPT_STAGE_EVERY} (prompt stages every '
           f'{PROMPT_STAGE_EVERY} blocks)')
  _require(m.width % m.num_heads == 0,
           f'config.model.width={m.width} is not divisible by config.model.num_heads={m.num_heads}')
  _require(m.img_size % m.patch_size == 0,
           f'config.model.img_size={m.img_size} is not divisible by config.model.patch_size={m.patch_size}')


def validate(config, device_count: Optional[int] = None, process_count: int = 1) -> None:
  """Every setting a run reads, each checked once with the key named (ConfigError).

  With `device_count`, also that the mesh fits the devices and every global batch splits evenly over the devices
  and processes.
  """
  check_fold(config)
  _check_tables(config, lambda key: not key.startswith('model.') and key != 'dataset')
  wanted = _get(config, 'mesh.data')
  if wanted is not _MISSING:
    _require(_is_int(wanted) and (wanted == -1 or wanted >= 1),
             f'config.mesh.data={wanted!r}: use -1 (all devices) or a device count')
  accumulate = config.get('grad_accum_steps', 1)
  _require(config.batch_size % accumulate == 0, f'config.batch_size={config.batch_size} does not split into '
           f'config.grad_accum_steps={accumulate} equal micro-batches; use a multiple of {accumulate}')
  validate_model(config.model)
  if device_count is not None:
    check_devices(config, device_count, process_count)


def check_fold(config) -> None:
  """config.dataset is known and config.fold is one of its protocol's folds."""
  _check_choice(config, 'dataset', CHOICES['dataset'])
  folds = num_folds(config.dataset)
  _require(_is_int(config.fold) and 1 <= config.fold <= folds,
           f'config.fold={config.fold!r}: {config.dataset} folds are numbered 1..{folds}')


def check_divisible(key: str, value: int, device_count: int, process_count: int) -> None:
  """A global batch (config.<key>) splits evenly over the devices and the processes."""
  for count, what in ((device_count, 'devices'), (process_count, 'processes')):
    _require(value % count == 0,
             f'config.{key}={value} is not divisible by the {count} {what}; use a multiple of {count}')


def check_mesh(config, device_count: int) -> None:
  """config.mesh.data is -1 (all devices) or the number of devices visible."""
  wanted = _get(config, 'mesh.data')
  if wanted is not _MISSING:
    _require(wanted in (-1, device_count),
             f'config.mesh.data={wanted}, but {device_count} devices are visible; use -1 for all of them')


def check_devices(config, device_count: int, process_count: int = 1) -> None:
  """The mesh fits the visible devices and the global batches split over them."""
  check_mesh(config, device_count)
  for key in ('batch_size', 'eval_batch_size'):
    value = _get(config, key)
    if value is not _MISSING:
      check_divisible(key, value, device_count, process_count)


# ---------------------------------------------------------------------------------------------------------------
# Saved configs.

def _fill(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  for key, default in defaults.items():
    if key not in config:
      config[key] = ml_collections.ConfigDict(default.to_dict()) if isinstance(default, ml_collections.ConfigDict) \
          else default
    elif isinstance(default, ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict):
      _fill(config[key], default)


def upgrade(config) -> ml_collections.ConfigDict:
  """`config` (a saved one, perhaps older than some keys) with every key it lacks filled from the defaults, which
  keep the behaviour the code had before those keys existed (e.g. model.modalities='audio_video',
  model.matmul_impl=''). The keys it has are kept as they are. Returns a new, unlocked ConfigDict."""
  upgraded = ml_collections.ConfigDict(config.to_dict() if hasattr(config, 'to_dict') else dict(config))
  _fill(upgraded, base_config())
  return upgraded


def load_saved(directory) -> Optional[ml_collections.ConfigDict]:
  """The config saved beside a checkpoint (DIR/config.json, a local path or a URL such as gs://), upgraded; None
  when there is none."""
  from etils import epath  # pylint: disable=import-outside-toplevel  (no JAX; only where a saved config is read)
  file = epath.Path(directory) / SAVED_CONFIG_FILE
  if not file.is_file():
    return None
  try:
    saved = json.loads(file.read_text())
  except ValueError as e:
    raise cli.UserError(f'{file}: not a readable config ({e}); restore it or give --config FILE') from None
  return upgrade(ml_collections.ConfigDict(saved))
