"""Face frames of a raw video by predict's rule, cached on disk: the front end of the CREMA-D and RAVDESS builders.

Every frame of the video (at its own rate) is cropped as `mma_dfer_jax.predict` crops the frames it feeds the model
(faces.py): libfacedetection's faces, their union box per frame, the boxes smoothed over the clip (gaps filled from
the neighbouring frames), squared and clipped to the image, a centre square where no frame of the clip has a face.
Each crop is resized to FACE_SIZE x FACE_SIZE (bilinear, as predict's resize_crop; DFEW's frames are 224 px too)
and saved as JPEG quality 95 (data/mafw_crop_faces.py's), named `00000.jpg, 00001.jpg, ...` so that the string order
the pipeline sorts frames in is the time order.

A clip's folder is written under a temporary name and renamed when complete, with `faces.json` (frame count and
how many frames had a face) in it, so an interrupted build resumes and every build reuses what is there.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from PIL import Image

from mma_dfer_jax import faces
from mma_dfer_jax import video as video_lib

FACE_SIZE = 224
JPEG_QUALITY = 95  # as data/mafw_crop_faces.py (cv2.imwrite's default)
SUMMARY_FILE = 'faces.json'


@dataclasses.dataclass(frozen=True)
class FaceCrops:
  """A clip's cached face frames, or why there are none."""
  folder: Optional[Path]
  frames: int = 0
  frames_with_face: int = 0
  problem: str = ''


def cache_name(clip_id: str) -> str:
  """A file-system name for a clip id (FERV39k-like ids hold slashes): the id itself when safe, else a readable
  form with a short hash (two ids never share one)."""
  if re.fullmatch(r'[A-Za-z0-9._-]+', clip_id) and not clip_id.startswith('.'):
    return clip_id
  readable = re.sub(r'[^A-Za-z0-9._-]+', '_', clip_id).strip('._')[:80]
  return f'{readable}_{hashlib.sha1(clip_id.encode()).hexdigest()[:8]}'


def frame_name(index: int) -> str:
  return f'{index:05d}.jpg'


def detect_boxes(video_path) -> List[Optional[faces.Box]]:
  """Each frame's face union box (None where none was found), in presentation order."""
  return [faces.union_box(faces.detect_faces(frame)) for frame in video_lib.iter_frames(video_path)]


def write_face_crops(video_path, out_dir, size: int = FACE_SIZE) -> FaceCrops:
  """Crops every frame of video_path into out_dir (two passes: the boxes, smoothed over the clip, then the crops,
  so that only one frame is held at a time)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  found = detect_boxes(video_path)
  boxes = faces.smooth_boxes(found)
  count = 0
  for k, frame in enumerate(video_lib.iter_frames(video_path)):
    box = boxes[k] if k < len(boxes) else boxes[-1] if boxes else None  # a decoder giving one frame more
    crop = faces.resize_crop(faces.crop_box(frame, box), size)
    Image.fromarray(crop).save(out_dir / frame_name(k), quality=JPEG_QUALITY)
    count += 1
  result = FaceCrops(out_dir, count, sum(b is not None for b in found))
  (out_dir / SUMMARY_FILE).write_text(json.dumps({'frames': result.frames,
                                                  'frames_with_face': result.frames_with_face}))
  return result


def read_summary(folder: Path) -> Optional[FaceCrops]:
  try:
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    return FaceCrops(folder, int(summary['frames']), int(summary['frames_with_face']))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def cached_face_crops(video_path, folder) -> FaceCrops:
  """The face frames of video_path in folder, made when the folder is not complete; `problem` says why a video
  gave none (missing, undecodable, no frames)."""
  folder = Path(folder)
  done = read_summary(folder) if folder.is_dir() else None
  if done is not None and done.frames > 0:
    return done
  tmp_dir = folder.with_name(f'.{folder.name}.{os.getpid()}.tmp')
  try:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir)
    crops = write_face_crops(video_path, tmp_dir)
    if crops.frames == 0:
      return FaceCrops(None, problem=f'{video_path}: no frames decoded')
    if folder.exists():  # an incomplete folder of an older run
      shutil.rmtree(folder)
    os.replace(tmp_dir, folder)
    return dataclasses.replace(crops, folder=folder)
  except video_lib.VideoError as e:
    return FaceCrops(None, problem=str(e))
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)
