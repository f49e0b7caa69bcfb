"""The MAFW builder (Liu et al., ACM MM 2022): 11 single-expression classes, 5 folds.

Reads the official download plus the face frames and wavs made from it (see README.md in this folder):

  <manual_dir>/data/clips/<id>.mp4                                   original clips
  <manual_dir>/clips_faces/<id>/0.jpg, 1.jpg, ...                    face frames (data/mafw_crop_faces.py)
  <manual_dir>/clips_wav/<id>.wav                                    audio (data/extract_audio.py)
  <manual_dir>/Train & Test Set/single/no_caption/set_<k>/train.txt, test.txt

The face folder may also be `data/clips_faces/`; MAFW's own `data/faces/` (the owners' alignment, not crops by the
reference's rule) is taken only when neither exists, with a warning. The wav folder may also be `data/clips_wav/`.
The split files hold one clip a line, `<id>.mp4 <class name>` (e.g. `00025.mp4 anger`); the class names (any
case) become the REFERENCE's labels: happiness 0, sadness 1, neutral 2, anger 3, surprise 4, disgust 5, fear 6,
contempt 7, anxiety 8, helplessness 9, disappointment 10 (mma_dfer_jax.labels.MAFW_CLASSES), not MAFW's own order.
A clip without a wav whose original clip is there gets its wav extracted first; one with neither gets the silent
fbank, as in the reference.

Each record's `num_frames` is the number of frame files minus one (at least 1): the reference's MAFW lists hold
`len(os.listdir(frames_dir)) - 1`, its sampling uses that count, and the released MAFW models were trained and
evaluated that way (the last frame in string order is never taken; test-time centres are spread over N-1).

Alternatively (`annotations_dir`), the reference's lists `MAFW_set_<k>_{train,test}_faces.txt` (or without
`_faces`; `<frames_dir> <num_frames> <label>`, labels from 0) give the folds; each listed folder is looked up by
its name under the face folder of manual_dir (or used as listed when it exists on this machine).
"""
from pathlib import Path
from typing import List, Optional, Tuple

import tensorflow_datasets as tfds

from data import common
from mma_dfer_jax import labels

MAFW_VERSION = '2.0.0'  # the input pipeline refuses older MAFW builds (their labels are in the wrong order)

FRAME_ROOTS = ('clips_faces', 'data/clips_faces')
OWNERS_FACES = 'data/faces'  # MAFW's own aligned faces: a last resort, announced
WAV_ROOTS = ('clips_wav', 'data/clips_wav')
VIDEO_ROOTS = ('data/clips', 'clips')
SPLIT_ROOT = Path('Train & Test Set') / 'single' / 'no_caption'
# Adjective spellings some copies of the split files use, onto the class names.
CLASS_ALIASES = {'happy': 'happiness', 'sad': 'sadness', 'angry': 'anger', 'surprised': 'surprise',
                 'disgusted': 'disgust', 'fearful': 'fear', 'contemptuous': 'contempt', 'anxious': 'anxiety',
                 'helpless': 'helplessness', 'disappointed': 'disappointment'}
CROP_HINT = 'Make the face frames first: python -m data.mafw_crop_faces --src MAFW/data/clips --dst MAFW/clips_faces'


def split_file(manual_dir: Path, fold: int, split: str) -> Path:
  path = manual_dir / SPLIT_ROOT / f'set_{fold}' / f'{split}.txt'
  if not path.is_file():
    raise common.AnnotationError(f'MAFW split file {path} not found (expected the official "Train & Test Set" '
                                 'folder in --manual_dir)')
  return path


def read_split_file(path: Path) -> List[Tuple[str, int]]:
  """[(clip id, label 0..10 in the reference's order)] of an official split file; errors name the file and
  line."""
  index = {name: k for k, name in enumerate(labels.MAFW_CLASSES)}
  index.update({alias: index[name] for alias, name in CLASS_ALIASES.items()})
  entries = common.read_named_labels(path, index, '<id>.mp4 <class name>', 'MAFW', labels.MAFW_CLASSES)
  return [(clip.split('.')[0], label) for clip, label in entries]


class Mafw(common.FrameFolderBuilder, skip_registration=True):
  """MAFW (single-expression set) in 5 folds: `fold<k>_train`, `fold<k>_test`."""

  name = 'mafw'
  TITLE = 'MAFW'
  VERSION = tfds.core.Version(MAFW_VERSION)
  RELEASE_NOTES = {
      '1.0.0': 'Labels in MAFW\'s own class order (wrong for the released models); num_frames = frame files.',
      MAFW_VERSION: 'Labels in the reference\'s order (happiness 0 ... disappointment 10); num_frames = frame '
                    'files - 1, as the reference samples.',
  }
  CLASS_NAMES = labels.MAFW_CLASSES
  FRAME_ROOTS = FRAME_ROOTS
  FRAMES_HINT = CROP_HINT
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Request MAFW from https://mafw-database.github.io/MAFW/ and unpack it; crop the faces '
      '(python -m data.mafw_crop_faces) and extract the wavs (python -m data.extract_audio), then pass the MAFW '
      'folder as --manual_dir (layout: data/mafw/README.md).')
  DESCRIPTION = 'MAFW single-expression face clips (JPEG bytes) with the normalised fbank of their audio.'
  HOMEPAGE = 'https://mafw-database.github.io/MAFW/'
  CITATION = ('@inproceedings{liu2022mafw, title={MAFW: A Large-scale, Multi-modal, Compound Affective Database '
              'for Dynamic Facial Expression Recognition in the Wild}, author={Liu, Yuanyuan and others}, '
              'booktitle={ACM MM}, year={2022}}')

  def find_frame_folders(self, manual_dir: Path) -> common.FrameFolders:
    frames_root = face_folder(manual_dir)
    clip_folders = common.find_clip_folders([frames_root], r'.+', max_depth=1) if frames_root else {}
    wavs = common.index_files([manual_dir / p for p in WAV_ROOTS], ('.wav',))
    videos = common.index_files([manual_dir / p for p in VIDEO_ROOTS], common.VIDEO_EXTENSIONS)
    return common.FrameFolders(clip_folders, frames_root, wavs, videos)

  def read_split(self, manual_dir: Path, fold: int, split: str) -> List[Tuple[str, int]]:
    return read_split_file(split_file(manual_dir, fold, split))

  def sampling_frame_count(self, num_files: int) -> int:
    """The reference's MAFW count: files - 1 (at least 1: its lists hold no clip with fewer than 2 files, and a
    count of 0 has no frame to take)."""
    return max(num_files - 1, 1)


def face_folder(manual_dir: Path) -> Optional[Path]:
  """The folder of face-frame folders: crops made by the reference's rule, or MAFW's own aligned faces with a
  warning."""
  found = common.first_existing([manual_dir / p for p in FRAME_ROOTS])
  if found is None and (manual_dir / OWNERS_FACES).is_dir():
    found = manual_dir / OWNERS_FACES
    common.log.warning('MAFW: using %s, the owners\' aligned faces, not crops by the reference\'s rule (the '
                       'released models were trained on those); for them: %s', found, CROP_HINT)
  return found
