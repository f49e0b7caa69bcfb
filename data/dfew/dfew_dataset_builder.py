"""The DFEW builder (Jiang et al., ACM MM 2020): 7 classes, 5 folds, 224x224 face clips.

Reads the official download as its archives unpack (see README.md in this folder):

  <manual_dir>/Clip/clip_224x224/clip_224x224_part_<k>/<5-digit id>/*.jpg   face frames (every image file)
  <manual_dir>/Clip/original/part_<k>/<n>.mp4                              original clips (their audio)
  <manual_dir>/Clip/raw_wav/<n>.wav                                        audio, e.g. clip 00001 -> 1.wav
  <manual_dir>/EmoLabel_DataSplit/train(single-labeled)/set_<k>.csv, test(single-labeled)/set_<k>.csv

The 5-digit clip folders are found wherever they lie under `Clip/clip_224x224` (or `clip_224x224`, or part folders
`clip_224x224_part_<k>` directly in `Clip/` or manual_dir): flat, in part folders, or in a doubly unpacked
`clip_224x224/clip_224x224/`. The original clips likewise anywhere under `Clip/original` (or `original`). DFEW
ships no wavs: `raw_wav/` is made by the user (the reference's mp42wav.sh; here `python -m data.extract_audio`); a clip
without a wav gets one extracted from its original clip at build time. The reference never trained DFEW without
audio, so a download with neither wavs nor original clips stops the build with the command that makes them.

The split CSVs have a header; the columns `video_name` (the clip number, with or without leading zeros) and `label`
(1..7 = happy, sad, neutral, angry, surprise, disgust, fear) are used, or the last two columns where those names
are absent. The split folder may also be spelled `train_single-labeled` or `train(single-label)`: any folder of
EmoLabel_DataSplit whose name starts with the split and contains "single". Labels become 0..6 in the same order
(mma_dfer_jax.labels.DFEW_CLASSES).

Alternatively (`annotations_dir`), the reference's lists `DFEW_set_<k>_{train,test}.txt` (`<frames_dir>
<num_frames> <label>`, labels from 0) give the folds; each listed folder is looked up by its name among the clip
folders of manual_dir (or used as listed when it exists on this machine).
"""
import csv
from pathlib import Path
import re
from typing import List, Optional, Tuple

from data import common
from mma_dfer_jax import labels

FRAME_ROOTS = ('Clip/clip_224x224', 'clip_224x224')
PART_GLOB = 'clip_224x224_part_*'  # part archives unpacked straight into Clip/ or manual_dir
WAV_ROOTS = ('Clip/raw_wav', 'raw_wav')
VIDEO_ROOTS = ('Clip/original', 'original')
SPLIT_ROOT = 'EmoLabel_DataSplit'
EXTRACT_HINT = ('make the wavs first: python -m data.extract_audio --src {m}/Clip/original --dst {m}/Clip/raw_wav '
                '(unpack the "original" part archives into Clip/original first)')


def frame_roots(manual_dir: Path) -> List[Path]:
  """Where DFEW's clip folders may lie: the clip_224x224 folders, then part folders unpacked beside them."""
  parts = sorted(p for base in (manual_dir / 'Clip', manual_dir) if base.is_dir() for p in base.glob(PART_GLOB))
  return [manual_dir / p for p in FRAME_ROOTS] + parts


def split_csv(manual_dir: Path, fold: int, split: str) -> Path:
  """EmoLabel_DataSplit/<split>(single-labeled)/set_<fold>.csv, or a variant spelling of the folder."""
  root = common.require_dir([manual_dir / SPLIT_ROOT], 'DFEW split folder')
  folders = sorted(p for p in root.iterdir()
                   if p.is_dir() and p.name.lower().startswith(split) and 'single' in p.name.lower())
  for folder in folders:
    if (folder / f'set_{fold}.csv').is_file():
      return folder / f'set_{fold}.csv'
  raise common.AnnotationError(
      f'{root}: no {split}(single-labeled)/set_{fold}.csv (folders there: '
      f'{", ".join(p.name for p in sorted(root.iterdir())) or "none"})')


def _columns(header: List[str]) -> Optional[Tuple[int, int]]:
  """(video_name column, label column) of a header row, or None when the row is not a header."""
  names = [h.strip().lower() for h in header]
  if all(re.fullmatch(r'\d+', n) for n in names[-2:]):
    return None
  video = names.index('video_name') if 'video_name' in names else len(names) - 2
  label = names.index('label') if 'label' in names else len(names) - 1
  return video, label


def read_split_csv(path: Path) -> List[Tuple[str, int]]:
  """[(5-digit clip id, label 0..6)] of an official split CSV; errors name the file and line."""
  with open(path, newline='', encoding='utf-8-sig') as f:
    rows = list(csv.reader(f))
  if not rows:
    raise common.AnnotationError(f'{path}: empty split file')
  columns = _columns(rows[0])
  body = enumerate(rows[1:], 2) if columns else enumerate(rows, 1)
  video_col, label_col = columns or (len(rows[0]) - 2, len(rows[0]) - 1)
  entries = []
  for number, row in body:
    if not any(cell.strip() for cell in row):
      continue
    where = f'{path}:{number}'
    try:
      video, label = row[video_col].strip(), row[label_col].strip()
    except IndexError:
      raise common.AnnotationError(f'{where}: expected the columns video_name,label; got {row}') from None
    if not re.fullmatch(r'\d+', video) or not re.fullmatch(r'-?\d+', label):
      raise common.AnnotationError(f'{where}: expected a clip number and a label 1..7; got {row}')
    if not 1 <= int(label) <= len(labels.DFEW_CLASSES):
      raise common.AnnotationError(f'{where}: label {label} is outside 1..{len(labels.DFEW_CLASSES)}')
    entries.append((f'{int(video):05d}', int(label) - 1))
  return entries


class Dfew(common.FrameFolderBuilder, skip_registration=True):
  """DFEW in 5 folds: `fold<k>_train`, `fold<k>_test`."""

  name = 'dfew'
  TITLE = 'DFEW'
  CLASS_NAMES = labels.DFEW_CLASSES
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Request DFEW from https://dfew-dataset.github.io/ and unpack it; pass the folder holding Clip/ and '
      'EmoLabel_DataSplit/ as --manual_dir (layout: data/dfew/README.md). Wavs missing from Clip/raw_wav are '
      'extracted from Clip/original.')
  DESCRIPTION = 'DFEW face clips (224x224 frames as JPEG bytes) with the normalised fbank of their audio.'
  HOMEPAGE = 'https://dfew-dataset.github.io/'
  CITATION = ('@inproceedings{jiang2020dfew, title={DFEW: A Large-Scale Database for Recognizing Dynamic Facial '
              'Expressions in the Wild}, author={Jiang, Xingxun and others}, booktitle={ACM MM}, year={2020}}')

  def find_frame_folders(self, manual_dir: Path) -> common.FrameFolders:
    roots = frame_roots(manual_dir)
    clip_folders = common.find_clip_folders(roots)
    if not clip_folders:
      raise common.AnnotationError(
          f'{manual_dir}: no DFEW clip folder (5-digit names like 00001) under Clip/clip_224x224 or clip_224x224; '
          'unpack the clip_224x224_part_<k> archives into Clip/clip_224x224 (layout: data/dfew/README.md)')
    wavs = common.index_files([manual_dir / p for p in WAV_ROOTS], ('.wav',), recursive=True)
    videos = common.index_files([manual_dir / p for p in VIDEO_ROOTS], common.VIDEO_EXTENSIONS, recursive=True)
    if not wavs and not videos:
      raise common.AnnotationError(
          f'{manual_dir}: no DFEW audio: no wav under Clip/raw_wav and no original clip under Clip/original. '
          f'The reference trains DFEW with audio; {EXTRACT_HINT.format(m=manual_dir)}')
    frames_root = next((r for r in roots if r.is_dir()), roots[0])
    return common.FrameFolders(clip_folders, frames_root, wavs, videos)

  def read_split(self, manual_dir: Path, fold: int, split: str) -> List[Tuple[str, int]]:
    return read_split_csv(split_csv(manual_dir, fold, split))

  def media_names(self, clip_id: str) -> List[str]:
    """The names a DFEW clip's files may carry: '00001' -> ['1', '00001']."""
    return [str(int(clip_id)), clip_id] if clip_id.isdigit() else [clip_id]
