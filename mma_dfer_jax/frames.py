"""Frames of a clip as the reference feeds them: which 16 to take, how to decode them, how to augment them.

- `frame_indices`: the reference's segment sampling (random frame per segment in training, segment centres at
  test time, the last frame repeated for short clips).
- `sort_frame_names`: frame files in string order, as the reference's `glob` + `sort` lists them.
- `decode_frame`: JPEG/PNG bytes -> RGB uint8, pixel for pixel what PIL's `Image.open(...).convert('RGB')` gives
  (JPEGs through OpenCV's libjpeg-turbo, which decodes them identically and faster; other images through PIL).
- `sample_augmentation` / `apply_augmentation`: the reference's training transforms (brightness jitter, random
  sized crop, horizontal flip), drawn once per clip and applied to every frame alike; `resize_frames`: the test-time
  resize. Resizing is PIL's bilinear filter (antialiased when shrinking), so the pixels equal the reference's.

Randomness comes from a `np.random.Generator`: the reference draws from Python's `random` module, so the same
seed does not give the reference's draws, only the same distributions, in the same order of draws.

This is a leaf module: it imports nothing from this package.
"""
import dataclasses
import io
import math
from typing import Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
NUM_SEGMENTS = 16

# Training augmentation of the reference (ColorJitter(brightness=0.5), GroupRandomSizedCrop, flip p=0.5).
BRIGHTNESS_RANGE = (0.5, 1.5)
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5

cv2.setNumThreads(1)  # one frame is too small to split; the input pipeline parallelises over clips


class FrameDecodeError(ValueError):
  """Bytes that are not a complete, decodable image."""


# ---------------------------------------------------------------------------------------------------------------
# Which frames


def _edge_padded(num_frames: int, num_segments: int) -> np.ndarray:
  """0..num_frames-1, then the last index repeated up to num_segments."""
  return np.minimum(np.arange(num_segments), num_frames - 1)


def frame_indices(num_frames: int, train: bool, rng: Optional[np.random.Generator] = None,
                  num_segments: int = NUM_SEGMENTS) -> np.ndarray:
  """Indices (num_segments,) int64 of the frames the reference takes from a clip of num_frames frames.

  Train: the clip is cut into num_segments equal segments of num_frames // num_segments frames (the remainder at
  the end is never used) and one frame is drawn uniformly from each. Test: the frame at each segment's centre,
  segments of num_frames / num_segments frames. Clips too short for that (fewer frames than segments in
  training, at most num_segments at test time) give 0, 1, ..., num_frames - 1 and then the last frame repeated.
  """
  num_frames = int(num_frames)
  if num_frames < 1:
    raise ValueError(f'a clip needs at least one frame, got num_frames={num_frames}; check the annotation list '
                     'or the frames folder')
  if num_segments < 1:
    raise ValueError(f'num_segments must be at least 1, got {num_segments}')
  if train:
    segment_length = num_frames // num_segments
    if segment_length == 0:
      return _edge_padded(num_frames, num_segments)
    rng = np.random.default_rng() if rng is None else rng
    offsets = rng.integers(segment_length, size=num_segments)
    return np.arange(num_segments) * segment_length + offsets
  if num_frames <= num_segments:
    return _edge_padded(num_frames, num_segments)
  tick = num_frames / float(num_segments)
  return np.array([int(tick / 2.0 + tick * k) for k in range(num_segments)], dtype=np.int64)


def sort_frame_names(names: Iterable[str]) -> List[str]:
  """The image files among names (.jpg/.jpeg/.png, any case), in plain string order ('10.jpg' < '2.jpg').

  That is the order the reference trained with, so frame k of a clip is the k-th name of this list.
  """
  return sorted(name for name in names if str(name).lower().endswith(IMAGE_SUFFIXES))


# ---------------------------------------------------------------------------------------------------------------
# Decoding

_JPEG_START_OF_FRAME = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn (not DHT, JPG, DAC)


def _jpeg_components(data: bytes) -> Optional[int]:
  """Colour components of a complete JPEG (1 grey, 3 colour, 4 CMYK), or None when it does not look like one.

  A header walk written out because PIL's header parse costs 40% of the time of decoding a 224x224 frame.
  "Complete" means the stream ends with the end-of-image marker: libjpeg pads truncated data with grey, which
  PIL refuses and the reference would have crashed on, so those go through PIL.
  """
  if len(data) < 4 or data[:2] != b'\xff\xd8' or data.rstrip(b'\x00')[-2:] != b'\xff\xd9':
    return None
  position = 2
  while position + 4 <= len(data):
    if data[position] != 0xFF:
      return None
    marker = data[position + 1]
    if marker == 0xFF:  # fill byte
      position += 1
      continue
    length = int.from_bytes(data[position + 2:position + 4], 'big')
    if marker in _JPEG_START_OF_FRAME:
      return data[position + 9] if position + 9 < len(data) else None
    if marker == 0xDA:  # start of scan before any frame header: malformed
      return None
    position += 2 + length
  return None


def decode_frame(data: bytes) -> np.ndarray:
  """RGB uint8 (H, W, 3) of an encoded image, equal to PIL's `Image.open(...).convert('RGB')`.

  Grey, CMYK, palette and RGBA images become RGB as PIL converts them (alpha dropped). EXIF orientation is
  ignored, as PIL and the reference ignore it. Raises FrameDecodeError when the bytes are not a complete image.
  """
  data = bytes(data)
  if _jpeg_components(data) in (1, 3):
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is not None:
      return image
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert('RGB'))
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise FrameDecodeError(f'cannot decode a frame of {len(data)} bytes ({e}); is the frame file a complete '
                           'JPEG or PNG?') from e


def decode_frames(encoded: Sequence[bytes]) -> np.ndarray:
  """(T, H, W, 3) uint8 of T encoded frames, which must all have the same size."""
  frames = [decode_frame(data) for data in encoded]
  sizes = {frame.shape for frame in frames}
  if len(sizes) > 1:
    raise FrameDecodeError(f'the frames of one clip differ in size: {sorted(sizes)}; re-extract the clip')
  return np.stack(frames)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One clip's training augmentation, the same for all of its frames.

  brightness: the factor of PIL's ImageEnhance.Brightness (a blend with black, then truncated to uint8).
  crop: (x, y, width, height) of the random sized crop in the original frame, or None when all attempts failed
    and the fallback applies: the frame is resized so that its shorter side is img_size, then an img_size square
    is cut at fallback_position (fractions in [0, 1) of the free room, resolved once img_size is known).
  flip: mirror left-right (after the resize, as the reference does).
  """
  brightness: float
  crop: Optional[Tuple[int, int, int, int]]
  flip: bool
  fallback_position: Tuple[float, float] = (0.0, 0.0)

  @property
  def is_fallback(self) -> bool:
    return self.crop is None


def _random_sized_crop(rng: np.random.Generator, height: int, width: int) -> Optional[Tuple[int, int, int, int]]:
  """The reference's GroupRandomSizedCrop box (x, y, w, h), or None when 10 attempts all fall outside the frame."""
  area = height * width
  for _ in range(CROP_ATTEMPTS):
    target_area = rng.uniform(*CROP_AREA_RANGE) * area
    aspect = rng.uniform(*CROP_ASPECT_RANGE)
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if rng.random() < 0.5:
      crop_w, crop_h = crop_h, crop_w
    if crop_w <= width and crop_h <= height:
      x = int(rng.integers(0, width - crop_w + 1))
      y = int(rng.integers(0, height - crop_h + 1))
      return x, y, crop_w, crop_h
  return None


def sample_augmentation(rng: np.random.Generator, height: int, width: int) -> AugmentParams:
  """Draws one clip's augmentation for frames of height x width, in the reference's order of draws.

  Brightness first (ColorJitter), then the crop (up to 10 tries of area U(0.08, 1) of the frame, aspect
  U(3/4, 4/3), width and height swapped with p=0.5, a uniform position), then the flip (p=0.5).
  """
  if height < 1 or width < 1:
    raise ValueError(f'frames must be at least 1x1, got height={height} width={width}')
  brightness = float(rng.uniform(*BRIGHTNESS_RANGE))
  crop = _random_sized_crop(rng, height, width)
  # The reference draws the fallback's position per frame (its GroupRandomCrop loops over frames), so its crop
  # jitters from frame to frame; one position per clip is used here. It only matters for non-square frames (a
  # square frame leaves no room): 10 failed tries happen to ~4e-9 of square clips and ~5e-4 of 16:9 ones.
  fallback_position = (float(rng.random()), float(rng.random())) if crop is None else (0.0, 0.0)
  flip = bool(rng.random() < FLIP_PROBABILITY)
  return AugmentParams(brightness=brightness, crop=crop, flip=flip, fallback_position=fallback_position)


def brightness_table(factor: float) -> np.ndarray:
  """uint8 lookup table of PIL's ImageEnhance.Brightness(factor): float32 product with the pixel, clipped,
  truncated toward zero (Pillow's ImagingBlend with a black image)."""
  values = np.float32(factor) * np.arange(256, dtype=np.float32)
  return np.clip(values, 0, 255).astype(np.uint8)


def _pil_resize(frame: np.ndarray, width: int, height: int) -> np.ndarray:
  """PIL bilinear resize of one (H, W, 3) uint8 frame, the reference's resampling (antialiased when shrinking).

  Kept on PIL rather than cv2.INTER_LINEAR: cv2 neither antialiases when shrinking nor rounds like PIL.
  """
  if frame.shape[0] == height and frame.shape[1] == width:
    return frame
  image = Image.fromarray(np.ascontiguousarray(frame))
  return np.asarray(image.resize((width, height), Image.BILINEAR))


def _check_frames(frames: np.ndarray) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f'frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}')
  return frames


def _shorter_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
  """(height, width) after torchvision's Resize(size): shorter side to size, longer side scaled and truncated."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def apply_augmentation(frames: np.ndarray, params: AugmentParams, img_size: int) -> np.ndarray:
  """(T, img_size, img_size, 3) uint8: params applied to every frame of a (T, H, W, 3) uint8 clip.

  The reference's order is brightness, crop + resize, flip. Brightness is per pixel, so it is applied to the crop
  only (identical result, less work).
  """
  frames = _check_frames(frames)
  table = brightness_table(params.brightness)
  if params.crop is not None:
    x, y, crop_w, crop_h = params.crop
    if x < 0 or y < 0 or x + crop_w > frames.shape[2] or y + crop_h > frames.shape[1]:
      raise ValueError(f'crop {params.crop} does not fit frames of {frames.shape[1:3]}; the params were drawn '
                       'for another frame size')
    out = [_pil_resize(table[frame[y:y + crop_h, x:x + crop_w]], img_size, img_size) for frame in frames]
  else:
    height, width = _shorter_side_size(frames.shape[1], frames.shape[2], img_size)
    x = int(params.fallback_position[0] * (width - img_size + 1))
    y = int(params.fallback_position[1] * (height - img_size + 1))
    out = [_pil_resize(table[frame], width, height)[y:y + img_size, x:x + img_size] for frame in frames]
  out = np.stack(out)
  if params.flip:
    out = out[:, :, ::-1]
  return np.ascontiguousarray(out)


def resize_frames(frames: np.ndarray, img_size: int) -> np.ndarray:
  """Test-time transform: every frame resized to img_size x img_size, PIL bilinear (no crop, aspect not kept)."""
  frames = _check_frames(frames)
  return np.stack([_pil_resize(frame, img_size, img_size) for frame in frames])
