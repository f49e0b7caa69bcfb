"""Audio features of the reference: Kaldi log-mel filterbanks of a clip's wav, padded or cut, normalised.

The reference reads the wav with `torchaudio.load` at the file's own sample rate, subtracts the mean over all
channels and samples, and runs `torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True,
sample_frequency=sr, use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)` on
channel 0 (Kaldi defaults otherwise). The 128 x T result is padded with zero rows or cut to 512 frames and
normalised with AudioSet statistics.

No library here computes that: torchaudio is not a dependency, kaldi-native-fbank refuses 128 mel bins at 16 kHz,
and librosa's mel banks, windows and framing differ from Kaldi's. So the steps are written out below in numpy, in
float32 and in the reference's order of operations, which keeps near-silent frames (where the log sees rounding
residues) close to it too.

Inputs are refused rather than cleaned: a file with NaN or Inf samples raises NonFiniteAudioError (the file and
the count named), since one such clip would turn every trained weight into NaN. `load_fbank` reads a file in
blocks: the mean needs every sample, the fbank only the first ~5 s, so its memory does not grow with the file.

This is a leaf module: it imports nothing from this package.
"""
import functools
import math
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import scipy.fft
import soundfile

# AudioSet statistics the reference normalises with: (fbank - FBANK_MEAN) / (2 * FBANK_STD).
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974
NUM_MEL_BINS = 128
NUM_FRAMES = 512

# Kaldi/torchaudio framing and filter settings the reference uses (torchaudio's defaults unless noted).
_FRAME_LENGTH_MS = 25.0
_FRAME_SHIFT_MS = 10.0
_PREEMPHASIS = 0.97
_LOW_FREQ = 20.0
_LOG_FLOOR = np.finfo(np.float32).eps  # torchaudio floors mel energies at float32 eps before the log
_BLOCK_FRAMES = 1 << 16  # sample frames (all channels) load_fbank reads at a time


class AudioError(ValueError):
  """An audio file is missing, unreadable, corrupt or holds no samples. The message names the file."""


class NonFiniteAudioError(AudioError):
  """Audio holding NaN or Inf samples: refused, not cleaned. The message names the file and how many."""


def normalize_fbank(fbank: np.ndarray) -> np.ndarray:
  """The reference's AudioSet normalisation of a raw log-mel fbank, as float32."""
  fbank = np.asarray(fbank, dtype=np.float32)
  return ((fbank - np.float32(FBANK_MEAN)) / np.float32(FBANK_STD * 2)).astype(np.float32)


def silent_fbank(num_frames: int = NUM_FRAMES, num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
  """What the reference feeds a MAFW clip that has no wav: an all-zero fbank, normalised (0.46703 everywhere)."""
  return normalize_fbank(np.zeros((num_frames, num_mel_bins), np.float32))


def pad_or_cut(fbank: np.ndarray, num_frames: int = NUM_FRAMES) -> np.ndarray:
  """Zero rows appended, or trailing rows dropped, so that there are exactly num_frames rows."""
  fbank = np.asarray(fbank, dtype=np.float32)[:num_frames]
  missing = num_frames - fbank.shape[0]
  if missing > 0:
    fbank = np.pad(fbank, ((0, missing), (0, 0)))
  return fbank


def _frame_sizes(sample_rate: float) -> Tuple[int, int, int]:
  """(shift, length, padded FFT length) in samples, with torchaudio's float arithmetic and truncation."""
  shift = int(sample_rate * _FRAME_SHIFT_MS * 0.001)
  length = int(sample_rate * _FRAME_LENGTH_MS * 0.001)
  if shift < 1 or length < 2:
    raise ValueError(f'sample rate {sample_rate} Hz is too low for 25 ms Kaldi frames')
  padded = 1 << (length - 1).bit_length()  # round_to_power_of_two
  return shift, length, padded


def _mel(freq):
  # torchaudio's Kaldi mel scale (natural log), on float32 arrays it stays float32.
  return 1127.0 * np.log(1.0 + freq / 700.0)


def mel_banks(num_mel_bins: int, padded_length: int, sample_rate: float) -> np.ndarray:
  """Triangular mel filters (num_mel_bins, padded_length // 2 + 1) as torchaudio's `get_mel_banks` builds them.

  float32 like torchaudio, over the padded FFT's bins; the Nyquist bin gets weight 0. Low edge 20 Hz, high edge
  the Nyquist frequency.
  """
  nyquist = 0.5 * sample_rate
  if not _LOW_FREQ < nyquist:
    raise ValueError(f'sample rate {sample_rate} Hz: the 20 Hz low mel edge is not below Nyquist')
  mel_low = 1127.0 * math.log(1.0 + _LOW_FREQ / 700.0)
  mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  index = np.arange(num_mel_bins, dtype=np.float32)[:, None]
  left = mel_low + index * delta
  center = mel_low + (index + 1.0) * delta
  right = mel_low + (index + 2.0) * delta
  bin_width = sample_rate / padded_length
  mel = _mel(bin_width * np.arange(padded_length // 2, dtype=np.float32))[None, :]
  up = (mel - left) / (center - left)
  down = (right - mel) / (right - center)
  banks = np.maximum(np.float32(0), np.minimum(up, down))
  return np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _mel_banks_transposed(num_mel_bins: int, padded_length: int, sample_rate: float) -> np.ndarray:
  banks = np.ascontiguousarray(mel_banks(num_mel_bins, padded_length, sample_rate).T)
  banks.flags.writeable = False  # shared by every call with these settings
  return banks


def _hann(length: int) -> np.ndarray:
  # torch.hann_window(length, periodic=False) evaluated in float32 as torch does.
  step = np.float32(2.0 * math.pi / (length - 1))
  return (np.cos(np.arange(length, dtype=np.float32) * step) * np.float32(-0.5) + np.float32(0.5)).astype(
      np.float32)


def num_kaldi_frames(num_samples: int, sample_rate: float) -> int:
  """How many whole 25 ms frames every 10 ms fit in num_samples (Kaldi's snip_edges rule)."""
  shift, length, _ = _frame_sizes(sample_rate)
  return 0 if num_samples < length else 1 + (num_samples - length) // shift


def kaldi_fbank(signal: np.ndarray, sample_rate: float, num_mel_bins: int = NUM_MEL_BINS,
                max_frames: Optional[int] = None) -> np.ndarray:
  """Raw Kaldi log-mel fbank (frames, num_mel_bins) float32 of a 1-D signal, as the reference computes it.

  25 ms Hann frames every 10 ms (snip_edges: only whole frames, so a signal shorter than one frame gives zero
  rows), per-frame DC removal, pre-emphasis 0.97, zero-padded to a power of two, power spectrum, mel filters from
  20 Hz to Nyquist, log floored at float32 eps. No dither, no energy column. Frames are independent, so
  max_frames (only the first ones, to save time on long clips) changes nothing in those it returns.
  """
  signal = np.asarray(signal, dtype=np.float32)
  if signal.ndim != 1:
    raise ValueError(f'kaldi_fbank wants a 1-D signal, got shape {signal.shape}; pick a channel first')
  shift, length, padded = _frame_sizes(sample_rate)
  if signal.shape[0] < length:
    return np.zeros((0, num_mel_bins), np.float32)
  frames = np.lib.stride_tricks.sliding_window_view(signal, length)[::shift][:max_frames]
  frames = frames - frames.mean(axis=1, keepdims=True, dtype=np.float32)
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = frames - np.float32(_PREEMPHASIS) * previous
  frames = frames * _hann(length)
  # The FFT runs in float64: torch's float32 FFT leaves rounding noise in bands ~1e-7 below the frame's peak,
  # which no float32 FFT here reproduces; the exact spectrum is closer to it than scipy's float32 one (max error
  # on the golden wavs 3.5e-5 to 6.3e-5 after normalisation, against up to 7.6e-5).
  spectrum = np.abs(scipy.fft.rfft(frames.astype(np.float64), n=padded, axis=1)) ** 2
  energies = spectrum.astype(np.float32) @ _mel_banks_transposed(num_mel_bins, padded, float(sample_rate))
  return np.log(np.maximum(energies, _LOG_FLOOR)).astype(np.float32)


def fbank_from_waveform(waveform: np.ndarray, sample_rate: float, num_frames: int = NUM_FRAMES,
                        num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
  """The reference's audio input (num_frames, num_mel_bins) float32 from a float waveform in [-1, 1].

  waveform: (samples,) or (channels, samples). The mean over all channels and samples (accumulated in float64)
  is subtracted, then the fbank of channel 0 is padded/cut to num_frames and normalised. A waveform with NaN or
  Inf samples raises NonFiniteAudioError.
  """
  waveform = np.asarray(waveform, dtype=np.float32)
  if waveform.ndim == 1:
    waveform = waveform[None]
  if waveform.ndim != 2:
    raise ValueError(f'waveform must be (samples,) or (channels, samples), got shape {waveform.shape}')
  non_finite = _count_non_finite(waveform)
  if non_finite:
    raise NonFiniteAudioError(f'the waveform holds {non_finite} non-finite samples (NaN or Inf) of '
                              f'{waveform.size}; clean or drop the clip')
  mean = np.float32(waveform.mean(dtype=np.float64)) if waveform.size else np.float32(0)
  return _fbank_of_channel(waveform[0], mean, sample_rate, num_frames, num_mel_bins)


def _count_non_finite(samples: np.ndarray) -> int:
  return int(samples.size - np.count_nonzero(np.isfinite(samples)))


def _fbank_of_channel(channel: np.ndarray, mean: np.float32, sample_rate: float, num_frames: int,
                      num_mel_bins: int) -> np.ndarray:
  """The normalised, padded/cut fbank of one channel after the (all-channel) mean is subtracted."""
  fbank = kaldi_fbank(channel - mean, sample_rate, num_mel_bins, max_frames=num_frames)
  return normalize_fbank(pad_or_cut(fbank, num_frames))


def samples_for_frames(num_frames: int, sample_rate: float) -> int:
  """How many samples the first num_frames Kaldi frames span (25 ms frames every 10 ms)."""
  shift, length, _ = _frame_sizes(sample_rate)
  return length + (max(num_frames, 1) - 1) * shift


def _to_unit_float(data: np.ndarray) -> np.ndarray:
  """Integer PCM scaled to [-1, 1) the way torchaudio.load does (by 2^(bits-1)); float passes through."""
  if np.issubdtype(data.dtype, np.integer):
    return (data.astype(np.float64) / float(2 ** (8 * data.itemsize - 1))).astype(np.float32)
  return data.astype(np.float32)


def _read_dtype(subtype: str) -> str:
  """The dtype soundfile should decode a subtype to: int32 PCM stays int32 so that 24/32-bit files keep their
  full precision before scaling; compressed and float formats decode to float32."""
  if subtype in ('FLOAT', 'DOUBLE', 'VORBIS', 'OPUS', 'MPEG_LAYER_III'):
    return 'float32'
  return 'int16' if subtype in ('PCM_16', 'PCM_U8', 'PCM_S8') else 'int32'


def read_audio(path: Union[str, Path]) -> Tuple[np.ndarray, int]:
  """(channels, samples) float32 in [-1, 1] and the file's own sample rate; no resampling.

  soundfile reads wav/flac/ogg/...; files it cannot read go through librosa (audioread/ffmpeg where installed).
  """
  path = Path(path)
  if not path.is_file():
    raise AudioError(f'{path}: no such audio file (give the path of a wav file)')
  try:
    info = soundfile.info(str(path))
    data, sample_rate = soundfile.read(str(path), dtype=_read_dtype(info.subtype), always_2d=True)
    waveform = _to_unit_float(data).T
  except (soundfile.LibsndfileError, RuntimeError) as sf_error:
    waveform, sample_rate = _read_with_librosa(path, sf_error)
  if waveform.size == 0:
    raise AudioError(f'{path}: the audio file holds no samples')
  return np.ascontiguousarray(waveform, dtype=np.float32), int(sample_rate)


def _read_with_librosa(path: Path, sf_error: Exception) -> Tuple[np.ndarray, int]:
  try:
    import librosa  # pylint: disable=import-outside-toplevel  (slow import; only needed for odd formats)
    with warnings.catch_warnings():  # its "PySoundFile failed" and audioread deprecation notices
      warnings.simplefilter('ignore')
      data, sample_rate = librosa.load(str(path), sr=None, mono=False)
  except Exception as e:  # audioread raises several unrelated types for corrupt input
    raise AudioError(f'{path}: cannot read it as audio ({sf_error}; librosa: {e!r}); is it a complete '
                     'wav file?') from e
  data = np.asarray(data, dtype=np.float32)
  return (data[None] if data.ndim == 1 else data), sample_rate


def _head_and_mean(path: Path, num_frames: int) -> Tuple[np.ndarray, np.float32, int]:
  """(channel 0's first samples that num_frames fbank frames need, the mean of all samples, the sample rate),
  read in blocks so that memory stays O(block + head) however long the file; refuses NaN/Inf anywhere."""
  with soundfile.SoundFile(str(path)) as sound:
    dtype, sample_rate = _read_dtype(sound.subtype), sound.samplerate
    head_samples = samples_for_frames(num_frames, sample_rate)
    head, head_length, total, count, non_finite = [], 0, 0.0, 0, 0
    while True:
      block = _to_unit_float(sound.read(_BLOCK_FRAMES, dtype=dtype, always_2d=True))  # (frames, channels)
      if not block.size:
        break
      non_finite += _count_non_finite(block)
      if not non_finite:  # (the file is refused otherwise; Inf - Inf would only warn)
        total += float(block.sum(dtype=np.float64))
      count += block.size
      if head_length < head_samples:
        head.append(block[:head_samples - head_length, 0].copy())
        head_length += head[-1].shape[0]
  if count == 0:
    raise AudioError(f'{path}: the audio file holds no samples')
  if non_finite:
    raise NonFiniteAudioError(_non_finite_message(path, non_finite, count))
  return np.concatenate(head), np.float32(total / count), int(sample_rate)


def load_fbank(path: Union[str, Path], num_frames: int = NUM_FRAMES,
               num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
  """The reference's normalised fbank (num_frames, num_mel_bins) float32 of an audio file at its own rate.

  Files libsndfile reads (wav, flac, ogg, ...) are read in blocks: the mean over all channels and samples is
  accumulated in float64 and only channel 0's first `samples_for_frames(num_frames)` samples are kept, so memory
  does not grow with the file (a 1-hour recording costs what a 6-second one does). Other formats go through
  librosa, whole. A file with any NaN or Inf sample is refused with NonFiniteAudioError (an AudioError naming the
  file and the count), never turned into a NaN fbank; so are missing, corrupt and empty files (AudioError).
  """
  path = Path(path)
  if not path.is_file():
    raise AudioError(f'{path}: no such audio file (give the path of a wav file)')
  try:
    try:
      head, mean, sample_rate = _head_and_mean(path, num_frames)
    except (soundfile.LibsndfileError, RuntimeError) as sf_error:  # a format libsndfile does not read
      return _fbank_with_librosa(path, sf_error, num_frames, num_mel_bins)
    return _fbank_of_channel(head, mean, sample_rate, num_frames, num_mel_bins)
  except AudioError:
    raise
  except ValueError as e:  # a sample rate too low for Kaldi frames
    raise AudioError(f'{path}: {e}') from e


def _non_finite_message(path: Path, non_finite: int, count: int) -> str:
  return f'{path}: {non_finite} of its {count} samples are not finite (NaN or Inf); replace or drop the file'


def _fbank_with_librosa(path: Path, sf_error: Exception, num_frames: int, num_mel_bins: int) -> np.ndarray:
  """load_fbank of a file libsndfile cannot read: decoded whole by librosa (memory grows with the file)."""
  waveform, sample_rate = _read_with_librosa(path, sf_error)
  if waveform.size == 0:
    raise AudioError(f'{path}: the audio file holds no samples')
  non_finite = _count_non_finite(waveform)
  if non_finite:
    raise NonFiniteAudioError(_non_finite_message(path, non_finite, waveform.size))
  return fbank_from_waveform(waveform, sample_rate, num_frames, num_mel_bins)
