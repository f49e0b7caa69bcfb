"""A 2-epoch run of the demo-sized model on each added dataset learns above chance: CREMA-D (the paper's audio-visual
model, `launch.py --mode cross_validate` on two folds), RAVDESS (the same model, fold 1, in process) and FERV39k (a
video-only model from launch.py). (An audio-only demo model learns the tones too, but not reliably within 2 epochs.)

Each miniature download is in its owners' layout and file names, made from the real talking face with PyAV as
tests/test_more_datasets.py makes them (8 frames a clip: the pipeline pads to 16), and goes through its builder.
Three of a dataset's classes are used, balanced in every split, and each is learnable from either modality: the class
tints the face (red, cyan, dark) and sets the pitch of the clip's harmonic tone. A model that answers one class
scores 33%; each run must get at least 5 of its 9 test clips right (all 9 with the fixed seeds here), so more than
any one-class answer and over 3x 1/num_classes. Every run trains from random encoders (no SSL files), as the
demo does."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
from conftest import ROOT
from test_more_datasets import load_face_frames
from test_more_datasets import write_video

from configs import demo as demo_config
from configs import ravdess as ravdess_config
from data.cremad import cremad_dataset_builder as cremad
from data.ravdess import ravdess_dataset_builder as ravdess
from mma_dfer_jax import labels

pytestmark = pytest.mark.slow
cremad_build = importlib.import_module('data.cremad.build')  # the module `python -m data.cremad.build` runs

FRAMES, RATE = 8, 16000
TONE_SECONDS = 5.12  # the whole fbank window (512 frames of 10 ms)
TINTS = np.array([(1.0, 0.15, 0.15), (0.15, 1.0, 1.0), (0.3, 0.3, 0.3)], np.float32)  # class -> RGB gains
PITCHES = (300.0, 900.0, 2700.0)  # class -> tone (Hz)
MIN_CORRECT = 5 / 9  # of the test clips: two clips more than any one-class answer (3 of 9), over 3x chance
# configs/demo.py's model (and its learning rate), given to each dataset's config.
DEMO_MODEL_KEYS = ('img_size', 'num_frames', 'width', 'depth', 'num_heads', 'mlp_dim', 'fusion_width', 'temporal_width',
                   'temporal_heads', 'temporal_head_dim', 'temporal_mlp_dim', 'drop_path_rate')
# Batch 1 (CREMA-D: 2): the most updates in 2 epochs; at batch 2 RAVDESS and FERV39k end at 6 of 9 right.
RUN = {'num_epochs': 2, 'batch_size': 1, 'eval_batch_size': 9, 'checkpoint_every_steps': 1000, 'log_every_steps': 5}


@pytest.fixture(scope='module')
def face():
  frames, _, _ = load_face_frames(FRAMES)
  return frames


def tinted(frames: np.ndarray, label: int, k: int) -> np.ndarray:
  """The face starting k frames later (so that clips differ), tinted by the class."""
  return np.clip(np.roll(frames, -k, axis=0) * TINTS[label], 0, 255).astype(np.uint8)


def tone(label: int, k: int) -> np.ndarray:
  """TONE_SECONDS at RATE: a tone at the class's pitch (slightly detuned per clip) with its harmonics, in a little
  noise."""
  rng = np.random.default_rng(k)
  t = np.arange(int(TONE_SECONDS * RATE)) / RATE
  pitch = PITCHES[label] * rng.uniform(0.97, 1.03)
  harmonics = [h for h in range(1, 5) if h * pitch < RATE / 2]
  wave = rng.uniform(0.3, 0.5) * sum(np.sin(2 * np.pi * h * pitch * t + rng.uniform(0, 6)) / h for h in harmonics)
  return (wave + rng.normal(0, 0.01, t.shape)).astype(np.float32)


def demo_sized(num_classes: int) -> dict:
  """configs/demo.py's model and learning rate for a dataset of num_classes, no SSL files (random encoders)."""
  demo = demo_config.get_config()
  return {**{f'model.{k}': demo.model[k] for k in DEMO_MODEL_KEYS}, 'model.num_classes': num_classes,
          'learning_rate': demo.learning_rate, 'init.face_checkpoint': '', 'init.audio_checkpoint': '', **RUN}


def assert_above_chance(summary: dict, num_classes: int, num_test: int):
  assert summary['num_test_clips'] == num_test
  assert summary['war'] >= 100 * MIN_CORRECT > 100 / num_classes, summary
  assert np.isfinite(summary['train_loss'])


def launch(workdir: Path, config_file: str, overrides: dict, *flags) -> dict:
  """`python launch.py --config config_file --workdir workdir --config.key=value ...`; its summary.json."""
  done = subprocess.run([sys.executable, 'launch.py', '--config', config_file, '--workdir', str(workdir), *flags,
                         *(f'--config.{k}={v}' for k, v in overrides.items())],
                        cwd=ROOT, text=True, capture_output=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads((workdir / 'summary.json').read_text()) if (workdir / 'summary.json').exists() else {}


def train_in_process(module, data_dir: Path, workdir: Path, **overrides) -> dict:
  from mma_dfer_jax import experiment  # pylint: disable=import-outside-toplevel
  config = module.get_config()
  config.data_dir = str(data_dir)
  for key, value in {**demo_sized(config.model.num_classes), 'input.read_threads': 1, **overrides}.items():
    *parents, leaf = key.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  experiment.train_and_evaluate(config, workdir)
  return json.loads((workdir / 'summary.json').read_text())


# ---------------------------------------------------------------------------------------------------------------
# CREMA-D: the paper's model, 5-fold protocol run on folds 1 and 2 by launch.py.

CREMAD_EMOTIONS = ('ANG', 'HAP', 'SAD')
CREMAD_ACTORS = (1001, 1019, 1037, 1055)  # one in each of folds 1..4's test blocks
CREMAD_SENTENCES = ('DFA', 'IEO', 'TIE')


def make_cremad(root: Path, face: np.ndarray) -> Path:
  k = 0
  for actor in CREMAD_ACTORS:
    for label, emotion in enumerate(CREMAD_EMOTIONS):
      for sentence in CREMAD_SENTENCES:
        stem = f'{actor}_{sentence}_{emotion}_XX'
        write_video(root / 'VideoFlash' / f'{stem}.flv', tinted(face, label, k), 'flv')
        (root / 'AudioWAV').mkdir(parents=True, exist_ok=True)
        soundfile.write(root / 'AudioWAV' / f'{stem}.wav', tone(label, k), RATE)
        k += 1
  return root


def test_cremad_cross_validation_of_two_folds_learns_above_chance(tmp_path, face):
  manual = make_cremad(tmp_path / 'CREMA-D', face)
  data_dir, workdir = tmp_path / 'datasets', tmp_path / 'cv'
  assert cremad_build.main(['--manual_dir', str(manual), '--data_dir', str(data_dir), '--folds', '1,2']) == 0
  overrides = {**demo_sized(6), 'batch_size': 2, 'data_dir': data_dir, 'input.read_threads': 1}
  launch(workdir, 'configs/cremad.py', overrides,
         '--mode', 'cross_validate', '--folds', '1,2')
  for fold, tested in ((1, 1001), (2, 1019)):
    assert cremad.fold_of_actor(tested) == fold
    summary = json.loads((workdir / f'fold{fold}' / 'summary.json').read_text())
    assert summary['dataset'] == 'cremad' and summary['fold'] == fold and summary['epochs'] == 2
    assert summary['steps'] == 2 * (27 // 2)  # three actors' 27 clips train, batch 2
    assert_above_chance(summary, 6, num_test=9)
  table = json.loads((workdir / 'cross_validation.json').read_text())
  assert 'cremad' in (workdir / 'cross_validation.md').read_text() and table


# ---------------------------------------------------------------------------------------------------------------
# RAVDESS: the audio-visual model, fold 1 of its 6.

RAVDESS_EMOTIONS = (3, 4, 5)  # happy, sad, angry (file name codes)
RAVDESS_ACTORS = (1, 5, 9, 13, 17)  # 1 is one of fold 1's test actors


def make_ravdess(root: Path, face: np.ndarray) -> Path:
  k = 0
  for actor in RAVDESS_ACTORS:
    for label, emotion in enumerate(RAVDESS_EMOTIONS):
      for statement, repetition in ((1, 1), (2, 1), (1, 2)):
        name = f'01-01-{emotion:02d}-01-{statement:02d}-{repetition:02d}-{actor:02d}.mp4'
        write_video(root / f'Actor_{actor:02d}' / name, tinted(face, label, k), 'h264', (tone(label, k), RATE))
        k += 1
  return root


def test_ravdess_fold_1_learns_above_chance(tmp_path, face):
  manual = make_ravdess(tmp_path / 'RAVDESS', face)
  from data import ravdess as ravdess_package  # pylint: disable=import-outside-toplevel
  ravdess_package.build(manual, tmp_path / 'datasets', folds=[1])
  assert [ravdess.fold_of_actor(a) for a in RAVDESS_ACTORS] == [1, 2, 3, 4, 5]
  summary = train_in_process(ravdess_config, tmp_path / 'datasets', tmp_path / 'run')
  assert summary['epochs'] == 2 and summary['steps'] == 2 * 36
  assert_above_chance(summary, 8, num_test=9)
  assert labels.class_names('ravdess', 8)[RAVDESS_EMOTIONS[0] - 1] == 'happy'


# ---------------------------------------------------------------------------------------------------------------
# FERV39k: video only (it has no audio), its official split.

FERV39K_CLASSES = ('Happy', 'Sad', 'Angry')
FERV39K_TRAIN_PER_CLASS = 20  # no face detection here: clips are cheap


def make_ferv39k(root: Path, face: np.ndarray) -> Path:
  lists = {'train': [], 'test': []}
  k = 0
  for split, count in (('train', FERV39K_TRAIN_PER_CLASS), ('test', 3)):
    for label, name in enumerate(FERV39K_CLASSES):
      for _ in range(count):
        clip = f'Scene{k % 3}/{name}/{k:04d}'
        folder = root / '2_ClipsforFaceCrop' / clip
        folder.mkdir(parents=True)
        for t, frame in enumerate(tinted(face, label, k)):
          (folder / f'{t + 1:04d}.jpg').write_bytes(cv2.imencode('.jpg', frame[..., ::-1])[1].tobytes())
        lists[split].append(f'{clip} {name}\n')
        k += 1
  setups = root / '4_setups' / 'All_scenes'
  setups.mkdir(parents=True)
  for split, lines in lists.items():
    (setups / f'{split}_All.csv').write_text(''.join(lines))
  return root


def test_ferv39k_video_only_through_launch_learns_above_chance(tmp_path, face):
  """Also the unimodal model's whole run from the command line: --config.model.modalities=video."""
  from data import ferv39k as ferv39k_package  # pylint: disable=import-outside-toplevel
  ferv39k_package.build(make_ferv39k(tmp_path / 'FERV39k', face), tmp_path / 'datasets')
  summary = launch(tmp_path / 'run', 'configs/ferv39k.py',
                   {**demo_sized(7), 'data_dir': tmp_path / 'datasets', 'model.modalities': 'video'})
  assert summary['dataset'] == 'ferv39k' and summary['epochs'] == 2
  assert summary['steps'] == 2 * 3 * FERV39K_TRAIN_PER_CLASS  # batch 1
  assert_above_chance(summary, 7, num_test=9)
  assert summary['trainable_l2'] > 0
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['model']['modalities'] == 'video'
