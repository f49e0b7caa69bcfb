"""Recognise the emotion in a raw video file with a trained (or converted) MMA-DFER checkpoint.

  python -m mma_dfer_jax.predict VIDEO --checkpoint DIR [--config.key=value ...] [--json] [--save-frames out.png]
  python -m mma_dfer_jax.predict VIDEO --checkpoint DIR --config configs/X.py [--config.key=value ...]
  python -m mma_dfer_jax.predict VIDEO --checkpoint DIR --timeline OUT_DIR [--window S --hop S]  (timeline.py)

The clip goes through the same steps as a test clip of the reference: 16 frames at the test-time segment centres,
face crops (the MAFW rule, see faces.py), resized to the model's img_size, scaled to [0, 1]; the audio track's
Kaldi fbank at the track's own sample rate (a clip without audio gets the all-zero fbank, as MAFW clips without a
wav did). The model and its config come from the checkpoint, with `--config.key=value` overrides applied (e.g.
--config.model.attention_impl=einsum); `--config FILE` replaces that config (its `dataset` names the classes). A
model key that changes the parameters' shapes is refused, naming the key.

By default a readable table goes to stdout; with --json exactly one JSON object: `label`, `probabilities` (class
name -> probability), `face_detected`, `has_audio`, `frames_used`, `num_frames`, `notes`, `timings` (seconds per
stage: decode, faces, audio, model_compile, model_run, model, total; and checkpoint, the loading before them).
Errors in the input print one line and exit with 2 (cli.py): a missing or unreadable video, checkpoint or config; a
`--config` whose model does not fit the checkpoint; a model whose output is not finite (damaged parameters: no
`NaN` is ever printed). A `--save-frames` that cannot be written still prints the prediction, then its one error
line, and exits with 2. A video whose stream ends before the frame count its header declares (a truncated file) is
predicted from the frames present, with a note saying so.
"""
import json
import sys
import time
import types
from pathlib import Path
from typing import Optional

import numpy as np

from mma_dfer_jax import cli
from mma_dfer_jax import faces
from mma_dfer_jax import settings
from mma_dfer_jax import video as video_lib

EXIT_USER_ERROR = cli.EXIT_USER_ERROR
MONTAGE_MIN_TILE = 96  # pixels
# 4K and larger frames are scaled down while converting (cheap there) to bound memory: a face in a 1920 px frame
# still has far more pixels than the model's 224.
MAX_FRAME_SIDE = 1920


class PredictError(Exception):
  """A user error: the message is printed as the one line the command line shows (listed in cli.py)."""


load_config_file = cli.load_config_file  # `get_config()` of a config file such as configs/mafw.py


def _compiled_forward(model_config, params, video, audio):
  """The jitted forward pass, compiled ahead of time for these shapes (cached, so a second clip reuses it)."""
  import jax  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import models  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_leaves_with_path(params)
  key = (model_config.to_json(), video.shape, audio.shape,
         tuple((jax.tree_util.keystr(k), np.shape(x), str(x.dtype)) for k, x in leaves))
  compiled = _COMPILED.get(key)
  if compiled is None:
    model = models.build(model_config)

    def forward(p, v, a):
      logits = model.apply({'params': p}, v, a, train=False)
      return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    compiled = jax.jit(forward).lower(params, video, audio).compile()
    _COMPILED[key] = compiled
  return compiled


_COMPILED = {}


def _test_indices(num_segments):
  """The reference's test-time sampling: the centre of each of 16 equal segments, edge-padded when shorter."""
  from mma_dfer_jax.frames import frame_indices  # pylint: disable=import-outside-toplevel
  return lambda num_frames: frame_indices(num_frames, train=False, num_segments=num_segments)


def _fbank(audio, sample_rate, model_config):
  from mma_dfer_jax import audio as audio_lib  # pylint: disable=import-outside-toplevel
  if audio is None:
    return audio_lib.silent_fbank(model_config.audio_frames)
  return audio_lib.fbank_from_waveform(audio, sample_rate, num_frames=model_config.audio_frames)


def clip_inputs(frames, audio, sample_rate, model_config, face_boxes=None):
  """The model's inputs for one clip from its decoded frames and audio samples (shared by predict and timeline).

  Args:
    frames: the clip's sampled frames (its test-time indices), RGB uint8 (H, W, 3) each, as video.read_video
      gives them.
    audio: the clip's audio (channels, samples) float32 on the PCM16 grid, or None when there is no track (the
      silent fbank).
    sample_rate: the audio's own rate.
    model_config: config.model (img_size, audio_frames).
    face_boxes: each frame's detected face box (faces.union_box of its detections, None where none), when the
      caller already knows them; detected here otherwise. The crop rule is faces.face_crops's.
  Returns:
    (crops (T, img_size, img_size, 3) uint8, fbank (audio_frames, mels) float32, face_detected, seconds spent
    {'faces', 'audio'}).
  """
  t = time.perf_counter()
  if face_boxes is None:
    face_boxes = [faces.union_box(faces.detect_faces(f)) for f in frames]
  face_detected = any(b is not None for b in face_boxes)
  smoothed = faces.smooth_boxes(face_boxes)
  crops = np.stack([faces.resize_crop(faces.crop_box(f, b), model_config.img_size)
                    for f, b in zip(frames, smoothed)])
  seconds = {'faces': time.perf_counter() - t}
  t = time.perf_counter()
  fbank = np.asarray(_fbank(audio, sample_rate, model_config), dtype=np.float32)
  seconds['audio'] = time.perf_counter() - t
  return crops, fbank, face_detected, seconds


def uses_faces(model_config) -> bool:
  """False for an audio-only model (model.modalities='audio'): it never sees the frames, so no face is looked for."""
  return 'video' in settings.model_inputs(model_config)


def uses_audio(model_config) -> bool:
  """False for a video-only model (model.modalities='video'): its fbank is not computed (the model ignores it)."""
  return 'audio' in settings.model_inputs(model_config)


def _class_names(config):
  from mma_dfer_jax import labels  # pylint: disable=import-outside-toplevel
  return labels.class_names(config.get('dataset', ''), config.model.num_classes)


def predict_video(path, params, config, save_frames: Optional[str] = None) -> dict:
  """Predicts the emotion of one video file; returns the dict the --json output prints.

  Args:
    path: a video file PyAV can read (mp4, mkv, avi, webm, ...).
    params: the model parameters (as `checkpoint.load_params` returns them).
    config: the experiment config (its `model` sub-config and `dataset`).
    save_frames: where to write a PNG montage of the crops the model saw, titled with the prediction.
  Raises:
    video.VideoError: the video is missing or cannot be decoded.
  """
  model_config = config.model
  timings = {}
  start = time.perf_counter()

  clip = video_lib.read_video(path, pick=_test_indices(model_config.num_frames), max_side=MAX_FRAME_SIDE)
  timings['decode'] = time.perf_counter() - start

  # A unimodal model's absent input is not prepared: no face detection for audio-only (centre crops, unused), the
  # silent fbank for video-only.
  detect = uses_faces(model_config)
  crops, fbank, face_detected, seconds = clip_inputs(
      clip.frames, clip.audio if uses_audio(model_config) else None, clip.sample_rate, model_config,
      face_boxes=None if detect else [None] * len(clip.frames))
  timings.update(seconds)

  t = time.perf_counter()
  video_in = (crops.astype(np.float32) / 255.0)[None]
  audio_in = fbank[None]
  forward = _compiled_forward(model_config, params, video_in, audio_in)
  timings['model_compile'] = time.perf_counter() - t
  t = time.perf_counter()
  probabilities = np.asarray(forward(params, video_in, audio_in), dtype=np.float64)[0]
  timings['model_run'] = time.perf_counter() - t
  timings['model'] = timings['model_compile'] + timings['model_run']

  _check_finite(probabilities, params, path)
  probabilities = probabilities / probabilities.sum()  # exact in float64 for the JSON
  names = _class_names(config)
  best = int(np.argmax(probabilities))
  notes = []
  if not uses_audio(model_config):
    notes.append('video-only model (model.modalities=video): the audio track is not used')
  elif clip.audio is None:
    notes.append('the video has no audio track: the model got the silent (all-zero) fbank')
  if clip.damaged_packets:
    notes.append(f'{clip.damaged_packets} damaged packets could not be decoded and were skipped')
  if not detect:
    notes.append('audio-only model (model.modalities=audio): the frames are not used; no face was looked for')
  elif not face_detected:
    notes.append('no face was found: the model got centre crops')
  if clip.ended_early:
    notes.append(f'the video stream ends early: its header declares {clip.declared_frames} frames, '
                 f'{clip.num_frames} are there (a truncated file?); the model saw frames of the part present')
  if clip.num_frames < model_config.num_frames:
    notes.append(f'the video has {clip.num_frames} frames: the last one was repeated to make '
                 f'{model_config.num_frames}')
  result = {
      'video': str(path),
      'label': names[best],
      'probabilities': {name: float(p) for name, p in zip(names, probabilities)},
      'face_detected': bool(face_detected) if detect else None,  # null: an audio-only model looks for none
      'has_audio': clip.audio is not None,
      'frames_used': [int(i) for i in clip.indices],
      'num_frames': int(clip.num_frames),
      'fps': clip.fps,
      'sample_rate': clip.sample_rate,
      'notes': notes,
  }
  if save_frames:
    t = time.perf_counter()
    try:
      save_montage(save_frames, crops, f'{names[best]} ({probabilities[best]:.0%})', clip.indices)
    except (OSError, ValueError) as e:  # an unwritable folder, an unknown image extension: the prediction stands
      reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
      result['save_frames_error'] = (f'--save-frames {save_frames}: the montage could not be written ({reason}); '
                                     'choose a writable .png path (the prediction is complete)')
    timings['save_frames'] = time.perf_counter() - t
  timings['total'] = time.perf_counter() - start
  result['timings'] = {k: round(v, 4) for k, v in timings.items()}
  return result


def _check_finite(probabilities, params, path) -> None:
  """Refuses a NaN/Inf output (damaged parameters) rather than printing a confident label with it."""
  if np.all(np.isfinite(probabilities)) and probabilities.sum() > 0:
    return
  import jax  # pylint: disable=import-outside-toplevel
  bad = sum(int(np.size(x) - np.isfinite(np.asarray(x, np.float32)).sum()) for x in jax.tree_util.tree_leaves(params))
  cause = (f'{bad} of the checkpoint\'s parameters are NaN/Inf: the checkpoint is damaged; convert or train it '
           'again, or use an earlier one') if bad else 'the parameters are finite: the model overflowed on this input'
  raise PredictError(f'{path}: the model\'s output is not finite (NaN/Inf); {cause}')


def save_montage(path, crops: np.ndarray, title: str, indices=None) -> None:
  """A grid of the crops (4 a row for 16) under a title line, as a PNG."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  count = crops.shape[0]
  size = max(crops.shape[1], MONTAGE_MIN_TILE)  # a tiny model's crops are enlarged so they can be seen
  columns = int(np.ceil(np.sqrt(count)))
  rows = int(np.ceil(count / columns))
  header = max(24, size // 6)
  sheet = Image.new('RGB', (columns * size, rows * size + header), 'white')
  draw = ImageDraw.Draw(sheet)
  font = ImageFont.load_default(size=int(header * 0.6))
  draw.text((8, header * 0.15), title, fill='black', font=font)
  small = ImageFont.load_default(size=max(10, size // 12))
  for k, crop in enumerate(crops):
    x, y = (k % columns) * size, (k // columns) * size + header
    sheet.paste(Image.fromarray(crop).resize((size, size), Image.NEAREST), (x, y))
    if indices is not None:
      draw.text((x + 4, y + 2), f'#{int(indices[k])}', fill='yellow', font=small, stroke_width=1, stroke_fill='black')
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  sheet.save(path)


def format_table(result: dict) -> str:
  lines = [f"{result['video']}: {result['label']}", '']
  ranked = sorted(result['probabilities'].items(), key=lambda kv: -kv[1])
  width = max(len(name) for name, _ in ranked)
  for name, p in ranked:
    lines.append(f'  {name:<{width}}  {p:6.1%}  {"#" * int(round(p * 40))}')
  lines.append('')
  face = {True: 'yes', False: 'no', None: 'not looked for'}[result['face_detected']]
  lines.append(f"  face detected: {face}    "
               f"audio: {'yes' if result['has_audio'] else 'no'}    frames: {result['num_frames']} "
               f"at {result['fps']:.2f} fps, used {result['frames_used']}")
  lines.append('  seconds: ' + ', '.join(f'{k} {v:.2f}' for k, v in result['timings'].items()))
  lines.extend(f'  note: {n}' for n in result['notes'])
  return '\n'.join(lines)


def _model_differences(config, stored, label: str, keys=None) -> list:
  """`model.key (A in the checkpoint, B <label>)` for every config.model key whose values differ (of `keys` only,
  when given: the overridden ones)."""
  mine, theirs = config.model.to_dict(), stored.model.to_dict()
  names = [k for k in sorted(set(mine) | set(theirs)) if keys is None or f'model.{k}' in keys]
  return [f'model.{k} ({theirs.get(k)!r} in the checkpoint, {mine.get(k)!r} {label})'
          for k in names if mine.get(k) != theirs.get(k)]


def check_fits(params, config, checkpoint_dir, config_path=None, stored=None, overrides=()) -> None:
  """Refuses a config whose model has other parameter shapes than the checkpoint, naming the differing keys.

  config_path: the --config file `config` came from; overrides: the --config.key overrides applied onto the stored
  config (none of either: the stored config itself).
  """
  import flax  # pylint: disable=import-outside-toplevel

  from mma_dfer_jax import convert  # pylint: disable=import-outside-toplevel
  model_overrides = [k for k in overrides if k == 'model' or k.startswith('model.')]
  if config_path:
    where, label, keys = f'--config {config_path}', 'in --config', None
  elif model_overrides:
    where, label, keys = ' '.join(f'--config.{k}' for k in model_overrides), 'given', set(model_overrides)
  else:
    where, label, keys = f'{checkpoint_dir}/config.json', '', None
  try:
    expected = convert.param_shapes(config.model)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise PredictError(f'{where}: the model cannot be built from it ({type(e).__name__}: {e})') from e
  got = {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(params).items()}
  bad = sorted('/'.join(k) for k in set(expected) | set(got) if expected.get(k) != got.get(k))
  if not bad:
    return
  compared = stored is not None and (config_path or model_overrides)
  differences = _model_differences(config, stored, label, keys) if compared else []
  detail = ('; '.join(differences[:6]) if differences else
            'parameters ' + ', '.join(bad[:4]) + (' ...' if len(bad) > 4 else '') + ' differ in shape')
  if config_path:
    fix = 'drop --config to use the checkpoint\'s own config, or give the config it was made with'
  elif model_overrides:
    fix = 'the parameters\' shapes follow from these keys: drop the override (the checkpoint\'s own config fits)'
  else:
    fix = 'the checkpoint is damaged or was written by other code; give --config configs/X.py it was made with'
  raise PredictError(f'{where} does not fit the checkpoint {checkpoint_dir}: {detail}; {fix}')


def load_model(checkpoint_dir, config_path=None, config=None, overrides=()):
  """(params, config) from a checkpoint directory, the config checked (settings.validate_model) and fitted to them.

  config: the config to use, from --config FILE (`config_path`) or the stored one with --config.key=value
  `overrides` applied; without it the file at `config_path` when given, else the config stored with the checkpoint.
  Raises:
    PredictError: no checkpoint there, it cannot be read, or the config's model does not fit its parameters.
  """
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if not checkpoint.as_path(checkpoint_dir).is_dir():  # a local directory or a URL such as gs://bucket/run
    raise PredictError(f'{checkpoint_dir}: no such checkpoint directory (give the --out of convert or a '
                       'launch.py work directory)')
  stored = checkpoint.load_config(checkpoint_dir)
  if config is None:
    config = load_config_file(config_path) if config_path else stored
  if config is None:
    raise PredictError(f'{checkpoint_dir}: holds no config.json; name the experiment with --config configs/X.py')
  cli.check_model_config(config.model)
  try:
    params = checkpoint.load_params(checkpoint_dir)
  except FileNotFoundError as e:
    raise PredictError(str(e)) from e
  except Exception as e:  # Orbax reports damaged checkpoints with many exception types
    raise PredictError(f'{checkpoint_dir}: reading the checkpoint failed ({type(e).__name__}: {e})') from e
  check_fits(params, config, checkpoint_dir, config_path, stored, overrides)
  return params, config


# ---------------------------------------------------------------------------------------------------------------
# Command line: absl flags, `--config FILE` plus `--config.key=value` as every command takes them (cli.py).

PROG = 'mma-dfer-predict'


def _flag_values(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = flags.FlagValues()
  cli.define_checkpoint_flags(fv, argv)
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.', flag_values=fv)
  flags.DEFINE_string('save-frames', None, 'Write a PNG montage of the 16 face crops here.', flag_values=fv)
  flags.DEFINE_string('timeline', None, 'The emotion over time instead: timeline.csv, .json and .png of a sliding '
                      'window in this folder (see timeline.py).', flag_values=fv)
  flags.DEFINE_float('window', None, '--timeline window length in seconds (default 2).', flag_values=fv)
  flags.DEFINE_float('hop', None, '--timeline step between windows in seconds (default 1).', flag_values=fv)
  return fv


def parse_args(argv):
  """The command line (without the program name) as attributes: video, checkpoint, config (the --config file's,
  or the stored one with the overrides applied; None when neither exists), config_path, overrides (the overridden
  keys), json, save_frames, timeline, window, hop."""
  argv = [PROG, *argv]
  overrides = cli.override_keys(argv)
  config_path = cli.flag_value(argv, 'config')
  fv = _flag_values(argv)
  rest = cli.parse_flags(fv, argv,
                         usage=f'{PROG} VIDEO --checkpoint DIR [--config FILE] [--config.key=value ...] [flags]')
  if not fv.checkpoint:
    raise cli.UserError('--checkpoint DIR is required: the --out of convert or a launch.py work directory')
  if len(rest) != 2:
    raise cli.UserError(f'usage: {PROG} VIDEO --checkpoint DIR [--config FILE] [--config.key=value ...] [--json] '
                        '(one video; see --help)')
  if fv.timeline is None and (fv.window is not None or fv.hop is not None):
    raise cli.UserError('--window and --hop set the timeline\'s windows; add --timeline OUT_DIR')
  return types.SimpleNamespace(video=rest[1], checkpoint=fv.checkpoint, config=fv.config, config_path=config_path,
                               overrides=overrides, json=fv.json, save_frames=fv['save-frames'].value,
                               timeline=fv.timeline, window=fv.window, hop=fv.hop)


def _predict(argv) -> int:
  args = parse_args(argv)
  if not Path(args.video).is_file():
    raise PredictError(f'{args.video}: no such video file')
  model = (args.checkpoint, args.config_path, args.config, args.overrides)
  if args.timeline is not None:  # the emotion over time: timeline.py (checks its settings before the model loads)
    from mma_dfer_jax import timeline  # pylint: disable=import-outside-toplevel
    timeline.check_args(args)
    return timeline.run_command(args, *load_model(*model))
  start = time.perf_counter()
  params, config = load_model(*model)
  load_seconds = time.perf_counter() - start
  result = predict_video(args.video, params, config, save_frames=args.save_frames)
  result['timings']['checkpoint'] = round(load_seconds, 4)  # reading params and config, outside `total`
  # allow_nan=False: a NaN that got past the checks is a bug, never invalid JSON on stdout.
  print(json.dumps(result, allow_nan=False) if args.json else format_table(result), flush=True)
  if 'save_frames_error' in result:
    cli.report(result['save_frames_error'])
    return EXIT_USER_ERROR
  return 0


def main(argv=None) -> int:
  """The command line (`mma-dfer-predict`) with `argv` (sys.argv[1:] by default); returns the exit code (2 for a user
  error, printed as one line)."""
  try:
    return _predict(sys.argv[1:] if argv is None else list(argv))
  except Exception as e:  # pylint: disable=broad-exception-caught
    message = cli.user_error_message(e)
    if message is None:
      raise
    cli.report(message)
    return EXIT_USER_ERROR


def run():
  """The console script's entry point."""
  sys.exit(main())


if __name__ == '__main__':
  run()
