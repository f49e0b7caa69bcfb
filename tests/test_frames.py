"""Frame sampling, ordering, decoding and augmentation against the reference's rules (and PIL, which it used)."""
import io
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from mma_dfer_jax import frames

# ---------------------------------------------------------------------------------------------------------------
# Indices


def _reference_test_indices(num_frames, num_segments=16):
  # Transcribed from the reference's _get_test_indices with duration 1.
  if num_frames > num_segments:
    tick = num_frames / float(num_segments)
    return [int(tick / 2.0 + tick * x) for x in range(num_segments)]
  return list(range(num_frames)) + [num_frames - 1] * (num_segments - num_frames)


@pytest.mark.parametrize('num_segments', [16, 8])
def test_test_indices_equal_the_reference_rule(num_segments):
  for num_frames in range(1, 201):
    indices = frames.frame_indices(num_frames, train=False, num_segments=num_segments)
    assert indices.shape == (num_segments,)
    assert np.issubdtype(indices.dtype, np.integer)
    assert indices.tolist() == _reference_test_indices(num_frames, num_segments), num_frames


def test_test_indices_known_values():
  assert frames.frame_indices(32, train=False).tolist() == list(range(1, 32, 2))
  assert frames.frame_indices(16, train=False).tolist() == list(range(16))
  assert frames.frame_indices(17, train=False).tolist() == list(range(8)) + list(range(9, 17))


def test_train_indices_fall_in_their_segments():
  for seed in range(5):
    rng = np.random.default_rng(seed)
    for num_frames in range(16, 301):
      indices = frames.frame_indices(num_frames, train=True, rng=rng)
      length = num_frames // 16
      assert indices.shape == (16,)
      assert np.all(indices >= np.arange(16) * length), num_frames
      assert np.all(indices < (np.arange(16) + 1) * length), num_frames


def test_train_indices_cover_each_segment_uniformly():
  rng = np.random.default_rng(0)
  draws = np.stack([frames.frame_indices(64, train=True, rng=rng) for _ in range(2000)])
  offsets = draws - np.arange(16) * 4
  counts = np.bincount(offsets.ravel(), minlength=4)
  assert counts.shape == (4,)
  assert np.all(np.abs(counts / counts.sum() - 0.25) < 0.02)
  # segments are drawn independently: offsets of neighbouring segments are not all equal
  assert np.mean(offsets[:, 0] == offsets[:, 1]) < 0.4


def test_short_clips_repeat_the_last_frame():
  for train in (True, False):
    for num_frames in range(1, 16):
      indices = frames.frame_indices(num_frames, train=train, rng=np.random.default_rng(0))
      assert indices.tolist() == list(range(num_frames)) + [num_frames - 1] * (16 - num_frames)
  assert frames.frame_indices(16, train=True).tolist() == list(range(16))


def test_train_indices_are_deterministic_for_a_seed_and_work_without_rng():
  a = frames.frame_indices(200, True, np.random.default_rng(3))
  b = frames.frame_indices(200, True, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  assert frames.frame_indices(200, True).shape == (16,)


@pytest.mark.parametrize('num_frames', [0, -3])
def test_no_frames_is_an_error(num_frames):
  with pytest.raises(ValueError, match='num_frames'):
    frames.frame_indices(num_frames, train=False)


def test_frame_names_sort_as_strings():
  names = ['10.jpg', '2.jpg', '1.jpg', 'notes.txt', '3.PNG', '0.jpeg', 'Thumbs.db']
  assert frames.sort_frame_names(names) == ['0.jpeg', '1.jpg', '10.jpg', '2.jpg', '3.PNG']
  assert frames.sort_frame_names([f'{i}.jpg' for i in range(12)])[:4] == ['0.jpg', '1.jpg', '10.jpg', '11.jpg']


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def _face_like(height=96, width=128, seed=0):
  """A smooth colour image (JPEG-friendly) with some texture."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([128 + 100 * np.sin(x / 9.0 + seed), 128 + 100 * np.cos(y / 7.0),
                    (x + y) * 255.0 / (height + width)], axis=-1)
  return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def _encode(image, fmt='JPEG', **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _pil_decode(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


@pytest.mark.parametrize('mode', ['RGB', 'L', 'CMYK'])
def test_jpeg_decodes_as_pil_does(mode):
  data = _encode(Image.fromarray(_face_like()).convert(mode), quality=90)
  decoded = frames.decode_frame(data)
  assert decoded.shape == (96, 128, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, _pil_decode(data))


def test_progressive_jpeg_and_png_modes_decode_as_pil_does():
  image = Image.fromarray(_face_like())
  cases = [_encode(image, progressive=True), _encode(image.convert('RGBA'), 'PNG'),
           _encode(image.convert('P'), 'PNG'), _encode(image.convert('L'), 'PNG')]
  for data in cases:
    np.testing.assert_array_equal(frames.decode_frame(data), _pil_decode(data))


def test_exif_orientation_is_ignored_like_pil():
  image = Image.fromarray(_face_like(60, 100))
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  data = _encode(image, exif=exif.tobytes())
  decoded = frames.decode_frame(data)
  assert decoded.shape == (60, 100, 3)
  np.testing.assert_array_equal(decoded, _pil_decode(data))


def test_undecodable_frames_raise():
  good = _encode(Image.fromarray(_face_like()))
  for bad in (b'', b'not an image at all', good[:len(good) // 2], good[:-2], b'\xff\xd8' + bytes(100)):
    with pytest.raises(frames.FrameDecodeError):
      frames.decode_frame(bad)
  assert issubclass(frames.FrameDecodeError, ValueError)


def test_decode_frames_stacks_and_checks_sizes():
  clip = [_encode(Image.fromarray(_face_like(seed=s))) for s in range(3)]
  assert frames.decode_frames(clip).shape == (3, 96, 128, 3)
  with pytest.raises(frames.FrameDecodeError, match='differ in size'):
    frames.decode_frames(clip + [_encode(Image.fromarray(_face_like(50, 50)))])


# ---------------------------------------------------------------------------------------------------------------
# Augmentation


def _reference_augment(clip, params, img_size):
  """The reference's train transforms on PIL images, with our params: brightness, crop+resize, flip."""
  out = []
  for frame in clip:
    image = ImageEnhance.Brightness(Image.fromarray(frame)).enhance(params.brightness)
    if params.crop is not None:
      x, y, w, h = params.crop
      image = image.crop((x, y, x + w, y + h)).resize((img_size, img_size), Image.BILINEAR)
    if params.flip:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    out.append(np.asarray(image))
  return np.stack(out)


@pytest.mark.parametrize('height,width', [(224, 224), (180, 320), (400, 300)])
def test_crop_boxes_respect_area_and_aspect(height, width):
  rng = np.random.default_rng(0)
  boxes = [frames.sample_augmentation(rng, height, width).crop for _ in range(3000)]
  # 10 failed tries in a row: about 4e-9 of square clips, 5e-4 of 16:9 ones
  assert sum(box is None for box in boxes) <= 5
  boxes = np.array([box for box in boxes if box is not None], dtype=np.float64)
  x, y, w, h = boxes.T
  assert np.all(x >= 0) and np.all(y >= 0) and np.all(x + w <= width) and np.all(y + h <= height)
  area = w * h / (height * width)
  rounding = 2.0 / min(w.min(), h.min())  # w and h are rounded to whole pixels
  assert area.min() >= 0.08 * (1 - rounding) and area.max() <= 1.0
  assert area.min() < 0.09 and area.max() > 0.5
  aspect = np.maximum(w / h, h / w)
  assert aspect.max() <= 4 / 3 * (1 + rounding) and aspect.max() > 1.3
  assert np.mean(w > h) > 0.3 and np.mean(h > w) > 0.3  # both orientations (the swap)
  # positions are uniform over the free room: crops touch both edges sometimes
  assert np.any(x == 0) and np.any(x + w == width) and np.any(y == 0) and np.any(y + h == height)


def test_brightness_and_flip_distributions():
  rng = np.random.default_rng(1)
  params = [frames.sample_augmentation(rng, 224, 224) for _ in range(4000)]
  brightness = np.array([p.brightness for p in params])
  assert brightness.min() >= 0.5 and brightness.max() < 1.5
  assert abs(brightness.mean() - 1.0) < 0.02 and brightness.min() < 0.51 and brightness.max() > 1.49
  flips = np.mean([p.flip for p in params])
  assert 0.47 < flips < 0.53


def test_brightness_table_is_pil_image_enhance():
  ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
  image = Image.fromarray(ramp)
  for factor in list(np.random.default_rng(0).uniform(0.5, 1.5, 300)) + [0.5, 1.0, 1.4999]:
    expected = np.asarray(ImageEnhance.Brightness(image).enhance(factor))[0, :, 0]
    np.testing.assert_array_equal(frames.brightness_table(factor), expected)


@pytest.mark.parametrize('height,width,img_size', [(224, 224, 224), (180, 320, 224), (300, 260, 112)])
def test_augmentation_equals_the_reference_transforms_pixel_for_pixel(height, width, img_size):
  clip = np.stack([_face_like(height, width, seed=s) for s in range(3)])
  rng = np.random.default_rng(height)
  for _ in range(6):
    params = frames.sample_augmentation(rng, height, width)
    out = frames.apply_augmentation(clip, params, img_size)
    assert out.shape == (3, img_size, img_size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _reference_augment(clip, params, img_size))


def test_every_frame_gets_the_same_augmentation():
  clip = np.stack([_face_like(120, 160, seed=s) for s in range(4)])
  params = frames.sample_augmentation(np.random.default_rng(7), 120, 160)
  together = frames.apply_augmentation(clip, params, 64)
  one_by_one = np.concatenate([frames.apply_augmentation(clip[t:t + 1], params, 64) for t in range(4)])
  np.testing.assert_array_equal(together, one_by_one)
  # identical input frames stay identical
  same = frames.apply_augmentation(np.repeat(clip[:1], 3, axis=0), params, 64)
  assert all(np.array_equal(same[0], frame) for frame in same)


def test_flip_mirrors_the_output():
  clip = _face_like(100, 100)[None]
  params = frames.AugmentParams(brightness=1.0, crop=(10, 20, 60, 70), flip=False)
  plain = frames.apply_augmentation(clip, params, 50)
  flipped = frames.apply_augmentation(clip, frames.AugmentParams(1.0, (10, 20, 60, 70), True), 50)
  np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_same_seed_same_augmentation():
  clip = np.stack([_face_like(150, 200, seed=s) for s in range(2)])
  runs = []
  for _ in range(2):
    rng = np.random.default_rng(42)
    params = frames.sample_augmentation(rng, 150, 200)
    runs.append((params, frames.apply_augmentation(clip, params, 96)))
  assert runs[0][0] == runs[1][0]
  np.testing.assert_array_equal(runs[0][1], runs[1][1])


class _AlwaysHigh:
  """A stand-in generator that makes every crop attempt too large: area 1, aspect 4/3, no swap."""

  def uniform(self, low, high):
    return high

  def random(self):
    return 0.9

  def integers(self, low, high=None):
    raise AssertionError('no crop position is drawn when every attempt fails')


def test_fallback_scales_the_shorter_side_then_crops():
  params = frames.sample_augmentation(_AlwaysHigh(), 90, 160)
  assert params.is_fallback and params.crop is None
  assert params.fallback_position == (0.9, 0.9) and not params.flip
  clip = np.stack([_face_like(90, 160, seed=s) for s in range(2)])
  out = frames.apply_augmentation(clip, params, 64)
  # the reference: brightness, GroupScale(64) -> 113x64 (int(64 * 160 / 90)), GroupRandomCrop(64)
  assert out.shape == (2, 64, 64, 3)
  x = int(0.9 * (113 - 64 + 1))
  for frame, result in zip(clip, out):
    image = ImageEnhance.Brightness(Image.fromarray(frame)).enhance(params.brightness)
    image = image.resize((113, 64), Image.BILINEAR).crop((x, 0, x + 64, 64))
    np.testing.assert_array_equal(result, np.asarray(image))


def test_fallback_on_square_frames_is_a_plain_resize():
  params = frames.sample_augmentation(_AlwaysHigh(), 128, 128)
  clip = _face_like(128, 128)[None]
  expected = Image.fromarray(frames.brightness_table(params.brightness)[clip[0]]).resize((64, 64), Image.BILINEAR)
  np.testing.assert_array_equal(frames.apply_augmentation(clip, params, 64)[0], np.asarray(expected))


def test_resize_frames_is_pil_bilinear():
  clip = np.stack([_face_like(90, 160, seed=s) for s in range(2)])
  out = frames.resize_frames(clip, 112)
  assert out.shape == (2, 112, 112, 3)
  for frame, result in zip(clip, out):
    expected = Image.fromarray(frame).resize((112, 112), Image.BILINEAR)
    np.testing.assert_array_equal(result, np.asarray(expected))
  np.testing.assert_array_equal(frames.resize_frames(clip, 112)[:1], frames.resize_frames(clip[:1], 112))
  square = np.stack([_face_like(64, 64)])
  np.testing.assert_array_equal(frames.resize_frames(square, 64), square)


def test_bad_inputs_are_rejected():
  clip = _face_like(50, 50)[None]
  with pytest.raises(ValueError, match='does not fit'):
    frames.apply_augmentation(clip, frames.AugmentParams(1.0, (10, 10, 45, 20), False), 32)
  with pytest.raises(ValueError, match='uint8'):
    frames.resize_frames(clip.astype(np.float32), 32)
  with pytest.raises(ValueError, match='T, H, W, 3'):
    frames.resize_frames(clip[0], 32)
  with pytest.raises(ValueError):
    frames.sample_augmentation(np.random.default_rng(0), 0, 10)


def test_augment_params_is_frozen():
  params = frames.AugmentParams(1.0, (0, 0, 5, 5), False)
  with pytest.raises(Exception):
    params.flip = True  # type: ignore[misc]
  assert math.isclose(params.brightness, 1.0)
