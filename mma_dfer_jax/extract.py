"""Features of a trained (or converted) model for every clip of a split or every video of a folder, in one npz file.

  python -m mma_dfer_jax.extract --checkpoint DIR --videos FOLDER --out features.npz [--batch_size 8]
  python -m mma_dfer_jax.extract --checkpoint DIR --split test --out features.npz [--config.key=value ...]
  python launch.py --config configs/X.py --workdir DIR --mode extract [--split test|train]

For each clip, what the model computes on its way to the label (read from the model's `sow`n intermediates, the
same forward pass as evaluation):
- `embeddings` (N, E): the clip embedding the classifier receives (the temporal transformer's cls output;
  E = model.temporal_width);
- `frame_features` (N, T, D): the fused per-frame features, after the audio-visual fusion (each frame's cls plus
  the clip's audio cls; D = model.width), the sequence the temporal head projects (`vision_proj`) and runs its
  transformer over. A video-only model: the frames' cls alone; an audio-only one: the audio cls repeated T times;
- `logits` (N, C): the classifier's output (softmax: predict's probabilities).

The file (np.load reads it, no pickle): those three, `ids` (N,) the clip ids (a split: the dataset records' `id`; a
folder: each video's path relative to FOLDER), `labels` (N,) where known (a split), `class_names`, and where it came
from: `config_json` (the experiment config as JSON), `checkpoint` (its path) and `checkpoint_step` (the training
step of a work directory's checkpoint; -1 for a converted one), `source` ('split:test', 'split:train' or
'videos:FOLDER'). A folder adds `face_detected` (False where an audio-only model looked for none) and `has_audio`
per clip, and `failed` / `failed_reasons`: the files that could not be read (counted, listed on stderr, not fatal).

A split goes through the eval input pipeline (the same global batches as evaluation: test-time frames, the last
partial batch padded and the padding dropped), on the config's mesh; `--split train` takes the training clips the
same way (no augmentation). A folder goes through predict's front end (16 test-time frames, face crops, the fbank;
predict.py), in batches of --batch_size. The command takes the checkpoint's stored config (or --config FILE) with
--config.key=value overrides, as predict does. `launch.py --mode extract` writes
WORKDIR/features_fold<k>_<split>.npz from the checkpoint of the work directory, or init.checkpoint. A user error is
one line and exit code 2 (cli.py): no such checkpoint, a folder without videos, no video that could be read, an
output that cannot be written, a config that does not fit the checkpoint.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mma_dfer_jax import cli

CLIP_EMBEDDING = 'video_features'         # the names MMADFER sows (models/mma_dfer.py)
FRAME_FEATURES = 'fused_frame_features'
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg', '.flv', '.wmv')
SPLITS = ('test', 'train')
DEFAULT_BATCH_SIZE = 8


# ---------------------------------------------------------------------------------------------------------------
# The model's features.

def features_fn(model):
  """`(params, batch) -> {'embeddings', 'frame_features', 'logits'}` (float32) of `model`, the eval forward pass with
  its sown intermediates; batch: `video` (uint8 or float in [0, 1]) and `audio`, as train.eval_step takes them."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import train  # pylint: disable=import-outside-toplevel

  def features(params, batch):
    video, audio = train.to_model_inputs(batch)
    logits, state = model.apply({'params': params}, video, audio, train=False, mutable=['intermediates'])
    sown = state['intermediates']
    return {'embeddings': sown[CLIP_EMBEDDING][0].astype(jnp.float32),
            'frame_features': sown[FRAME_FEATURES][0].astype(jnp.float32),
            'logits': logits.astype(jnp.float32)}
  return features


def eval_model_and_params(config, params):
  """The model and parameters as the eval step holds them (train.create_train_state's: the implementations resolved
  for this host, frozen weights stored in the compute dtype); the state is only traced, so no optimizer state is
  made."""
  import jax  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import train  # pylint: disable=import-outside-toplevel
  model = jax.eval_shape(lambda p: train.create_train_state(config, p), params).model  # a static field: the module
  return model, train.device_params(params, config.model.dtype)


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def clip_id(source, index: int) -> str:
  """A dataset clip's id (the builders' `id`; its position where a record has none)."""
  record = source[index]
  return _text(record.get('id', index) if hasattr(record, 'get') else index)


# ---------------------------------------------------------------------------------------------------------------
# A split of the dataset, through the eval input pipeline.

def extract_split(config, params, split='test', progress=True) -> dict:
  """The features of every clip of `split` of config.dataset / config.fold, in the eval pipeline's order."""
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import labels as labels_lib  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import sharding  # pylint: disable=import-outside-toplevel
  if split not in SPLITS:
    raise cli.UserError(f'--split={split}: use one of {", ".join(SPLITS)}')
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  model, params = eval_model_and_params(config, params)
  params = jax.device_put(params, sharding.replicated(mesh))
  features = features_fn(model)

  def step(params, batch):
    out = features(params, batch)
    out.update(label=batch['label'], index=batch['index'], mask=batch['mask'])
    return out
  step = jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))

  source = input_pipeline.get_source(config, split)
  main_process = jax.process_index() == 0
  collected = {key: [] for key in ('embeddings', 'frame_features', 'logits', 'label', 'index')}
  iterator = input_pipeline.create_eval_iterator(config, jax.process_index(), jax.process_count(), split=split)
  bar = tqdm(total=len(source), unit='clip', desc=f'extract {split}', disable=not (progress and main_process),
             dynamic_ncols=True)
  with bar:
    for local in iterator:
      fed = ('video', 'audio', 'label', 'index', 'mask')  # a unimodal model's pipeline leaves the other input out
      batch = sharding.global_batch({k: local[k] for k in fed if k in local}, mesh)
      out = jax.device_get(step(params, batch))
      real = np.asarray(out.pop('mask')).astype(bool)
      for key, value in out.items():
        collected[key].append(np.asarray(value)[real])
      bar.update(int(real.sum()))
  if not collected['index']:
    raise cli.UserError(f'config.dataset={config.dataset} fold {config.fold}: its {split} split holds no clips')
  arrays = {key: np.concatenate(parts) for key, parts in collected.items()}
  index = arrays.pop('index')
  return {
      'ids': np.asarray([clip_id(source, int(i)) for i in index] if main_process else [str(int(i)) for i in index]),
      'embeddings': arrays['embeddings'], 'frame_features': arrays['frame_features'], 'logits': arrays['logits'],
      'labels': arrays['label'].astype(np.int32),
      'class_names': np.asarray(labels_lib.class_names(config.dataset, config.model.num_classes)),
      'source': np.asarray(f'split:{split}'),
  }


# ---------------------------------------------------------------------------------------------------------------
# A folder of videos, through predict's front end.

def list_videos(folder) -> list:
  """The video files under `folder` (any depth), sorted by their path relative to it."""
  root = Path(folder)
  if not root.is_dir():
    raise cli.UserError(f'--videos {folder}: no such folder (give a folder of video files)')
  found = sorted((p for p in root.rglob('*') if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS),
                 key=lambda p: p.relative_to(root).as_posix())
  if not found:
    raise cli.UserError(f'--videos {folder}: no video files ({", ".join(VIDEO_EXTENSIONS)}) in it or below it')
  return found


def video_inputs(path, model_config) -> dict:
  """One video as predict.predict_video prepares it: 16 test-time face crops (uint8) and the fbank; an absent
  modality of a unimodal model is not prepared (no face detection for audio-only, the silent fbank for video-only)."""
  from mma_dfer_jax import predict  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import video as video_lib  # pylint: disable=import-outside-toplevel
  pick = predict._test_indices(model_config.num_frames)  # pylint: disable=protected-access
  clip = video_lib.read_video(path, pick=pick, max_side=predict.MAX_FRAME_SIDE)
  detect = predict.uses_faces(model_config)
  crops, fbank, face_detected, _ = predict.clip_inputs(
      clip.frames, clip.audio if predict.uses_audio(model_config) else None, clip.sample_rate, model_config,
      face_boxes=None if detect else [None] * len(clip.frames))
  return {'video': crops, 'audio': fbank, 'face_detected': bool(face_detected) and detect,
          'has_audio': clip.audio is not None}


def _padded(items: list, key: str, size: int) -> np.ndarray:
  stacked = np.stack([item[key] for item in items])
  missing = size - len(items)
  return np.concatenate([stacked, np.zeros((missing,) + stacked.shape[1:], stacked.dtype)]) if missing else stacked


def extract_videos(config, params, folder, batch_size=DEFAULT_BATCH_SIZE, progress=True) -> dict:
  """The features of every readable video under `folder`, in batches of `batch_size` (the last one zero-padded,
  so the model compiles once); unreadable files are listed in `failed` / `failed_reasons`."""
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import audio as audio_lib  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import labels as labels_lib  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import video as video_lib  # pylint: disable=import-outside-toplevel
  if batch_size < 1:
    raise cli.UserError(f'--batch_size={batch_size}: must be at least 1')
  paths = list_videos(folder)
  root = Path(folder)
  model, params = eval_model_and_params(config, params)
  features = jax.jit(features_fn(model))
  kept, parts, failed, reasons = [], [], [], []

  def run(items):
    batch = {key: _padded(items, key, batch_size) for key in ('video', 'audio')}
    out = jax.device_get(features(params, batch))
    parts.append({key: np.asarray(value)[:len(items)] for key, value in out.items()})

  pending = []
  with tqdm(paths, unit='video', desc='extract', disable=not progress, dynamic_ncols=True) as bar:
    for path in bar:
      name = path.relative_to(root).as_posix()
      try:
        item = video_inputs(path, config.model)
      except (video_lib.VideoError, audio_lib.AudioError) as e:
        failed.append(name)
        reasons.append(' '.join(str(e).split()))
        continue
      item['id'] = name
      pending.append(item)
      if len(pending) == batch_size:
        run(pending)
        kept.extend(pending)
        pending = []
    if pending:
      run(pending)
      kept.extend(pending)
  if not kept:
    raise cli.UserError(f'--videos {folder}: none of its {len(paths)} videos could be read (first: {failed[0]}: '
                        f'{reasons[0]})')
  arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  return {
      'ids': np.asarray([item['id'] for item in kept]),
      **arrays,
      'face_detected': np.asarray([item['face_detected'] for item in kept], bool),
      'has_audio': np.asarray([item['has_audio'] for item in kept], bool),
      'failed': np.asarray(failed, dtype=str),
      'failed_reasons': np.asarray(reasons, dtype=str),
      'class_names': np.asarray(labels_lib.class_names(config.get('dataset', ''), config.model.num_classes)),
      'source': np.asarray(f'videos:{folder}'),
  }


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, provenance and the file.

def restored_step(checkpoint_dir):
  """The training step load_params restored from a work directory (after it, a damaged newer step has been moved
  aside, so the newest listed is that one); None for a converted checkpoint."""
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  steps = checkpoint.train_steps(checkpoint_dir)
  return steps[-1] if steps else None


def provenance(config, checkpoint_dir, step) -> dict:
  return {'config_json': np.asarray(config.to_json_best_effort(indent=2)),
          'checkpoint': np.asarray(str(checkpoint_dir)),
          'checkpoint_step': np.asarray(-1 if step is None else int(step), np.int64)}


def write_npz(out, arrays: dict):
  """Writes `arrays` to `out` (.npz; a local path, written beside and renamed, or a URL such as gs://...)."""
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  path = checkpoint.as_path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  if checkpoint.is_url(path):
    with path.open('wb') as f:
      np.savez(f, **arrays)
    return path
  temporary = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  with open(temporary, 'wb') as f:  # a file object: np.savez would add .npz to a name without it
    np.savez(f, **arrays)
  temporary.replace(path)
  return path


def summary_line(out, arrays: dict, seconds: float) -> str:
  return json.dumps({'out': str(out), 'clips': int(len(arrays['ids'])), 'failed': int(len(arrays.get('failed', ()))),
                     'embedding_dim': int(arrays['embeddings'].shape[-1]),
                     'frame_features': list(arrays['frame_features'].shape[1:]), 'seconds': round(seconds, 2)})


def extract_checkpoint(config, workdir, split='test', progress=True):
  """`launch.py --mode extract`: the features of `split` from init.checkpoint (or the work directory's newest
  checkpoint) -> WORKDIR/features_fold<k>_<split>.npz; returns its path."""
  import jax  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  source = config.init.checkpoint or str(workdir)
  try:
    params = checkpoint.load_params(source)
  except checkpoint.CheckpointNotFoundError as e:
    raise cli.UserError(f'{e}; pass --config.init.checkpoint=DIR') from None
  from mma_dfer_jax import predict  # pylint: disable=import-outside-toplevel
  predict.check_fits(params, config, source)
  start = time.perf_counter()
  arrays = extract_split(config, params, split, progress)
  arrays.update(provenance(config, checkpoint.as_path(source), restored_step(source)))
  out = checkpoint.as_path(workdir) / f'features_fold{config.fold}_{split}.npz'
  if jax.process_index() == 0:
    write_npz(out, arrays)
    print(summary_line(out, arrays, time.perf_counter() - start), flush=True)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def _flag_values(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = flags.FlagValues()
  cli.define_checkpoint_flags(fv, argv)
  flags.DEFINE_string('videos', None, 'A folder of video files (searched at any depth).', flag_values=fv)
  flags.DEFINE_string('split', None, "A split of the config's dataset and fold instead: test or train.",
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'The .npz file to write.', flag_values=fv)
  flags.DEFINE_integer('batch_size', DEFAULT_BATCH_SIZE, 'Videos per model call (--videos).', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show a progress bar on stderr.', flag_values=fv)
  return fv


def _check_flags(fv) -> None:
  if not fv.checkpoint or not fv.out:
    raise cli.UserError('--checkpoint DIR and --out FILE.npz are required, with --videos FOLDER or --split test|train')
  if (fv.videos is None) == (fv.split is None):
    raise cli.UserError('give one of --videos FOLDER (a folder of video files) or --split test|train (the dataset)')
  if fv.split is not None and fv.split not in SPLITS:
    raise cli.UserError(f'--split={fv.split}: use one of {", ".join(SPLITS)}')
  if not fv.out.endswith('.npz'):
    raise cli.UserError(f'--out {fv.out}: name a .npz file, e.g. --out features.npz')
  if fv.batch_size < 1:
    raise cli.UserError(f'--batch_size={fv.batch_size}: must be at least 1')


def main(argv=None) -> int:
  """The command line (`mma-dfer-extract`), argv[0] the program; returns the exit code (a user error raises)."""
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import predict  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  overrides = cli.override_keys(argv)
  config_path = cli.flag_value(argv, 'config')
  fv = _flag_values(argv)
  rest = cli.parse_flags(fv, argv)
  if len(rest) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(rest[1:])} (see --help)')
  _check_flags(fv)
  cli.check_writable_dir(checkpoint.as_path(fv.out).parent, '--out')
  if fv.videos is not None:
    list_videos(fv.videos)  # a folder without videos is refused before the checkpoint loads
  # The checkpoint's config, or --config FILE, with the overrides applied; refused where it does not fit.
  params, config = predict.load_model(fv.checkpoint, config_path, fv.config, overrides)
  start = time.perf_counter()
  if fv.videos is not None:
    arrays = extract_videos(config, params, fv.videos, fv.batch_size, fv.progress)
  else:
    cli.check_config(config)
    arrays = extract_split(config, params, fv.split, fv.progress)
  arrays.update(provenance(config, checkpoint.as_path(fv.checkpoint), restored_step(fv.checkpoint)))
  write_npz(fv.out, arrays)
  for reason in arrays.get('failed_reasons', ()):
    print(f'skipped: {reason}', file=sys.stderr)
  print(summary_line(fv.out, arrays, time.perf_counter() - start), flush=True)
  return 0


def run(argv=None):
  """The console script's entry point."""
  cli.run_main(main, argv)


if __name__ == '__main__':
  run()
