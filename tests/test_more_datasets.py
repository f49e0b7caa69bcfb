"""The CREMA-D, RAVDESS and FERV39k builders on miniature datasets in their owners' layouts and file names.

The videos are made here with PyAV from the frames of the shared face-and-speech fixture (scaled to 64 px, 1 s at
25 fps): CREMA-D as .flv (flv1) with separate wavs, RAVDESS as .mp4 (H.264 + AAC). Checked: the protocols' fold
membership (which actors each fold tests, none in both splits), labels from the file names, the builders' counts
(clips, no face, no audio, unreadable, left out by the protocol), predict's face rule on the stored frames, the
fbank of the right audio, resumability, and the records read back through the input pipeline.
"""
import importlib
import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import soundfile
from conftest import FIXTURES
from conftest import require_fixture

from configs import cremad as cremad_config
from configs import ferv39k as ferv39k_config
from configs import ravdess as ravdess_config
from data import common
from data import faces_from_video
from data.cremad import cremad_dataset_builder as cremad
from data.ferv39k import ferv39k_dataset_builder as ferv39k
from data.ravdess import ravdess_dataset_builder as ravdess
from mma_dfer_jax import audio as audio_lib
from mma_dfer_jax import faces
from mma_dfer_jax import frames as frames_lib
from mma_dfer_jax import input_pipeline
from mma_dfer_jax import labels
from mma_dfer_jax import video as video_lib

# The command-line modules `python -m data.<name>.build` runs, each also callable as data.<name>.build(...).
cremad_build = importlib.import_module('data.cremad.build')
ravdess_build = importlib.import_module('data.ravdess.build')
ferv39k_build = importlib.import_module('data.ferv39k.build')
FIXTURE_VIDEO = FIXTURES / 'audio' / 'clip_face_speech.mp4'
SIZE, FPS, FRAMES = 64, 25, 25


# ---------------------------------------------------------------------------------------------------------------
# Miniature videos.

def load_face_frames(num_frames=FRAMES):
  """num_frames frames (64 px) of a real talking face, and the fixture's first second of speech (mono float32, its
  rate). Also used by tests/test_dataset_runs.py."""
  require_fixture(FIXTURE_VIDEO)
  frames = [cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
            for _, f in zip(range(num_frames), video_lib.iter_frames(FIXTURE_VIDEO))]
  samples, rate = video_lib.read_audio(FIXTURE_VIDEO)
  return np.stack(frames), samples[0, :rate].astype(np.float32), rate


@pytest.fixture(scope='module')
def face_frames():
  """25 frames (64 px) of a real talking face, and the fixture's speech (mono float32, its rate)."""
  return load_face_frames()


def write_video(path: Path, frames: np.ndarray, codec: str, audio=None):
  """frames (T, H, W, 3) uint8 at FPS into path; audio (mono float32 samples, rate) as an AAC track."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), 'w') as container:
    stream = container.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    track = None
    if audio is not None:
      samples, rate = audio
      track = container.add_stream('aac', rate=rate)
      track.layout = 'mono'
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format='rgb24')))
    container.mux(stream.encode())
    if track is not None:
      block = 1024
      for start in range(0, len(samples), block):
        chunk = samples[start:start + block][None]
        audio_frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format='fltp', layout='mono')
        audio_frame.sample_rate = rate
        audio_frame.pts = start
        container.mux(track.encode(audio_frame))
      container.mux(track.encode())


def faceless(seed: int) -> np.ndarray:
  """Smooth coloured noise: no face in any frame."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (FRAMES, 4, 4, 3), dtype=np.uint8)
  return np.stack([cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) for f in small])


def shifted(frames: np.ndarray, k: int) -> np.ndarray:
  """The clip starting k frames later (wrapping), so that clips differ."""
  return np.roll(frames, -k, axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Helpers over built records.

def tiny_config(module, data_dir, fold=1):
  config = module.get_config()
  config.data_dir, config.fold = str(data_dir), fold
  config.batch_size, config.eval_batch_size, config.num_epochs = 2, 2, 1
  config.model.img_size, config.model.num_frames = 32, 16
  config.input.read_threads, config.input.prefetch = 1, 1
  return config


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def records(config, split):
  source = input_pipeline.get_source(config, split)
  return {_text(source[i]['id']): source[i] for i in range(len(source))}


def eval_labels(config):
  """{id: label} of every test clip through create_eval_iterator (each exactly once)."""
  source = input_pipeline.get_source(config, 'test')
  seen = {}
  for batch in input_pipeline.create_eval_iterator(config):
    assert batch['video'].shape == (2, 16, 32, 32, 3) and batch['audio'].shape == (2, 512, 128)
    for index, real, label in zip(batch['index'], batch['mask'], batch['label']):
      if real:
        clip_id = _text(source[int(index)]['id'])
        assert clip_id not in seen
        seen[clip_id] = int(label)
  assert len(seen) == len(source)
  return seen


def metadata(version_dir: Path) -> dict:
  return json.loads((version_dir / 'metadata.json').read_text())


# ---------------------------------------------------------------------------------------------------------------
# CREMA-D.

CREMAD_CLIPS = {  # stem -> what its video is
    '1001_DFA_ANG_XX': 'face', '1001_IEO_HAP_HI': 'face',
    '1018_ITS_SAD_XX': 'face', '1019_DFA_FEA_XX': 'face', '1019_MTI_NEU_XX': 'no face',
    '1076_MTI_NEU_XX': 'face',  # one of the four HiCMAE leaves out as broken
    '1090_TAI_DIS_XX': 'unreadable', '1091_WSI_HAP_LO': 'face', '1091_IWW_ANG_MD': 'face'}
CREMAD_NO_WAV = '1001_IEO_HAP_HI'


def make_cremad(root: Path, face_frames) -> Path:
  frames, speech, rate = face_frames
  for k, (stem, kind) in enumerate(CREMAD_CLIPS.items()):
    flv = root / 'VideoFlash' / f'{stem}.flv'
    if kind == 'unreadable':
      flv.parent.mkdir(parents=True, exist_ok=True)
      flv.write_bytes(b'FLV\x01 this is not a video' * 20)
    else:
      write_video(flv, shifted(frames, k) if kind == 'face' else faceless(k), 'flv')
    if stem != CREMAD_NO_WAV:
      (root / 'AudioWAV').mkdir(parents=True, exist_ok=True)
      soundfile.write(root / 'AudioWAV' / f'{stem}.wav', np.roll(speech, 400 * k), rate)
  return root


@pytest.fixture(scope='module')
def built_cremad(tmp_path_factory, face_frames):
  root = tmp_path_factory.mktemp('cremad')
  manual = make_cremad(root / 'CREMA-D', face_frames)
  assert cremad_build.main(['--manual_dir', str(manual), '--data_dir', str(root / 'out'), '--folds', '1,5',
                            '--workers', '1']) == 0
  return manual, root / 'out'


def test_cremad_folds_are_hicmaes_actor_blocks():
  assert [cremad.test_actors(k)[0] for k in range(1, 6)] == [1001, 1019, 1037, 1055, 1073]
  assert [len(cremad.test_actors(k)) for k in range(1, 6)] == [18, 18, 18, 18, 19]
  assert cremad.test_actors(5)[-1] == 1091
  assert sorted(a for k in range(1, 6) for a in cremad.test_actors(k)) == list(range(1001, 1092))


def test_cremad_fold_membership_labels_and_counts(built_cremad):
  _, out = built_cremad
  for fold, test_ids in ((1, {'1001_DFA_ANG_XX', '1001_IEO_HAP_HI', '1018_ITS_SAD_XX'}),
                         (5, {'1091_WSI_HAP_LO', '1091_IWW_ANG_MD'})):
    config = tiny_config(cremad_config, out, fold)
    train, test = records(config, 'train'), records(config, 'test')
    assert set(test) == test_ids
    train_actors, test_actors = {k[:4] for k in train}, {k[:4] for k in test}
    assert not train_actors & test_actors
    assert all(cremad.fold_of_actor(int(a)) == fold for a in test_actors)
    assert all(cremad.fold_of_actor(int(a)) != fold for a in train_actors)
    # The label is the file name's emotion code, in HiCMAE's order.
    for clip_id, record in {**train, **test}.items():
      assert labels.CREMAD_CLASSES[int(record['label'])] == {
          'ANG': 'anger', 'DIS': 'disgust', 'FEA': 'fear', 'HAP': 'happy', 'NEU': 'neutral',
          'SAD': 'sad'}[clip_id.split('_')[2]]
    assert eval_labels(config) == {k: int(r['label']) for k, r in test.items()}
  report = metadata(out / 'cremad' / 'fold5' / '1.0.0')
  test, train = report['fold5_test'], report['fold5_train']
  # Fold 5 tests 1073..1091: the broken 1076 clip, the unreadable 1090 clip and the two 1091 clips.
  assert test['clips'] == 4 and test['stored'] == 2
  assert set(test['excluded']) == {'1076_MTI_NEU_XX', '1090_TAI_DIS_XX'}
  assert 'broken' in test['excluded']['1076_MTI_NEU_XX']
  assert '1090_TAI_DIS_XX.flv' in test['excluded']['1090_TAI_DIS_XX']
  assert train['clips'] == 5 and train['stored'] == 5 and not train['excluded']
  assert train['no_face'] == ['1019_MTI_NEU_XX'] and test['no_face'] == []
  assert list(train['silent_audio']) == [CREMAD_NO_WAV]


def test_cremad_frames_are_predicts_face_crops_and_audio_the_wav(built_cremad, face_frames):
  manual, out = built_cremad
  train = records(tiny_config(cremad_config, out, 5), 'train')
  record = train['1001_DFA_ANG_XX']
  stored = [frames_lib.decode_frame(bytes(b)) for b in record['frames']]
  assert len(stored) == int(record['num_frames']) == FRAMES  # every frame, at the video's rate
  decoded = np.stack(list(video_lib.iter_frames(manual / 'VideoFlash' / '1001_DFA_ANG_XX.flv')))
  expected, detected = faces.face_crops(decoded, faces_from_video.FACE_SIZE, smooth=True)  # what predict does
  assert detected
  assert np.abs(np.stack(stored).astype(int) - expected.astype(int)).mean() < 3  # JPEG quality 95
  centre = faces.resize_crop(faces.crop_box(decoded[0], None), faces_from_video.FACE_SIZE)
  assert np.abs(stored[0].astype(int) - centre.astype(int)).mean() > 10  # a face crop, not the centre square
  assert bool(record['has_audio'])
  np.testing.assert_allclose(record['fbank'], audio_lib.load_fbank(manual / 'AudioWAV' / '1001_DFA_ANG_XX.wav'))
  no_wav = train[CREMAD_NO_WAV]
  assert not bool(no_wav['has_audio'])
  np.testing.assert_array_equal(no_wav['fbank'], audio_lib.silent_fbank())


def test_cremad_another_fold_reuses_the_cached_faces(built_cremad):
  manual, out = built_cremad
  summary = out / 'downloads' / 'cremad_faces' / '1001_DFA_ANG_XX' / faces_from_video.SUMMARY_FILE
  stamp = summary.stat().st_mtime_ns
  version_dir = out / 'cremad' / 'fold1' / '1.0.0'
  fold1 = {p: p.stat().st_mtime_ns for p in version_dir.iterdir()}
  built = cremad_build(manual, out, folds=[1, 2])  # fold 1 reused as it is, fold 2 from the cached crops
  assert built[2] == out / 'cremad' / 'fold2' / '1.0.0'
  assert summary.stat().st_mtime_ns == stamp
  assert {p: p.stat().st_mtime_ns for p in version_dir.iterdir()} == fold1
  assert set(records(tiny_config(cremad_config, out, 2), 'test')) == {'1019_DFA_FEA_XX', '1019_MTI_NEU_XX'}


def test_cremad_bad_names_and_flags(tmp_path):
  (tmp_path / 'VideoFlash').mkdir()
  (tmp_path / 'VideoFlash' / '1001_DFA_XYZ_XX.flv').write_bytes(b'')
  with pytest.raises(common.AnnotationError, match=r"1001_DFA_XYZ_XX\.flv: unknown emotion code 'XYZ'"):
    common.build(cremad.Cremad, tmp_path, tmp_path / 'out', [1])
  (tmp_path / 'VideoFlash' / '1001_DFA_XYZ_XX.flv').rename(tmp_path / 'VideoFlash' / 'clip.flv')
  with pytest.raises(common.AnnotationError, match=r'clip\.flv: not a CREMA-D clip name'):
    common.build(cremad.Cremad, tmp_path, tmp_path / 'out', [1])
  assert not list((tmp_path / 'out').glob('cremad/**/dataset_info.json'))
  assert cremad_build.main(['--manual_dir', str(tmp_path), '--data_dir', str(tmp_path / 'out'),
                            '--folds', '6']) == 2


# ---------------------------------------------------------------------------------------------------------------
# RAVDESS.

RAVDESS_ACTORS = (1, 4, 5, 24)


def make_ravdess(root: Path, face_frames) -> Path:
  """Two audio-video speech clips for each of actors 1, 4, 5 and 24 (actor 5's second has no audio track); a
  video-only copy and a song clip that the builder must skip."""
  frames, speech, rate = face_frames
  k = 0
  for actor in RAVDESS_ACTORS:
    for emotion, statement in ((actor % 8 + 1, 1), ((actor + 3) % 8 + 1, 2)):
      name = f'01-01-{emotion:02d}-01-{statement:02d}-01-{actor:02d}.mp4'
      audio = None if (actor, statement) == (5, 2) else (np.roll(speech, 500 * k), rate)
      write_video(root / f'Actor_{actor:02d}' / name, shifted(frames, k), 'h264', audio)
      k += 1
  write_video(root / 'Actor_01' / '02-01-03-01-01-01-01.mp4', frames, 'h264')  # video-only copy
  write_video(root / 'Actor_01' / '01-02-03-01-01-01-01.mp4', frames, 'h264', (speech, rate))  # song
  return root


@pytest.fixture(scope='module')
def built_ravdess(tmp_path_factory, face_frames):
  root = tmp_path_factory.mktemp('ravdess')
  manual = make_ravdess(root / 'RAVDESS', face_frames)
  built = ravdess_build(manual, root / 'out', folds=[1, 6])
  return manual, root / 'out', built


def test_ravdess_folds_are_four_actors_each():
  assert [ravdess.test_actors(k) for k in (1, 2, 6)] == [[1, 2, 3, 4], [5, 6, 7, 8], [21, 22, 23, 24]]
  assert sorted(ravdess.fold_of_actor(a) for a in range(1, 25)) == [k for k in range(1, 7) for _ in range(4)]
  assert ravdess.Ravdess.NUM_FOLDS == 6 and input_pipeline.num_folds('ravdess') == 6


def test_ravdess_fold_membership_labels_and_audio(built_ravdess):
  manual, out, built = built_ravdess
  assert built == {1: out / 'ravdess' / 'fold1' / '1.0.0', 6: out / 'ravdess' / 'fold6' / '1.0.0'}
  for fold in (1, 6):
    config = tiny_config(ravdess_config, out, fold)
    train, test = records(config, 'train'), records(config, 'test')
    actors = lambda ids: {int(i.split('-')[6]) for i in ids}
    assert actors(test) == {a for a in RAVDESS_ACTORS if ravdess.fold_of_actor(a) == fold}
    assert actors(train) == {a for a in RAVDESS_ACTORS if ravdess.fold_of_actor(a) != fold}
    assert len(train) + len(test) == 8  # the video-only copy and the song are not clips
    assert all(i.startswith('01-01-') for i in {**train, **test})
    for clip_id, record in {**train, **test}.items():
      assert int(record['label']) == int(clip_id.split('-')[2]) - 1
    assert eval_labels(config) == {k: int(r['label']) for k, r in test.items()}
  train = records(tiny_config(ravdess_config, out, 1), 'train')
  with_audio = train['01-01-06-01-01-01-05']
  wav = out / 'downloads' / 'ravdess_wav' / '01-01-06-01-01-01-05.wav'
  assert bool(with_audio['has_audio']) and wav.is_file()
  np.testing.assert_allclose(with_audio['fbank'], audio_lib.load_fbank(wav))
  assert soundfile.info(wav).samplerate == 48000  # the track's own rate, kept
  silent = train['01-01-01-01-02-01-05']
  assert not bool(silent['has_audio'])
  report = metadata(out / 'ravdess' / 'fold1' / '1.0.0')['fold1_train']
  assert report['clips'] == 4 and report['stored'] == 4 and list(report['silent_audio']) == ['01-01-01-01-02-01-05']
  assert 'no audio track' in report['silent_audio']['01-01-01-01-02-01-05'] and report['no_face'] == []


def test_ravdess_fold_6_reads_and_fold_7_is_refused(built_ravdess, tmp_path):
  manual, out, _ = built_ravdess
  assert len(input_pipeline.get_source(tiny_config(ravdess_config, out, 6), 'test')) == 2
  with pytest.raises(ValueError, match=r'config\.fold=7: .*folds are numbered 1\.\.6'):
    input_pipeline.get_source(tiny_config(ravdess_config, out, 7), 'test')
  assert ravdess_build.main(['--manual_dir', str(manual), '--data_dir', str(tmp_path), '--folds', '7']) == 2


# ---------------------------------------------------------------------------------------------------------------
# FERV39k.

FERV39K_TRAIN = {'Crime/Angry/0063': 'Angry', 'DailyLife/Happy/0619': 'Happy', 'Argue/Surprise/0196': 'Surprise',
                 'Action/Fear/0001': 'fear'}
FERV39K_TEST = {'Interview/Happy/0118': 'Happy', 'Social/Disgust/0005': 'Disgust', 'Crime/Angry/0064': 'Angry'}


def make_ferv39k(root: Path) -> Path:
  for k, clip in enumerate([*FERV39K_TRAIN, *FERV39K_TEST]):
    folder = root / '2_ClipsforFaceCrop' / clip
    folder.mkdir(parents=True)
    for t in range(6 + k):
      image = np.full((24, 24, 3), 10 * t + k, np.uint8)
      (folder / f'{t + 1:04d}.jpg').write_bytes(cv2.imencode('.jpg', image)[1].tobytes())
  setups = root / '4_setups' / 'All_scenes'
  setups.mkdir(parents=True)
  (setups / 'train_All.csv').write_text(''.join(f'{c} {n}\n' for c, n in FERV39K_TRAIN.items()))
  (setups / 'test_All.csv').write_text(''.join(f'{c} {n}\n' for c, n in FERV39K_TEST.items()))
  return root


def test_ferv39k_official_split_as_fold_1_without_audio(tmp_path):
  manual = make_ferv39k(tmp_path / 'FERV39k')
  assert ferv39k_build.main(['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'out'),
                             '--workers', '1']) == 0
  config = tiny_config(ferv39k_config, tmp_path / 'out')
  train, test = records(config, 'train'), records(config, 'test')
  index = {n.lower(): k for k, n in enumerate(('happy', 'sad', 'neutral', 'angry', 'surprise', 'disgust', 'fear'))}
  assert {k: int(r['label']) for k, r in train.items()} == {c: index[n.lower()] for c, n in FERV39K_TRAIN.items()}
  assert eval_labels(config) == {c: index[n.lower()] for c, n in FERV39K_TEST.items()}
  assert labels.class_names('ferv39k', 7)[index['angry']] == 'anger'
  record = train['Argue/Surprise/0196']
  folder = manual / '2_ClipsforFaceCrop' / 'Argue' / 'Surprise' / '0196'
  assert [bytes(b) for b in record['frames']] == [p.read_bytes() for p in sorted(folder.iterdir())]
  assert all(not bool(r['has_audio']) for r in {**train, **test}.values())
  np.testing.assert_array_equal(record['fbank'], audio_lib.silent_fbank())
  report = metadata(tmp_path / 'out' / 'ferv39k' / 'fold1' / '1.0.0')
  assert report['fold1_train']['stored'] == 4 and report['fold1_test']['stored'] == 3
  assert not report['fold1_train']['silent_audio']  # no audio is the dataset, not a clip's fault
  with pytest.raises(ValueError, match=r'config\.fold=2: .*folds are numbered 1\.\.1'):
    input_pipeline.get_source(tiny_config(ferv39k_config, tmp_path / 'out', 2), 'test')
  assert ferv39k_build.main(['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'out'), '--folds', '2']) == 2


def test_ferv39k_bad_list_line_names_file_and_line(tmp_path):
  manual = make_ferv39k(tmp_path / 'FERV39k')
  (manual / '4_setups' / 'All_scenes' / 'test_All.csv').write_text('Crime/Angry/0064 Angry\nSocial/Joy/0001 Joy\n')
  with pytest.raises(common.AnnotationError, match=r"test_All\.csv:2: unknown class 'Joy'"):
    common.build(ferv39k.Ferv39k, manual, tmp_path / 'out', [1])
  assert not list((tmp_path / 'out').glob('ferv39k/**/dataset_info.json'))


def test_configs_name_the_datasets_classes():
  for module, dataset, classes, folds in ((cremad_config, 'cremad', 6, 5), (ravdess_config, 'ravdess', 8, 6),
                                          (ferv39k_config, 'ferv39k', 7, 1)):
    config = module.get_config()
    assert config.dataset == dataset and config.model.num_classes == classes and config.fold == 1
    assert input_pipeline.num_folds(dataset) == folds
    assert len(labels.class_names(dataset, classes)) == classes
    assert not labels.class_names(dataset, classes)[0].startswith('class_')
