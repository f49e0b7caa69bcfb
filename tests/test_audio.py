"""Audio features: parity with the reference's torchaudio fbank, file formats, channels, edge cases, errors."""
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mma_dfer_jax import audio

FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'
AUDIO_FIXTURES = FIXTURES / 'audio'
FIXTURE_WAVS = ('a_16k_mono', 'b_44k_stereo', 'a_48k_short')


def _speech_like(sample_rate, seconds=1.0, seed=0):
  """A voiced-looking test signal: a few harmonics with a wobbling pitch, amplitude bursts and a little noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(sample_rate * seconds)) / sample_rate
  pitch = 140 + 30 * np.sin(2 * np.pi * 3 * t)
  phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
  voice = sum(np.sin(k * phase) / k for k in range(1, 8))
  envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2 * t) ** 2
  return (0.2 * envelope * voice + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def _as_int16(signal):
  return np.round(np.clip(signal, -1, 1) * 32767).astype(np.int16)


@pytest.fixture(scope='module')
def reference():
  path = AUDIO_FIXTURES / 'fbank_reference.npz'
  if not path.exists():
    pytest.skip(f'{path} is absent: parity tests need ../shared/fixtures beside the checkout')
  return np.load(path)


@pytest.mark.parametrize('name', FIXTURE_WAVS)
def test_fixture_wavs_match_the_reference_fbank(name, reference):
  features = audio.load_fbank(AUDIO_FIXTURES / f'{name}.wav')
  expected = reference[name]
  assert features.shape == expected.shape == (512, 128)
  assert features.dtype == np.float32
  # Measured here: 3.5e-5, 5.5e-5, 6.3e-5 (torch's float32 FFT noise in bands 1e-7 below a frame's peak).
  assert np.abs(features - expected).max() < 2e-4
  assert np.abs(features - expected).mean() < 2e-6


@pytest.mark.parametrize('name', FIXTURE_WAVS)
def test_fixture_wavs_raw_frame_counts(name, reference):
  waveform, sample_rate = audio.read_audio(AUDIO_FIXTURES / f'{name}.wav')
  raw = audio.kaldi_fbank(waveform[0] - waveform.mean(), sample_rate)
  assert raw.shape == (int(reference[f'{name}_raw_frames']), 128)
  assert audio.num_kaldi_frames(waveform.shape[1], sample_rate) == raw.shape[0]
  padded_rows = audio.load_fbank(AUDIO_FIXTURES / f'{name}.wav')[raw.shape[0]:]
  np.testing.assert_array_equal(padded_rows, audio.silent_fbank(512)[:len(padded_rows)])


def test_pcm16_pcm32_and_float_files_give_the_same_features(tmp_path):
  pcm = _as_int16(_speech_like(22050))
  soundfile.write(tmp_path / 'int16.wav', pcm, 22050, subtype='PCM_16')
  soundfile.write(tmp_path / 'int32.wav', pcm.astype(np.int32) << 16, 22050, subtype='PCM_32')
  soundfile.write(tmp_path / 'float.wav', pcm.astype(np.float32) / 32768, 22050, subtype='FLOAT')
  soundfile.write(tmp_path / 'pcm24.flac', pcm.astype(np.int32) << 16, 22050, subtype='PCM_24')
  features = [audio.load_fbank(tmp_path / name) for name in ('int16.wav', 'int32.wav', 'float.wav', 'pcm24.flac')]
  for other in features[1:]:
    np.testing.assert_array_equal(features[0], other)
  # and the scale is torchaudio's: int16 / 2^15
  direct = audio.fbank_from_waveform(pcm.astype(np.float32) / 32768, 22050)
  np.testing.assert_array_equal(features[0], direct)


def test_stereo_uses_channel_zero_after_the_global_mean(tmp_path):
  left = _speech_like(16000, seed=1)
  right = 0.5 * _speech_like(16000, seed=2)[::-1] + 0.3  # another signal with a DC offset
  stereo = np.stack([left, right], axis=1)
  soundfile.write(tmp_path / 'stereo.wav', stereo, 16000, subtype='FLOAT')
  features = audio.load_fbank(tmp_path / 'stereo.wav')
  channels_first = np.ascontiguousarray(stereo.T)  # as read_audio lays it out
  centred = channels_first - np.float32(channels_first.mean(dtype=np.float64))
  expected = audio.normalize_fbank(audio.pad_or_cut(audio.kaldi_fbank(centred[0], 16000)))
  np.testing.assert_array_equal(features, expected)
  # channel 0 it is, not channel 1 nor the mix
  assert np.abs(features - audio.fbank_from_waveform(right, 16000)).max() > 0.1
  assert np.abs(features - audio.fbank_from_waveform(stereo.mean(1), 16000)).max() > 0.1
  # Kaldi removes each frame's DC, so the global mean only matters through rounding
  np.testing.assert_allclose(features, audio.fbank_from_waveform(left, 16000), atol=1e-4)


def test_multichannel_file(tmp_path):
  channels = np.stack([_speech_like(48000, 0.5, seed=s) for s in range(6)], axis=1)
  soundfile.write(tmp_path / 'six.wav', _as_int16(channels), 48000, subtype='PCM_16')
  waveform, sample_rate = audio.read_audio(tmp_path / 'six.wav')
  assert waveform.shape == (6, 24000) and sample_rate == 48000
  features = audio.load_fbank(tmp_path / 'six.wav')
  np.testing.assert_array_equal(features, audio.fbank_from_waveform(waveform, 48000))
  assert audio.num_kaldi_frames(24000, 48000) == 48
  assert np.all(features[48:] == audio.silent_fbank()[0, 0])
  assert np.all(features[:48].std(axis=1) > 0.01)


@pytest.mark.parametrize('sample_rate', [8000, 11025, 16000, 22050, 32000, 44100, 48000])
def test_any_rate_gives_the_kaldi_frame_count(sample_rate):
  signal = _speech_like(sample_rate, 0.7)
  raw = audio.kaldi_fbank(signal, sample_rate)
  shift, length = int(sample_rate * 0.010), int(sample_rate * 0.025)
  assert raw.shape == (1 + (len(signal) - length) // shift, 128)
  assert np.isfinite(raw).all() and raw.min() >= np.log(np.finfo(np.float32).eps) - 1e-5
  assert raw.max() > 0  # voiced frames carry energy well above the floor


def test_too_short_file_is_all_padding(tmp_path):
  soundfile.write(tmp_path / 'short.wav', _as_int16(_speech_like(16000, 0.02)), 16000)  # 320 < 400 samples
  np.testing.assert_array_equal(audio.load_fbank(tmp_path / 'short.wav'), audio.silent_fbank())
  one_frame = audio.kaldi_fbank(_speech_like(16000, 0.025), 16000)
  assert one_frame.shape == (1, 128)


def test_cut_to_num_frames_and_max_frames_change_nothing_else():
  signal = _speech_like(16000, 3.0)
  full = audio.kaldi_fbank(signal, 16000)
  assert full.shape[0] == 298
  # Equal up to float32 rounding: BLAS may block the mel projection of 100 and 298 frames differently.
  np.testing.assert_allclose(audio.kaldi_fbank(signal, 16000, max_frames=100), full[:100], rtol=0, atol=1e-5)
  centred = audio.kaldi_fbank(signal - signal.mean(dtype=np.float32), 16000)
  np.testing.assert_allclose(audio.fbank_from_waveform(signal, 16000, num_frames=100),
                             audio.normalize_fbank(centred[:100]), rtol=0, atol=1e-5)


def test_silent_fbank_is_the_normalised_zero():
  silent = audio.silent_fbank()
  assert silent.shape == (512, 128) and silent.dtype == np.float32
  np.testing.assert_allclose(silent, 4.2677393 / (4.5689974 * 2), rtol=1e-7)
  assert abs(float(silent[0, 0]) - 0.46703) < 1e-5
  assert audio.silent_fbank(20).shape == (20, 128)


def test_mel_banks_are_kaldi_triangles():
  banks = audio.mel_banks(128, 512, 16000)
  assert banks.shape == (128, 257)
  assert np.all(banks[:, -1] == 0)  # Nyquist bin
  assert np.all(banks >= 0) and np.all(banks <= 1)
  # 128 bins on a 512-point FFT: some low triangles fall between FFT bins and stay empty, as in Kaldi
  nonempty = banks.max(axis=1) > 0
  assert 100 < nonempty.sum() < 128 and nonempty[40:].all()
  peaks = banks[nonempty].argmax(axis=1)
  assert np.all(np.diff(peaks) >= 0)  # centres rise with the bin index
  hz = np.arange(257) * 16000 / 512
  assert hz[np.nonzero(banks[0])[0][0]] > 20  # nothing below the 20 Hz low edge


def test_missing_file_names_the_path(tmp_path):
  path = tmp_path / 'no_such.wav'
  with pytest.raises(audio.AudioError, match='no_such.wav'):
    audio.load_fbank(path)


def test_corrupt_file_names_the_path(tmp_path):
  path = tmp_path / 'corrupt.wav'
  path.write_bytes(b'RIFF\x24\x00\x00\x00WAVEfmt ' + bytes(range(256)) * 4)
  with pytest.raises(audio.AudioError, match='corrupt.wav'):
    audio.load_fbank(path)
  assert issubclass(audio.AudioError, ValueError)


def test_empty_file_names_the_path(tmp_path):
  path = tmp_path / 'empty.wav'
  soundfile.write(path, np.zeros((0, 1), np.int16), 16000)
  with pytest.raises(audio.AudioError, match='empty.wav'):
    audio.load_fbank(path)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite samples are refused; long files are read in blocks.

def _features_as_before(path):
  """load_fbank as it was before block reading: the whole file, its float32 mean, channel 0."""
  waveform, sample_rate = audio.read_audio(path)
  centred = waveform[0] - waveform.mean(dtype=np.float32)
  return audio.normalize_fbank(audio.pad_or_cut(audio.kaldi_fbank(centred, sample_rate, max_frames=512)))


@pytest.mark.parametrize('where', ['head', 'tail'])
def test_nan_samples_are_refused_with_the_file_and_count(tmp_path, where):
  signal = _speech_like(16000, 1.0)
  signal[np.arange(10) * 7 + (100 if where == 'head' else 15000)] = np.nan  # 'tail': past the samples fbank uses
  path = tmp_path / 'nan.wav'
  soundfile.write(path, signal, 16000, subtype='FLOAT')
  with pytest.raises(audio.NonFiniteAudioError, match=r'nan.wav: 10 of its 16000 samples are not finite '
                                                      r'\(NaN or Inf\); replace or drop the file'):
    audio.load_fbank(path)
  assert issubclass(audio.NonFiniteAudioError, audio.AudioError)


def test_inf_in_another_channel_and_a_later_block_is_refused(tmp_path):
  stereo = np.stack([_speech_like(8000, 20.0), _speech_like(8000, 20.0, seed=3)], axis=1)  # 160,000 frames
  stereo[150_000, 1] = np.inf
  stereo[150_001, 1] = -np.inf
  soundfile.write(tmp_path / 'inf.wav', stereo, 8000, subtype='FLOAT')
  with pytest.raises(audio.NonFiniteAudioError, match='inf.wav: 2 of its 320000 samples are not finite'):
    audio.load_fbank(tmp_path / 'inf.wav')


def test_waveform_with_non_finite_samples_is_refused():
  waveform = np.stack([_speech_like(16000), _speech_like(16000, seed=1)])
  waveform[1, 5] = np.nan
  with pytest.raises(audio.NonFiniteAudioError, match='1 non-finite samples .NaN or Inf. of 32000'):
    audio.fbank_from_waveform(waveform, 16000)


@pytest.mark.parametrize('sample_rate, channels, subtype', [(48000, 2, 'FLOAT'), (44100, 1, 'PCM_16'),
                                                            (8000, 3, 'PCM_24')])
def test_block_reading_gives_what_whole_file_reading_gave(tmp_path, sample_rate, channels, subtype):
  """8 s files: the head the fbank needs spans several blocks (246,480 samples at 48 kHz) and the file goes on."""
  signal = np.stack([_speech_like(sample_rate, 8.0, seed=s) + 0.1 * s for s in range(channels)], axis=1)
  path = tmp_path / 'long.wav'
  soundfile.write(path, np.clip(signal, -1, 1), sample_rate, subtype=subtype)
  features = audio.load_fbank(path)
  assert features.shape == (512, 128) and np.isfinite(features).all()
  assert np.abs(features - _features_as_before(path)).max() <= 1e-5
  waveform, _ = audio.read_audio(path)
  np.testing.assert_array_equal(features, audio.fbank_from_waveform(waveform, sample_rate))


@pytest.mark.parametrize('name', FIXTURE_WAVS)
def test_block_reading_of_the_fixture_wavs_gives_what_whole_file_reading_gave(name, reference):
  path = AUDIO_FIXTURES / f'{name}.wav'
  assert np.abs(audio.load_fbank(path) - _features_as_before(path)).max() <= 1e-5


_PEAK_MEMORY_PROBE = '''
import json, resource, sys
from mma_dfer_jax import audio
audio.load_fbank(sys.argv[1])  # warm: imports, FFT plans, mel banks and the fbank's own buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fbank = audio.load_fbank(sys.argv[2])
grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({'grew_mb': grew_kb / 1024, 'fbank_sum': float(fbank.sum())}))
'''


def test_an_hour_long_recording_is_read_in_bounded_memory(tmp_path):
  """A 1-hour 8 kHz wav (57.6 MB): the peak resident memory of load_fbank grows by a few MB over a 6-second file
  (measured 0.6 MB; whole-file reading grew it by 383 MB)."""
  import json
  import subprocess
  import sys
  from conftest import ROOT
  sample_rate, minute = 8000, 8000 * 60
  rng = np.random.default_rng(0)
  hour, six_seconds = tmp_path / 'hour.wav', tmp_path / 'six.wav'
  with soundfile.SoundFile(hour, 'w', sample_rate, 1, 'PCM_16') as sound:
    for k in range(60):
      t = (np.arange(minute) + k * minute) / sample_rate
      voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(np.pi * t)) + 0.05
      sound.write(_as_int16(voice + 0.01 * rng.standard_normal(minute)))
  assert hour.stat().st_size > 57_000_000
  head, _ = soundfile.read(hour, frames=6 * sample_rate, dtype='int16')
  soundfile.write(six_seconds, head, sample_rate, subtype='PCM_16')
  done = subprocess.run([sys.executable, '-c', _PEAK_MEMORY_PROBE, str(six_seconds), str(hour)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  measured = json.loads(done.stdout.splitlines()[-1])
  assert measured['grew_mb'] < 60, measured
  # The same first 512 frames as the 6-second file; only the mean (and so rounding) differs.
  np.testing.assert_allclose(measured['fbank_sum'], float(audio.load_fbank(six_seconds).sum()), rtol=1e-5)


@pytest.mark.slow  # librosa's first import can take tens of seconds on a busy machine
def test_formats_libsndfile_cannot_read_go_through_librosa_whole(tmp_path):
  import shutil
  import subprocess
  if not shutil.which('ffmpeg'):
    pytest.skip('ffmpeg is needed to write an ALAC .m4a')
  soundfile.write(tmp_path / 'a.wav', _as_int16(_speech_like(16000, 2.0)), 16000, subtype='PCM_16')
  subprocess.run(['ffmpeg', '-loglevel', 'error', '-y', '-i', tmp_path / 'a.wav', '-c:a', 'alac', tmp_path / 'a.m4a'],
                 check=True, timeout=60)
  with pytest.raises(soundfile.LibsndfileError):
    soundfile.info(str(tmp_path / 'a.m4a'))
  # ALAC is lossless, and audioread hands librosa the same 16-bit samples
  np.testing.assert_array_equal(audio.load_fbank(tmp_path / 'a.m4a'), audio.load_fbank(tmp_path / 'a.wav'))
