"""The CREMA-D builder (Cao et al., IEEE TAC 2014): 91 actors, 7,442 clips, 6 classes, 5 subject-independent folds.

Reads the download as the owners distribute it (github.com/CheyneyComputerScience/CREMA-D; see README.md here):

  <manual_dir>/VideoFlash/1001_DFA_ANG_XX.flv ...     the videos (VideoMP4/ is taken for a clip missing there)
  <manual_dir>/AudioWAV/1001_DFA_ANG_XX.wav ...       the audio (16 kHz); a clip without one gets its video's track

The file name is `<actor>_<sentence>_<emotion>_<intensity>`; the emotion code gives the label: ANG 0 anger,
DIS 1 disgust, FEA 2 fear, HAP 3 happy, NEU 4 neutral, SAD 5 sad (mma_dfer_jax.labels.CREMAD_CLASSES, HiCMAE's
order). The folds are HiCMAE's (its preprocess/creamd_av.py and saved/data/crema-d/audio_visual/split0<k>/):
actors in order of id, 18 a fold, the last fold taking the 19 left over: fold k tests actors 1001+18(k-1) ..
1018+18(k-1) (fold 5: 1073..1091) and trains on the other 72 or 73. The four clips HiCMAE (after the owners'
notes) leaves out as broken are left out and counted.

Frames: every frame of the video, its face cropped by predict's rule (data/faces_from_video.py), cached in
`<data_dir>/downloads/cremad_faces/`. Audio: the clip's wav -> audio.load_fbank at its own rate.
"""
from pathlib import Path
import re
from typing import Dict, List, Tuple

from data import common
from mma_dfer_jax import labels

VIDEO_ROOTS = ('VideoFlash', 'VideoMP4')
WAV_ROOTS = ('AudioWAV',)
EMOTION_CODES = ('ANG', 'DIS', 'FEA', 'HAP', 'NEU', 'SAD')  # in the order of labels.CREMAD_CLASSES
FIRST_ACTOR, LAST_ACTOR = 1001, 1091
ACTORS_PER_FOLD = 18  # HiCMAE: 91 // 5; the last fold also takes the 91st actor
NUM_FOLDS = 5
# Clips HiCMAE's lists leave out (after the owners' notes on damaged files).
BROKEN = {'1076_MTI_NEU_XX': 'left out as broken (HiCMAE, after the CREMA-D owners\' notes)',
          '1076_MTI_SAD_XX': 'left out as broken (HiCMAE, after the CREMA-D owners\' notes)',
          '1064_TIE_SAD_XX': 'left out as broken (HiCMAE, after the CREMA-D owners\' notes)',
          '1064_IEO_DIS_MD': 'left out as broken (HiCMAE, after the CREMA-D owners\' notes)'}
NAME = re.compile(r'(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<intensity>[A-Z]{2})')


def parse_name(path: Path) -> Tuple[int, int]:
  """(actor id, label) of a CREMA-D file name; an error naming the file when it is not one."""
  match = NAME.fullmatch(path.stem)
  if match is None:
    raise common.AnnotationError(f'{path}: not a CREMA-D clip name (<actor>_<sentence>_<emotion>_<intensity>, e.g. '
                                 '1001_DFA_ANG_XX); move other files out of the folder')
  actor, emotion = int(match['actor']), match['emotion']
  if emotion not in EMOTION_CODES:
    raise common.AnnotationError(f'{path}: unknown emotion code {emotion!r} (CREMA-D: {", ".join(EMOTION_CODES)})')
  if not FIRST_ACTOR <= actor <= LAST_ACTOR:
    raise common.AnnotationError(f'{path}: actor {actor} is outside CREMA-D\'s {FIRST_ACTOR}..{LAST_ACTOR}')
  return actor, EMOTION_CODES.index(emotion)


def fold_of_actor(actor: int) -> int:
  """The fold (1..5) whose test split holds this actor (HiCMAE's split)."""
  return min((actor - FIRST_ACTOR) // ACTORS_PER_FOLD, NUM_FOLDS - 1) + 1


def test_actors(fold: int) -> List[int]:
  return [a for a in range(FIRST_ACTOR, LAST_ACTOR + 1) if fold_of_actor(a) == fold]


class Cremad(common.FoldBuilder, skip_registration=True):
  """CREMA-D in HiCMAE's 5 subject-independent folds: `fold<k>_train`, `fold<k>_test`."""

  name = 'cremad'
  TITLE = 'CREMA-D'
  CLASS_NAMES = labels.CREMAD_CLASSES
  FACES_FROM_VIDEO = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Get CREMA-D from https://github.com/CheyneyComputerScience/CREMA-D (git lfs) and pass the folder holding '
      'VideoFlash/ and AudioWAV/ as --manual_dir (layout: data/cremad/README.md).')
  DESCRIPTION = ('CREMA-D audio-visual clips: face crops of every frame (JPEG bytes) with the normalised fbank of '
                 'their audio.')
  HOMEPAGE = 'https://github.com/CheyneyComputerScience/CREMA-D'
  CITATION = ('@article{cao2014crema, title={CREMA-D: Crowd-sourced Emotional Multimodal Actors Dataset}, '
              'author={Cao, Houwei and others}, journal={IEEE Transactions on Affective Computing}, year={2014}}')

  def list_clips(self, manual_dir: Path, fold: int, split: str) -> List[common.Clip]:
    common.require_dir([manual_dir / p for p in VIDEO_ROOTS], 'CREMA-D video folder (VideoFlash/)')
    videos = common.index_files([manual_dir / p for p in VIDEO_ROOTS], common.VIDEO_EXTENSIONS)
    if not videos:
      raise common.AnnotationError(f'{manual_dir}: no CREMA-D video in VideoFlash/ (e.g. 1001_DFA_ANG_XX.flv); '
                                   'fetch the videos (git lfs pull) first')
    wavs = common.index_files([manual_dir / p for p in WAV_ROOTS], ('.wav',))
    return [clip for clip in clips_of(videos, wavs) if (fold_of_actor(actor_of(clip)) == fold) == (split == 'test')]


def actor_of(clip: common.Clip) -> int:
  return int(clip.id.split('_')[0])


def clips_of(videos: Dict[str, Path], wavs: Dict[str, Path]) -> List[common.Clip]:
  clips = []
  for stem, video in sorted(videos.items()):
    _, label = parse_name(video)
    clips.append(common.Clip(stem, label, None, wav=wavs.get(stem), video=video, face_video=video,
                             excluded=BROKEN.get(stem, '')))
  return clips
