"""The Grain input pipeline: clips -> 16 decoded, augmented uint8 frames + fbank, in global batches.

Order and randomness are functions of the seed alone: the clip order of epoch e is a permutation drawn from
(seed, e), and each clip's frame choice and augmentation from (seed, e, clip index). Global batch g holds positions
[g*B, (g+1)*B) of that order; process p of P reads only its contiguous slice of every global batch. So the global
batches are the same for any number of processes, devices, threads or workers, and the iterator's state is just a
position (checkpointable, resumes exactly). Only the sampled frames of a clip are decoded, and only the inputs
the model reads (config.model.modalities): a video-only model's batches have no `audio`, an audio-only model's no
`video`, and no frame of theirs is decoded.

Frames of one clip may differ in size (MAFW face crops are cut per frame): as the reference does, training draws
the crop from the first sampled frame's size and cuts every frame at that box (zero fill outside a smaller frame,
like PIL's `crop`), and test time resizes each frame on its own.
"""
import functools
import os

from absl import flags
from etils import epath
import grain
import numpy as np

from mma_dfer_jax import audio as audio_lib
from mma_dfer_jax import frames as frames_lib
from mma_dfer_jax import settings
from mma_dfer_jax import synthetic
from mma_dfer_jax.frames import frame_indices  # noqa: F401  (contract: input_pipeline.frame_indices)

DATASETS = tuple(settings.DATASETS)  # the names; their folds: settings.DATASETS
# Builds older than these hold data the reference would not see: MAFW 1.0.0 labelled the classes in MAFW's own
# order (wrong for the released models) and sampled over every frame file (the reference: one less).
OLDEST_BUILD = {'mafw': (2, 0, 0)}
SPLITS = ('train', 'test')
FRAMES_KEYS = ('frames', 'images')
MODEL_INPUTS = settings.MODEL_INPUTS  # model.modalities -> the batch keys the model reads


class DatasetError(ValueError):
  """The dataset is not there or not what the config says; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Sources.

num_folds = settings.num_folds  # folds of the dataset's protocol, numbered 1..num_folds


def model_inputs(config) -> tuple:
  """The inputs config.model.modalities reads, of 'video' and 'audio': the only ones the pipeline prepares."""
  try:
    return settings.model_inputs(config.model)
  except settings.ConfigError as e:
    raise DatasetError(str(e)) from None


def _split_name(config, train: bool) -> str:
  settings.check_fold(config)
  return f'fold{config.fold}_{"train" if train else "test"}'


def _data_dir(data_dir) -> epath.Path:
  """config.data_dir as an epath.Path: a local folder (made absolute) or a URL such as gs://bucket/tfds."""
  return epath.Path(data_dir) if '://' in str(data_dir) else epath.Path(os.path.abspath(os.fspath(data_dir)))


def _built_dataset_dir(data_dir: epath.Path, name: str, split: str = ''):
  """The newest TFDS version directory of `name` under data_dir (one holding dataset_info.json), preferring one
  that has `split` (the builders write one config per fold: <name>/fold<k>/<version>/). Folders of an
  unfinished build (TFDS's `incomplete.*`) are skipped. TFDS's layouts are <name>/<version>/ and
  <name>/<config>/<version>/; no recursive `**` glob, which epath refuses on gs://."""
  root = data_dir / name
  patterns = ('*/dataset_info.json', '*/*/dataset_info.json')
  candidates = [c for pattern in patterns for c in root.glob(pattern)] if root.is_dir() else []
  candidates = sorted((c.parent for c in candidates
                       if not any(part.startswith('incomplete.') for part in c.relative_to(root).parts)),
                      key=_version_key)
  with_split = [c for c in candidates if split and f'"{split}"' in (c / 'dataset_info.json').read_text()]
  return (with_split or candidates or [None])[-1]


def _version_key(version_dir: epath.Path):
  """Sorts TFDS version folders numerically (1.10.0 after 1.9.0), then by path."""
  parts = version_dir.name.split('.')
  numeric = tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
  return numeric, str(version_dir)


def get_source(config, split: str):
  """A random-access source of records for `split` ('train' or 'test') of config.dataset / config.fold."""
  if split not in SPLITS:
    raise DatasetError(f'split={split!r}: use one of {", ".join(SPLITS)} (the fold comes from config.fold)')
  train = split == 'train'
  name = _split_name(config, train)
  if config.dataset == 'synthetic':
    size = config.input.get('synthetic_train_size', 256) if train else config.input.get('synthetic_test_size', 64)
    options = config.input
    return synthetic.SyntheticSource(config.seed + 1000 * config.fold, 'train' if train else 'test', size,
                                     config.model.num_classes, config.model.audio_frames,
                                     options.get('synthetic_frame_size', synthetic.FRAME_SIZE),
                                     options.get('synthetic_colour_jitter', 0.0),
                                     options.get('synthetic_silent_fraction', 0.0))
  data_dir = _data_dir(config.data_dir)
  build_command = (f'python -m data.{config.dataset}.build --manual_dir /path/to/{config.dataset.upper()} '
                   f'--data_dir {config.data_dir} --folds {config.fold}')
  built = _built_dataset_dir(data_dir, config.dataset, name)
  if built is None:
    raise DatasetError(f'data_dir={config.data_dir}: no built {config.dataset} dataset there. Build it first: '
                       f'{build_command}')
  oldest = OLDEST_BUILD.get(config.dataset)
  if oldest and _version_key(built)[0] < oldest:
    raise DatasetError(f'{built} was built by an older version of this project (wrong class order); rebuild it '
                       f'into a new data_dir: {build_command}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(str(built))
  if name not in builder.info.splits:
    raise DatasetError(f'data_dir={config.data_dir}: fold {config.fold} of {config.dataset} is not built (found '
                       f'{", ".join(sorted(builder.info.splits))} in {built}). Build it: {build_command}')
  return builder.as_data_source(name)


# ---------------------------------------------------------------------------------------------------------------
# One clip.

def _record_frames(record):
  for key in FRAMES_KEYS:
    if key in record:
      return list(record[key])
  raise DatasetError(f'record {record.get("id")!r} has no frames (expected one of {FRAMES_KEYS})')


def sampling_count(record, num_files: int) -> int:
  """The frame count a clip's frames are sampled over: the record's `num_frames` (the reference's count: MAFW's is
  one less than its files), within 1..num_files; the number of files where a record has none."""
  listed = record.get('num_frames') if hasattr(record, 'get') else None
  return num_files if listed is None else min(max(int(listed), 1), num_files)


def _fbank(record, audio_frames):
  fbank = np.asarray(record['fbank'], np.float32)
  return audio_lib.pad_or_cut(fbank, audio_frames) if fbank.shape[0] != audio_frames else fbank


def decode_picked(encoded, picked) -> list:
  """The frames at indices `picked` as (H, W, 3) uint8 arrays, each distinct frame decoded once (short clips
  repeat their last index)."""
  decoded = {}
  for i in picked:
    if i not in decoded:
      decoded[i] = frames_lib.decode_frame(encoded[i])
  return [decoded[i] for i in picked]


def _fit_to(frame: np.ndarray, height: int, width: int) -> np.ndarray:
  """frame cut or zero-filled at the bottom and right to height x width, so that a box inside height x width cuts
  the same pixels as PIL's `crop` of the original frame (black outside the image)."""
  if frame.shape[:2] == (height, width):
    return frame
  fitted = np.zeros((height, width, 3), np.uint8)
  h, w = min(height, frame.shape[0]), min(width, frame.shape[1])
  fitted[:h, :w] = frame[:h, :w]
  return fitted


def stack_for_crop(frames: list) -> np.ndarray:
  """(T, H, W, 3) with the first frame's H x W: the reference draws the clip's crop box from the first frame's
  size and cuts every frame at it. (Its rare fallback, shorter side resized then a random crop, resizes each frame
  on its own; here the fitted frames are resized alike.)"""
  height, width = frames[0].shape[:2]
  return np.stack([_fit_to(frame, height, width) for frame in frames])


def resize_each(frames: list, img_size: int) -> np.ndarray:
  """Test-time resize to img_size x img_size; frames of different sizes are each resized on their own."""
  if len({frame.shape for frame in frames}) == 1:
    return frames_lib.resize_frames(np.stack(frames), img_size)
  return np.concatenate([frames_lib.resize_frames(frame[None], img_size) for frame in frames])


def _train_video(record, rng: np.random.Generator, config) -> np.ndarray:
  """The reference's training frames: a random frame per segment, one augmentation for the whole clip."""
  c = config.model
  encoded = _record_frames(record)
  picked = frames_lib.frame_indices(sampling_count(record, len(encoded)), True, rng, c.num_frames)
  frames = decode_picked(encoded, picked)
  if not config.input.augment:
    return resize_each(frames, c.img_size)
  video = stack_for_crop(frames)
  params = frames_lib.sample_augmentation(rng, video.shape[1], video.shape[2])
  return frames_lib.apply_augmentation(video, params, c.img_size)


def _test_video(record, config) -> np.ndarray:
  """Segment centres, resized to img x img."""
  c = config.model
  encoded = _record_frames(record)
  picked = frames_lib.frame_indices(sampling_count(record, len(encoded)), False, None, c.num_frames)
  return resize_each(decode_picked(encoded, picked), c.img_size)


def _example(record, config, video_fn) -> dict:
  """label, and `video` (video_fn()) and `audio` where the model reads them: an absent modality costs nothing."""
  inputs = model_inputs(config)
  example = {'video': video_fn()} if 'video' in inputs else {}
  if 'audio' in inputs:
    example['audio'] = _fbank(record, config.model.audio_frames)
  example['label'] = np.int32(record['label'])
  return example


def train_example(record, rng: np.random.Generator, config) -> dict:
  """The reference's training sample: `video` (T, img, img, 3) uint8, `audio` (audio_frames, mels) float32 and
  `label`; an input the model does not read (config.model.modalities) is left out."""
  return _example(record, config, lambda: _train_video(record, rng, config))


def test_example(record, config) -> dict:
  """The test-time sample (segment centres, no augmentation), with the keys train_example has."""
  return _example(record, config, lambda: _test_video(record, config))


# ---------------------------------------------------------------------------------------------------------------
# Positions -> clips, for this process's slice of every global batch.

@functools.lru_cache(maxsize=8)
def epoch_order(seed: int, epoch: int, num_clips: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_clips)


def _local_batch_size(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise DatasetError(f'config.{what}={global_batch} is not divisible by {process_count} processes')
  return global_batch // process_count


def _global_position(local_position, local_batch, global_batch, process_index):
  """This process's `local_position`-th element -> its position in the global stream of clips."""
  return (local_position // local_batch) * global_batch + process_index * local_batch + local_position % local_batch


def steps_per_epoch(config) -> int:
  """Train clips // global batch: the last partial batch of every epoch is dropped, as the reference does."""
  clips = len(get_source(config, 'train'))
  steps = clips // config.batch_size
  if steps == 0:
    raise DatasetError(f'{clips} training clips make no batch of batch_size={config.batch_size}')
  return steps


def num_eval_examples(config) -> int:
  return len(get_source(config, 'test'))


def _finish(dataset, config, local_batch):
  """Threads (or worker processes) and prefetch (config.input.prefetch batches ahead) from config.input."""
  if config.input.worker_count > 0 and not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) take their defaults.
    flags.FLAGS.mark_as_parsed()
  options = grain.ReadOptions(num_threads=max(1, config.input.read_threads),
                              prefetch_buffer_size=max(1, config.input.prefetch) * local_batch)
  dataset = dataset.to_iter_dataset(options)
  if config.input.worker_count > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.input.worker_count))
  return dataset


def train_dataset(config, process_index=0, process_count=1, epoch=0, step=None) -> grain.IterDataset:
  """The training stream from the start of `epoch`, or from global batch `step` when given (a resume on any number
  of processes: the global batches do not depend on it, so the position follows from the step)."""
  if not 0 <= epoch <= config.num_epochs:
    raise DatasetError(f'epoch={epoch}: training has epochs 0..{config.num_epochs - 1} (config.num_epochs)')
  source = get_source(config, 'train')
  num_clips, batch = len(source), config.batch_size
  local = _local_batch_size(batch, process_count, 'batch_size')
  steps = steps_per_epoch(config)
  per_epoch = steps * batch
  seed = config.seed
  if step is None:
    step = epoch * steps
  if not 0 <= step <= config.num_epochs * steps:
    raise DatasetError(f'step={step}: training has steps 0..{config.num_epochs * steps} (config.num_epochs)')

  def load(local_position):
    position = _global_position(int(local_position), local, batch, process_index)
    clip_epoch, offset = divmod(position, per_epoch)
    clip = int(epoch_order(seed, clip_epoch, num_clips)[offset])
    rng = np.random.default_rng([seed, clip_epoch, clip, 1])
    return train_example(source[clip], rng, config)

  positions = grain.MapDataset.range(step * local, config.num_epochs * steps * local)  # whole local batches
  return _finish(positions.map(load).batch(local, drop_remainder=True), config, local)


def create_train_iterator(config, process_index=0, process_count=1, epoch=0, step=None):
  """This process's slice of every global training batch, from the start of `epoch` (or from global batch `step`)
  to the end of the last epoch: video uint8 (B/P, T, H, W, 3), audio float32 (B/P, frames, mels), label int32.
  Epoch e is steps_per_epoch batches after the start of epoch e-1. Checkpointable (`get_state` / `set_state`, for
  iterators made with the same arguments); `step` resumes on any process count without a saved state."""
  return iter(train_dataset(config, process_index, process_count, epoch, step))


def eval_dataset(config, process_index=0, process_count=1, split='test') -> grain.IterDataset:
  source = get_source(config, split)  # 'train': the training clips as test clips (feature extraction)
  num_clips, batch = len(source), config.eval_batch_size
  local = _local_batch_size(batch, process_count, 'eval_batch_size')
  padded = -(-num_clips // batch) * batch

  def load(local_position):
    position = _global_position(int(local_position), local, batch, process_index)
    real = position < num_clips
    example = test_example(source[position if real else 0], config)
    example.update(mask=np.bool_(real), index=np.int32(position))
    return example

  positions = grain.MapDataset.range(padded // process_count)
  return _finish(positions.map(load).batch(local, drop_remainder=True), config, local)


def create_eval_iterator(config, process_index=0, process_count=1, split='test'):
  """Every test clip exactly once, in global batches of eval_batch_size; padding carries mask=False; `index` is
  the clip's position in the split's source (its id: source[index]['id'])."""
  return iter(eval_dataset(config, process_index, process_count, split))


def measure_throughput(config, seconds=10.0) -> dict:
  """Decoded + augmented frames per second of the train pipeline (for BENCHMARKS.md)."""
  import time  # pylint: disable=g-import-not-at-top
  iterator = create_train_iterator(config)
  next(iterator)
  started, clips = time.perf_counter(), 0
  while time.perf_counter() - started < seconds:
    clips += next(iterator)['label'].shape[0]
  elapsed = time.perf_counter() - started
  frames = clips * config.model.num_frames if 'video' in model_inputs(config) else 0
  return {'clips_per_s': clips / elapsed, 'frames_per_s': frames / elapsed, 'inputs': list(model_inputs(config)),
          'read_threads': config.input.read_threads, 'worker_count': config.input.worker_count}
