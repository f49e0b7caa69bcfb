"""The FERV39k builder (Wang et al., CVPR 2022): 38,935 face clips, 7 classes, the official train/test split, no
audio.

Reads the download as its owners distribute it (the layout MAE-DFER's preprocess/ferv39k.py reads; README.md here):

  <manual_dir>/2_ClipsforFaceCrop/<scene>/<class>/<clip>/*.jpg     face frames, e.g. Crime/Angry/0063/
  <manual_dir>/4_setups/All_scenes/train_All.csv, test_All.csv       `<scene>/<class>/<clip> <class name>` a line

The lists have no header and one space between the clip's folder (relative to 2_ClipsforFaceCrop) and its class
name: Happy 0, Sad 1, Neutral 2, Angry 3, Surprise 4, Disgust 5, Fear 6 (any case; DFEW's classes, in MAE-DFER's
and DFER-CLIP's order, mma_dfer_jax.labels.FERV39K_CLASSES). The folders may also lie directly in manual_dir
(`ClipsforFaceCrop/`, or the scene folders themselves) and the lists in `All_scenes/` or manual_dir.

The official split is the one protocol: it is built as fold 1 (`fold1_train`, 31,088 clips; `fold1_test`, 7,847),
so config.fold=1. Frames are stored as the files are (string order, as the owners number them); FERV39k has no
audio, so every record holds the silent fbank with has_audio False (not counted as missing audio).
"""
from pathlib import Path
from typing import List, Optional, Tuple

from data import common
from mma_dfer_jax import labels

FRAME_ROOTS = ('2_ClipsforFaceCrop', 'ClipsforFaceCrop', '.')
LIST_DIRS = ('4_setups/All_scenes', 'All_scenes', '.')
LIST_NAMES = {'train': 'train_All.csv', 'test': 'test_All.csv'}
# The owners' class names (capitalised) onto the label order.
CLASS_INDEX = {'happy': 0, 'sad': 1, 'neutral': 2, 'angry': 3, 'surprise': 4, 'disgust': 5, 'fear': 6}


def list_file(manual_dir: Path, split: str) -> Path:
  candidates = [manual_dir / d / LIST_NAMES[split] for d in LIST_DIRS]
  found = common.first_existing(candidates)
  if found is None:
    tried = ', '.join(str(p) for p in candidates)
    raise common.AnnotationError(f'FERV39k {split} list not found; looked for: {tried} (the owners\' '
                                 '4_setups/All_scenes/ folder)')
  return found


def read_list(path: Path) -> List[Tuple[str, int]]:
  """[(clip folder relative to the frame root, label)] of an official list; errors name the file and line."""
  entries = common.read_named_labels(path, CLASS_INDEX, '<scene>/<class>/<clip> <class name>', 'FERV39k',
                                     [n.capitalize() for n in CLASS_INDEX])
  return [(clip.strip('/\\'), label) for clip, label in entries]


def frame_root(manual_dir: Path, first_listed: Optional[str]) -> Path:
  """The folder the lists' paths are relative to: the first candidate holding the first listed clip."""
  roots = [manual_dir / r for r in FRAME_ROOTS]
  if first_listed is not None:
    for root in roots:
      if (root / first_listed).is_dir():
        return root
  return next((r for r in roots if r.is_dir() and r != manual_dir), manual_dir)


class Ferv39k(common.FoldBuilder, skip_registration=True):
  """FERV39k's official split as fold 1: `fold1_train`, `fold1_test`."""

  name = 'ferv39k'
  TITLE = 'FERV39k'
  NUM_FOLDS = 1
  FOLDS_DESCRIPTION = 'the official train/test split (4_setups/All_scenes)'
  CLASS_NAMES = labels.FERV39K_CLASSES
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Request FERV39k from its owners (https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html), unpack it and pass '
      'the folder holding 2_ClipsforFaceCrop/ and 4_setups/ as --manual_dir (layout: data/ferv39k/README.md).')
  DESCRIPTION = 'FERV39k face clips (frames as JPEG bytes as distributed); no audio (the silent fbank).'
  HOMEPAGE = 'https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html'
  CITATION = ('@inproceedings{wang2022ferv39k, title={FERV39k: A Large-Scale Multi-Scene Dataset for Facial '
              'Expression Recognition in Videos}, author={Wang, Yan and others}, booktitle={CVPR}, year={2022}}')

  def list_clips(self, manual_dir: Path, fold: int, split: str) -> List[common.Clip]:
    entries = read_list(list_file(manual_dir, split))
    root = frame_root(manual_dir, entries[0][0] if entries else None)
    return [common.Clip(listed, label, root / listed, audio=False) for listed, label in entries]
