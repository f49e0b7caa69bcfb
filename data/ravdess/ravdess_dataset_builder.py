"""The RAVDESS builder (Livingstone & Russo, PLoS ONE 2018): audio-visual speech, 24 actors, 1,440 clips, 8 classes,
6 subject-independent folds of 4 actors.

Reads the Video_Speech_Actor_XX.zip archives as they unpack (see README.md here):

  <manual_dir>/Actor_01/01-01-06-01-02-01-01.mp4 ...   (also found one folder deeper, e.g. Video_Speech_Actor_01/)

The file name has 7 fields, modality-channel-emotion-intensity-statement-repetition-actor. Taken: modality 01
(audio-video) and vocal channel 01 (speech); the video-only (02) copies and song files (channel 02) are skipped. The
emotion field 01..08 gives the label 0..7: neutral, calm, happy, sad, angry, fearful, disgust, surprised
(mma_dfer_jax.labels.RAVDESS_CLASSES). The folds are HiCMAE's and MAE-DFER's (saved/data/ravdess/split0<k>/): fold k
tests actors 4k-3 .. 4k and trains on the other 20.

Frames: every frame of the video, its face cropped by predict's rule (data/faces_from_video.py), cached in
`<data_dir>/downloads/ravdess_faces/`. Audio: the video's own track, extracted once into
`<data_dir>/downloads/ravdess_wav/` (video.extract_wav) -> audio.load_fbank at its own rate (48 kHz).
"""
from pathlib import Path
import re
from typing import Dict, List

from data import common
from mma_dfer_jax import labels

NUM_FOLDS = 6
ACTORS_PER_FOLD = 4
NUM_ACTORS = 24
AUDIO_VIDEO, SPEECH = 1, 1
NAME = re.compile(r'(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)')
MAX_DEPTH = 3  # Actor_XX/ folders directly in manual_dir or up to two folders below it


def parse_name(path: Path):
  """(modality, vocal channel, label 0..7, actor) of a RAVDESS file name, or None for a name of another form."""
  match = NAME.fullmatch(path.stem)
  if match is None:
    return None
  modality, channel, emotion, _, _, _, actor = (int(f) for f in match.groups())
  where = f'{path}: emotion field {emotion:02d}'
  if not 1 <= emotion <= len(labels.RAVDESS_CLASSES):
    raise common.AnnotationError(f'{where} is outside 01..{len(labels.RAVDESS_CLASSES):02d}')
  if not 1 <= actor <= NUM_ACTORS:
    raise common.AnnotationError(f'{path}: actor {actor:02d} is outside RAVDESS\'s 01..{NUM_ACTORS}')
  return modality, channel, emotion - 1, actor


def fold_of_actor(actor: int) -> int:
  """The fold (1..6) whose test split holds this actor: 1-4 -> 1, 5-8 -> 2, ..., 21-24 -> 6."""
  return (actor - 1) // ACTORS_PER_FOLD + 1


def test_actors(fold: int) -> List[int]:
  return list(range(ACTORS_PER_FOLD * (fold - 1) + 1, ACTORS_PER_FOLD * fold + 1))


def find_videos(manual_dir: Path) -> Dict[str, Path]:
  """{stem: path} of the audio-video speech mp4s under manual_dir (up to MAX_DEPTH folders down); one name twice
  is an error naming both."""
  found = {}
  level = [manual_dir]
  for _ in range(MAX_DEPTH + 1):
    below = []
    for folder in level:
      for entry in sorted(folder.iterdir()):
        if entry.name.startswith('.'):
          continue
        if entry.is_dir():
          below.append(entry)
          continue
        if entry.suffix.lower() not in common.VIDEO_EXTENSIONS:
          continue
        fields = parse_name(entry)
        if fields is None or fields[:2] != (AUDIO_VIDEO, SPEECH):
          continue
        if entry.stem in found:
          raise common.AnnotationError(f'{found[entry.stem]} and {entry} have the same name: keep one of them')
        found[entry.stem] = entry
    level = below
  return found


class Ravdess(common.FoldBuilder, skip_registration=True):
  """RAVDESS audio-visual speech in 6 subject-independent folds: `fold<k>_train`, `fold<k>_test`."""

  name = 'ravdess'
  TITLE = 'RAVDESS'
  NUM_FOLDS = NUM_FOLDS
  CLASS_NAMES = labels.RAVDESS_CLASSES
  FACES_FROM_VIDEO = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download the Video_Speech_Actor_01..24 archives of RAVDESS from https://zenodo.org/record/1188976, unpack '
      'them into one folder (Actor_01/ ... Actor_24/) and pass it as --manual_dir (layout: data/ravdess/README.md).')
  DESCRIPTION = ('RAVDESS audio-visual speech: face crops of every frame (JPEG bytes) with the normalised fbank of '
                 'the video\'s audio track.')
  HOMEPAGE = 'https://zenodo.org/record/1188976'
  CITATION = ('@article{livingstone2018ravdess, title={The Ryerson Audio-Visual Database of Emotional Speech and '
              'Song (RAVDESS)}, author={Livingstone, Steven R. and Russo, Frank A.}, journal={PLoS ONE}, year={2018}}')

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._videos = None

  def list_clips(self, manual_dir: Path, fold: int, split: str) -> List[common.Clip]:
    if self._videos is None:
      self._videos = find_videos(manual_dir)
    if not self._videos:
      raise common.AnnotationError(
          f'{manual_dir}: no RAVDESS audio-video speech clip (01-01-<emotion>-...-<actor>.mp4) in Actor_XX/ folders; '
          'unpack the Video_Speech_Actor_XX.zip archives there')
    clips = []
    for stem, video in sorted(self._videos.items()):
      _, _, label, actor = parse_name(video)
      if (fold_of_actor(actor) == fold) == (split == 'test'):
        clips.append(common.Clip(stem, label, None, video=video, face_video=video))
    return clips

