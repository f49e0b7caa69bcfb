"""Decoding raw video files (mp4/H.264+AAC, mkv, avi, webm, ...) with PyAV: frames and the audio track.

A clip is read in one pass over its packets: audio packets are decoded as they come, video packets are only kept
(compressed, a few MB for a 10 s 1080p clip), so the number of frames is known before any frame is decoded. The
caller picks which frames it needs from that count (`pick`, e.g. the 16 test-time segments); every frame is then
decoded (H.264 needs its references) but only the picked ones are converted to RGB, which is what costs.

Frames come out RGB uint8, upright: a display matrix (how phones store portrait video) is applied. Audio comes out
float32 (channels, samples) in [-1, 1) at the stream's own sample rate with all of its channels, quantised to 16
bits: exactly the samples of the PCM16 wav that `extract_wav` (or the reference's ffmpeg command) writes. `extract_wav` writes that track as PCM16 wav, as the reference's `ffmpeg -i clip.mp4
clip.wav` did.

This is a leaf module: it imports nothing from this package.
"""
import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import av
import numpy as np


class VideoError(Exception):
  """A video file is missing, unreadable, corrupt or has no video stream. The message names the file."""


@dataclasses.dataclass
class Video:
  frames: np.ndarray            # (K, H, W, 3) uint8 RGB, the picked frames in the order of `indices`
  indices: np.ndarray           # (K,) int: which frames of the clip (0-based, presentation order) they are
  num_frames: int               # frames in the clip (or max_frames when it stopped early)
  fps: float                    # the video stream's own frame rate
  audio: Optional[np.ndarray]   # (channels, samples) float32 in [-1, 1) on the PCM16 grid, or None when no track
  sample_rate: Optional[int]    # the audio stream's own rate, or None
  damaged_packets: int = 0      # packets that failed to decode and were skipped (video and audio)
  declared_frames: Optional[int] = None  # frames the container's header announces (None when it does not say)
  ended_early: bool = False     # the stream holds fewer frames than declared: a truncated file

  @property
  def has_audio(self) -> bool:
    return self.audio is not None


def _open(path) -> av.container.InputContainer:
  path = Path(path)
  if not path.is_file():
    raise VideoError(f'{path}: no such file (give the path of a video file)')
  try:
    return av.open(str(path))
  except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
    raise VideoError(f'{path}: cannot open it as a video ({e}); is it a complete video file?') from e


def _video_stream(container, path):
  if not container.streams.video:
    raise VideoError(f'{path}: has no video stream')
  stream = container.streams.video[0]
  stream.thread_type = 'AUTO'  # frame and slice threads: decoding is most of the time spent here
  return stream


def _frame_rate(stream) -> float:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  return float(rate) if rate else 0.0


def _declared_frames(container, stream):
  """(frames the header announces, how many fewer may be present without the file being short).

  mp4 states the count exactly; other containers (mkv, webm) only a duration, the stream's or the whole file's
  (which may include a longer audio track), converted at the stream's rate with a margin of half a second or 5%.
  (None, 0) when the header says neither.
  """
  if stream.frames:
    return int(stream.frames), 0
  rate = _frame_rate(stream)
  seconds = None
  if stream.duration and stream.time_base:
    seconds = float(stream.duration * stream.time_base)
  elif container.duration:
    seconds = container.duration / av.time_base
  if not (seconds and rate):
    return None, 0
  expected = seconds * rate
  return int(round(expected)), max(2, int(0.5 * rate), int(0.05 * expected))


def _rotation_quarters(frame) -> int:
  """Counter-clockwise quarter turns that make the frame upright, from its display matrix (0 when none)."""
  try:
    degrees = frame.rotation
  except (AttributeError, av.FFmpegError):
    return 0
  return int(round((degrees or 0) / 90.0)) % 4


def _to_rgb(frame, max_side: Optional[int]) -> np.ndarray:
  """RGB uint8 (H, W, 3), upright; scaled down (by the converter, which is cheap) when the longer side exceeds
  max_side."""
  width, height = frame.width, frame.height
  scale = 1.0
  if max_side and max(width, height) > max_side:
    scale = max_side / max(width, height)
  if scale < 1.0:
    width = max(2, int(round(width * scale)))
    height = max(2, int(round(height * scale)))
    rgb = frame.to_ndarray(format='rgb24', width=width, height=height)
  else:
    rgb = frame.to_ndarray(format='rgb24')
  quarters = _rotation_quarters(frame)
  if quarters:
    rgb = np.ascontiguousarray(np.rot90(rgb, k=quarters))
  return rgb


def _decode_packet(decode, packet, errors):
  """The frames of one packet; none when the packet is damaged (the ffmpeg command line also skips those and
  goes on; a clip whose every video packet fails is reported by the caller). Counts the failures in errors[0]."""
  try:
    return decode(packet)
  except av.error.EOFError:
    raise
  except av.FFmpegError:
    errors[0] += 1
    return []


class _AudioCollector:
  """Decodes audio packets into 16-bit planar blocks at the stream's own rate and layout.

  The reference computed its features from wavs that ffmpeg wrote as PCM16; near-silent stretches (digital
  silence after a lossy codec) give very different log-mel values at 16 bits than in float (up to 0.47 after
  normalisation on the fixture clip), so the audio goes through the same libswresample conversion to int16.
  """

  def __init__(self, stream):
    self.stream = stream
    self.blocks = []
    self.errors = [0]
    self.resampler = None
    self.sample_rate = None

  def _add(self, frame):
    if self.resampler is None:
      self.sample_rate = frame.sample_rate
      # Only the sample format changes (to planar int16); rate and channels stay the stream's own.
      self.resampler = av.AudioResampler(format='s16p', layout=frame.layout, rate=frame.sample_rate)
    for converted in self.resampler.resample(frame):
      self.blocks.append(converted.to_ndarray())

  def decode(self, packet):
    for frame in _decode_packet(self.stream.codec_context.decode, packet, self.errors):
      self._add(frame)

  def finish(self):
    # No decoder flush here: the demuxer's final empty packet, passed to `decode`, already flushed it.
    if self.resampler is not None:
      for converted in self.resampler.resample(None):
        self.blocks.append(converted.to_ndarray())
    if not self.blocks:
      return None, None
    audio = np.concatenate(self.blocks, axis=1).astype(np.float32) / 32768.0  # as soundfile reads PCM16
    return audio, self.sample_rate


def read_video(path, pick: Optional[Callable[[int], Sequence[int]]] = None, max_frames: Optional[int] = None,
               max_side: Optional[int] = None, audio: bool = True) -> Video:
  """Reads a video file: the frames `pick(num_frames)` asks for (all frames when pick is None), and its audio.

  Args:
    path: the video file.
    pick: maps the clip's frame count to the frame indices wanted (repeats allowed, e.g. edge padding).
    max_frames: read at most this many frames from the start.
    max_side: scale frames down so that their longer side is at most this (None: full size).
    audio: also decode the first audio track.
  Raises:
    VideoError: the file is missing, cannot be decoded, or has no video frames.
  """
  container = _open(path)
  try:
    return _read(container, path, pick, max_frames, max_side, audio)
  except (av.FFmpegError, MemoryError, ValueError) as e:  # noqa: B014
    raise VideoError(f'{path}: decoding failed ({e}); the file may be corrupt or truncated') from e
  finally:
    container.close()


def _read(container, path, pick, max_frames, max_side, want_audio) -> Video:
  video_stream = _video_stream(container, path)
  audio_stream = container.streams.audio[0] if (want_audio and container.streams.audio) else None
  collector = _AudioCollector(audio_stream) if audio_stream is not None else None
  streams = [video_stream] + ([audio_stream] if audio_stream is not None else [])

  video_packets = []
  num_shown = 0
  for packet in container.demux(streams):
    if packet.stream.type == 'video':
      if packet.size:  # the demuxer ends each stream with an empty flush packet
        video_packets.append(packet)
        # Packets before an edit list's start are decoded (later frames may refer to them) but never shown.
        num_shown += not packet.is_discard
    elif collector is not None:
      collector.decode(packet)
  declared, margin = _declared_frames(container, video_stream)
  ended_early = declared is not None and len(video_packets) < declared - margin
  num_frames = num_shown
  if max_frames is not None:
    num_frames = min(num_frames, max_frames)
  if num_frames == 0:
    raise VideoError(f'{path}: the video stream holds no frames')

  indices = np.arange(num_frames) if pick is None else np.asarray(pick(num_frames), dtype=np.int64)
  if indices.size == 0 or indices.min() < 0 or indices.max() >= num_frames:
    raise ValueError(f'pick({num_frames}) gave indices outside [0, {num_frames})')
  wanted = set(indices.tolist())
  last_wanted = indices.max()

  converted = {}
  decoded = 0
  last_rgb = None
  codec = video_stream.codec_context
  errors = [0]

  def take(frame):
    nonlocal decoded, last_rgb
    if decoded in wanted:
      converted[decoded] = _to_rgb(frame, max_side)
    if decoded <= last_wanted:
      last_rgb = frame
    decoded += 1

  for packet in video_packets:
    for frame in _decode_packet(codec.decode, packet, errors):
      take(frame)
    if decoded > last_wanted:
      break
  else:
    for frame in codec.decode(None):
      take(frame)
  if decoded == 0:
    raise VideoError(f'{path}: no video frame could be decoded; the file may be corrupt')
  # A packet count can exceed the decodable frames (a damaged tail, dropped frames): use the last frame there.
  missing = [i for i in wanted if i not in converted]
  if missing:
    fallback = _to_rgb(last_rgb, max_side)
    for i in missing:
      converted[i] = fallback

  audio, sample_rate = collector.finish() if collector is not None else (None, None)
  frames = np.stack([converted[i] for i in indices.tolist()])
  return Video(frames=frames, indices=indices, num_frames=num_frames, fps=_frame_rate(video_stream),
               audio=audio, sample_rate=sample_rate,
               damaged_packets=errors[0] + (collector.errors[0] if collector is not None else 0),
               declared_frames=declared, ended_early=ended_early)


def iter_frames(path, max_side: Optional[int] = None) -> Iterator[np.ndarray]:
  """Every frame of a video, RGB uint8 (H, W, 3), upright, in presentation order (for dataset preparation)."""
  container = _open(path)
  try:
    stream = _video_stream(container, path)
    for frame in container.decode(stream):
      yield _to_rgb(frame, max_side)
  except av.FFmpegError as e:
    raise VideoError(f'{path}: decoding failed ({e}); the file may be corrupt or truncated') from e
  finally:
    container.close()


def read_audio(path):
  """The first audio track as ((channels, samples) float32 in [-1, 1), PCM16 values, sample_rate), or (None, None)."""
  container = _open(path)
  try:
    if not container.streams.audio:
      return None, None
    stream = container.streams.audio[0]
    collector = _AudioCollector(stream)
    for packet in container.demux(stream):
      collector.decode(packet)
    return collector.finish()
  except av.FFmpegError as e:
    raise VideoError(f'{path}: decoding its audio failed ({e}); the file may be corrupt or truncated') from e
  finally:
    container.close()


def extract_wav(video_path, wav_path) -> bool:
  """Writes the first audio track of `video_path` to `wav_path` as PCM16 wav at its own rate and channels.

  The file appears complete or not at all (written under a temporary name, then renamed). Returns False, writing
  nothing, when the video has no audio track (or the track holds no samples).
  """
  wav_path = Path(wav_path)
  container = _open(video_path)
  tmp_path = wav_path.with_name(f'.{wav_path.name}.{os.getpid()}.tmp')
  try:
    if not container.streams.audio:
      return False
    in_stream = container.streams.audio[0]
    wrote = _transcode_to_wav(container, in_stream, tmp_path)
    if not wrote:
      return False
    os.replace(tmp_path, wav_path)
    return True
  except av.FFmpegError as e:
    raise VideoError(f'{video_path}: extracting its audio failed ({e}); the file may be corrupt') from e
  finally:
    container.close()
    if tmp_path.exists():
      tmp_path.unlink()


def _transcode_to_wav(container, in_stream, out_path) -> bool:
  """Decodes `in_stream` and encodes it as pcm_s16le in a wav file; False when it held no samples."""
  out = None
  resampler = None
  samples = 0
  try:
    errors = [0]
    for packet in container.demux(in_stream):
      for frame in _decode_packet(in_stream.codec_context.decode, packet, errors):
        if out is None:
          out = av.open(str(out_path), mode='w', format='wav')
          out_stream = out.add_stream('pcm_s16le', rate=frame.sample_rate, layout=frame.layout.name)
          # The same float -> int16 conversion (libswresample) that the ffmpeg command line applies.
          resampler = av.AudioResampler(format='s16', layout=frame.layout, rate=frame.sample_rate)
        for converted in resampler.resample(frame):
          samples += converted.samples
          out.mux(out_stream.encode(converted))
    if out is None:
      return False
    for converted in resampler.resample(None):
      samples += converted.samples
      out.mux(out_stream.encode(converted))
    out.mux(out_stream.encode(None))
    return samples > 0
  finally:
    if out is not None:
      out.close()


# ---------------------------------------------------------------------------------------------------------------
# Streaming: a long video frame by frame and its audio block by block, with memory that does not grow with the file
# (the emotion timeline). The frames and samples are those `read_video` gives for the same file.


@dataclasses.dataclass
class StreamInfo:
  fps: float                      # the video stream's own frame rate
  declared_frames: Optional[int]  # frames the header announces (None when it does not say)
  has_audio: bool                 # the file has an audio track


def probe(path) -> StreamInfo:
  """What the header says about a video file, without decoding it."""
  container = _open(path)
  try:
    stream = _video_stream(container, path)
    declared, _ = _declared_frames(container, stream)
    return StreamInfo(fps=_frame_rate(stream), declared_frames=declared, has_audio=bool(container.streams.audio))
  finally:
    container.close()


def frame_to_rgb(frame, max_side: Optional[int] = None) -> np.ndarray:
  """A PyAV frame as `read_video` converts it: RGB uint8 (H, W, 3), upright, longer side at most max_side."""
  return _to_rgb(frame, max_side)


def iter_video_frames(path) -> Iterator['av.VideoFrame']:
  """Every decoded frame of the first video stream as an (unconverted) PyAV frame, in presentation order.

  The packets go through the decoder as in `read_video` (damaged ones skipped, the decoder flushed at the end), so
  frame k here is frame k there; convert the ones you keep with `frame_to_rgb` (the conversion is what costs).
  Only the frames the decoder holds for reordering are in memory.
  """
  container = _open(path)
  try:
    stream = _video_stream(container, path)
    codec = stream.codec_context
    errors = [0]
    for packet in container.demux(stream):
      if packet.size:  # the demuxer's empty flush packet; the decoder is flushed below as read_video does
        yield from _decode_packet(codec.decode, packet, errors)
    yield from codec.decode(None)
  except av.FFmpegError as e:
    raise VideoError(f'{path}: decoding failed ({e}); the file may be corrupt or truncated') from e
  finally:
    container.close()


def iter_audio_blocks(path) -> Iterator[Tuple[np.ndarray, int]]:
  """The first audio track in consecutive blocks ((channels, samples) float32 on the PCM16 grid, sample_rate).

  Concatenated, the blocks are exactly the `audio` of `read_video`; nothing when the file has no audio track.
  """
  container = _open(path)
  try:
    if not container.streams.audio:
      return
    collector = _AudioCollector(container.streams.audio[0])
    for packet in container.demux(collector.stream):
      collector.decode(packet)
      yield from _take_blocks(collector)
    if collector.resampler is not None:
      collector.blocks.extend(converted.to_ndarray() for converted in collector.resampler.resample(None))
    yield from _take_blocks(collector)
  except av.FFmpegError as e:
    raise VideoError(f'{path}: decoding its audio failed ({e}); the file may be corrupt or truncated') from e
  finally:
    container.close()


def _take_blocks(collector):
  blocks, collector.blocks = collector.blocks, []
  for block in blocks:
    yield block.astype(np.float32) / 32768.0, collector.sample_rate  # as `_AudioCollector.finish` scales them
