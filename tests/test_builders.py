"""The DFEW and MAFW builders on miniature datasets in their official layouts, read back by the input pipeline."""
import json
from pathlib import Path
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import soundfile
from conftest import FIXTURES
from conftest import require_fixture

from configs import dfew as dfew_config
from configs import mafw as mafw_config
from data import common
from data import extract_audio
from data.dfew import dfew_dataset_builder as dfew
from data.mafw import mafw_dataset_builder as mafw
from mma_dfer_jax import audio as audio_lib
from mma_dfer_jax import input_pipeline
from mma_dfer_jax import labels

FIXTURE_VIDEO = FIXTURES / 'audio' / 'clip_face_speech.mp4'


# ---------------------------------------------------------------------------------------------------------------
# Miniature datasets.

def write_frames(folder: Path, count: int, seed: int, name=lambda k: f'{k}.jpg'):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for k in range(count):
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    ok, data = cv2.imencode('.jpg', image)
    assert ok
    (folder / name(k)).write_bytes(data.tobytes())


def write_tone(path: Path, freq: float, rate: int = 16000, seconds: float = 0.6):
  path.parent.mkdir(parents=True, exist_ok=True)
  t = np.arange(int(rate * seconds)) / rate
  soundfile.write(path, 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32), rate)


def make_dfew(root: Path, video: bool = False) -> Path:
  """Clips 1..6 train, 7..9 test; 00003 has 10 frames; 00005 has none; 00008 has a corrupt frame; 00009 has no
  wav (its original clip, when video=True)."""
  clips = root / 'Clip' / 'clip_224x224'
  for number in range(1, 10):
    clip_id = f'{number:05d}'
    count = {3: 10, 5: 0}.get(number, 20)
    write_frames(clips / clip_id, count, number, lambda k, c=clip_id: f'{c}_{k + 1:05d}.jpg')
    if count == 0:
      (clips / clip_id).mkdir(parents=True, exist_ok=True)
    if number != 9:
      write_tone(root / 'Clip' / 'raw_wav' / f'{number}.wav', 200.0 * number)
  (clips / '00008' / '00008_00004.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
  if video:
    (root / 'Clip' / 'original').mkdir(parents=True)
    shutil.copy(FIXTURE_VIDEO, root / 'Clip' / 'original' / '00009.mp4')
  splits = root / 'EmoLabel_DataSplit'
  write_text(splits / 'train(single-labeled)' / 'set_1.csv',
             'video_name,label\n1,1\n2,2\n3,3\n4,4\n5,5\n6,7\n')
  write_text(splits / 'test(single-labeled)' / 'set_1.csv', 'video_name,label\n7,1\n8,6\n9,2\n')
  return root


def make_mafw(root: Path) -> Path:
  """Clips 00001..00006 train, 00007..00009 test; 00002 has 5 frames; 00007 has neither wav nor clip."""
  for number in range(1, 10):
    clip_id = f'{number:05d}'
    write_frames(root / 'clips_faces' / clip_id, 5 if number == 2 else 12, 100 + number)
    if number != 7:
      write_tone(root / 'clips_wav' / f'{clip_id}.wav', 150.0 * number)
  sets = root / 'Train & Test Set' / 'single' / 'no_caption' / 'set_1'
  write_text(sets / 'train.txt', '00001.mp4 anger\n00002.mp4 disappointment\n00003.mp4 neutral\n'
                                 '00004.mp4 Contempt\n00005.mp4 fear\n00006.mp4 sadness\n')
  write_text(sets / 'test.txt', '00007.mp4 happiness\n00008.mp4 anxiety\n00009.mp4 surprise\n')
  return root


def write_text(path: Path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def tiny_config(module, data_dir):
  config = module.get_config()
  config.data_dir = str(data_dir)
  config.fold = 1
  config.batch_size, config.eval_batch_size, config.num_epochs = 2, 2, 1
  config.model.img_size, config.model.num_frames = 32, 16
  config.input.read_threads, config.input.prefetch = 1, 1
  return config


def eval_ids_and_labels(config):
  source = input_pipeline.get_source(config, 'test')
  seen = {}
  for batch in input_pipeline.create_eval_iterator(config):
    assert batch['video'].shape == (2, 16, 32, 32, 3) and batch['video'].dtype == np.uint8
    assert batch['audio'].shape == (2, 512, 128)
    for index, real, label in zip(batch['index'], batch['mask'], batch['label']):
      if real:
        record = source[int(index)]
        seen[_text(record['id'])] = int(label)
        assert int(label) == int(record['label'])
  return seen, len(source)


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope='module')
def built_dfew(tmp_path_factory):
  root = tmp_path_factory.mktemp('dfew')
  manual = make_dfew(root / 'DFEW', video=FIXTURE_VIDEO.is_file())
  built = common.build(dfew.Dfew, manual, root / 'out', [1], workers=1)
  return manual, root / 'out', built[1]


@pytest.fixture(scope='module')
def built_mafw(tmp_path_factory):
  root = tmp_path_factory.mktemp('mafw')
  manual = make_mafw(root / 'MAFW')
  built = common.build(mafw.Mafw, manual, root / 'out', [1], workers=2)
  return manual, root / 'out', built[1]


# ---------------------------------------------------------------------------------------------------------------
# DFEW.

def test_dfew_fold_reads_back_through_the_pipeline(built_dfew):
  _, out, version_dir = built_dfew
  assert version_dir == out / 'dfew' / 'fold1' / '1.0.0'
  config = tiny_config(dfew_config, out)
  batch = next(input_pipeline.create_train_iterator(config))
  assert batch['video'].shape == (2, 16, 32, 32, 3) and batch['audio'].shape == (2, 512, 128)
  assert input_pipeline.steps_per_epoch(config) == 2  # 5 usable train clips // 2
  seen, size = eval_ids_and_labels(config)
  assert size == 2 and seen == {'00007': 0, '00009': 1}  # 00008 (a corrupt frame) left out


def test_dfew_records_hold_the_files_as_they_are(built_dfew):
  manual, out, _ = built_dfew
  source = input_pipeline.get_source(tiny_config(dfew_config, out), 'train')
  records = {_text(source[i]['id']): source[i] for i in range(len(source))}
  assert sorted(records) == ['00001', '00002', '00003', '00004', '00006']
  assert {k: int(r['label']) for k, r in records.items()} == {
      '00001': 0, '00002': 1, '00003': 2, '00004': 3, '00006': 6}
  short = records['00003']
  folder = manual / 'Clip' / 'clip_224x224' / '00003'
  assert [bytes(b) for b in short['frames']] == [(folder / n).read_bytes() for n in sorted(p.name for p in
                                                                                          folder.iterdir())]
  assert int(short['num_frames']) == 10 and bool(short['has_audio'])
  np.testing.assert_allclose(short['fbank'], audio_lib.load_fbank(manual / 'Clip' / 'raw_wav' / '3.wav'))


def test_dfew_bad_clips_are_left_out_counted_and_listed(built_dfew):
  _, _, version_dir = built_dfew
  metadata = json.loads((version_dir / 'metadata.json').read_text())
  train, test = metadata['fold1_train'], metadata['fold1_test']
  assert train['clips'] == 6 and train['stored'] == 5 and list(train['excluded']) == ['00005']
  assert 'no image files' in train['excluded']['00005']
  assert list(test['excluded']) == ['00008'] and '00008_00004.jpg' in test['excluded']['00008']


@pytest.mark.skipif(not FIXTURE_VIDEO.is_file(), reason='needs the shared fixture clip')
def test_dfew_missing_wav_is_extracted_from_the_original_clip(built_dfew):
  _, out, _ = built_dfew
  source = input_pipeline.get_source(tiny_config(dfew_config, out), 'test')
  record = next(source[i] for i in range(len(source)) if _text(source[i]['id']) == '00009')
  cached = out / 'downloads' / 'dfew_wav' / '00009.wav'
  assert cached.is_file() and bool(record['has_audio'])
  np.testing.assert_allclose(record['fbank'], audio_lib.load_fbank(cached))


def test_rebuild_reuses_a_complete_fold_and_clears_an_interrupted_one(built_dfew):
  manual, out, version_dir = built_dfew
  stamp = {p: p.stat().st_mtime_ns for p in version_dir.iterdir()}
  stale = version_dir.parent / 'incomplete.ABC123_1.0.0'
  stale.mkdir()
  (stale / 'dataset_info.json').write_text('{}')
  assert common.build(dfew.Dfew, manual, out, [1])[1] == version_dir
  assert not stale.exists()
  assert {p: p.stat().st_mtime_ns for p in version_dir.iterdir()} == stamp


# ---------------------------------------------------------------------------------------------------------------
# MAFW.

def test_mafw_fold_reads_back_and_eval_covers_each_clip_once(built_mafw):
  _, out, version_dir = built_mafw
  assert version_dir == out / 'mafw' / 'fold1' / '2.0.0'
  config = tiny_config(mafw_config, out)
  batches = list(input_pipeline.create_train_iterator(config))
  assert len(batches) == 3 and all(b['video'].shape == (2, 16, 32, 32, 3) for b in batches)
  # The reference's indices: anger 3, disappointment 10, neutral 2, contempt 7, fear 6, sadness 1.
  assert sorted(int(l) for b in batches for l in b['label']) == [1, 2, 3, 6, 7, 10]
  seen, size = eval_ids_and_labels(config)
  assert size == 3 and seen == {'00007': 0, '00008': 8, '00009': 4}  # happiness, anxiety, surprise


def test_mafw_clip_without_audio_gets_the_silent_fbank(built_mafw):
  manual, out, version_dir = built_mafw
  source = input_pipeline.get_source(tiny_config(mafw_config, out), 'test')
  records = {_text(source[i]['id']): source[i] for i in range(len(source))}
  assert not bool(records['00007']['has_audio']) and bool(records['00008']['has_audio'])
  np.testing.assert_array_equal(records['00007']['fbank'], audio_lib.silent_fbank())
  metadata = json.loads((version_dir / 'metadata.json').read_text())
  assert list(metadata['fold1_test']['silent_audio']) == ['00007'] and not metadata['fold1_test']['excluded']
  # MAFW frames 0.jpg .. 11.jpg in string order: 10.jpg and 11.jpg come right after 1.jpg.
  folder = manual / 'clips_faces' / '00008'
  names = ['0.jpg', '1.jpg', '10.jpg', '11.jpg'] + [f'{k}.jpg' for k in range(2, 10)]
  assert [bytes(b) for b in records['00008']['frames']] == [(folder / n).read_bytes() for n in names]


# ---------------------------------------------------------------------------------------------------------------
# Split files and annotation lists.

def test_bad_split_lines_name_the_file_and_line(tmp_path):
  csv_path = tmp_path / 'set_1.csv'
  csv_path.write_text('video_name,label\n1,1\n2,8\n')
  with pytest.raises(common.AnnotationError, match=r'set_1\.csv:3: label 8 is outside 1\.\.7'):
    dfew.read_split_csv(csv_path)
  csv_path.write_text('video_name,label\n1,1\nclip,2\n')
  with pytest.raises(common.AnnotationError, match=r'set_1\.csv:3'):
    dfew.read_split_csv(csv_path)
  txt = tmp_path / 'train.txt'
  txt.write_text('00001.mp4 anger\n00002.mp4 joy\n')
  with pytest.raises(common.AnnotationError, match=r"train\.txt:2: unknown class 'joy'"):
    mafw.read_split_file(txt)
  txt.write_text('00001.mp4\n')
  with pytest.raises(common.AnnotationError, match=r'train\.txt:1'):
    mafw.read_split_file(txt)
  listed = tmp_path / 'DFEW_set_1_train.txt'
  listed.write_text('/x/clip_224x224/00001 20 0\n/x/clip_224x224/00002 20 7\n')
  with pytest.raises(common.AnnotationError, match=r'DFEW_set_1_train\.txt:2: label 7 is outside the 7'):
    common.read_annotation_list(listed, 7)
  listed.write_text('/x/clip_224x224/00001 twenty 0\n')
  with pytest.raises(common.AnnotationError, match=r'DFEW_set_1_train\.txt:1'):
    common.read_annotation_list(listed, 7)


def test_a_bad_split_line_stops_the_build_before_writing(tmp_path):
  manual = make_mafw(tmp_path / 'MAFW')
  (manual / 'Train & Test Set' / 'single' / 'no_caption' / 'set_1' / 'test.txt').write_text('00007.mp4 11\n')
  with pytest.raises(common.AnnotationError, match=r'test\.txt:1'):
    common.build(mafw.Mafw, manual, tmp_path / 'out', [1])
  assert not list((tmp_path / 'out').glob('mafw/**/dataset_info.json'))
  assert common.main(mafw.Mafw, ['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'out'),
                                 '--folds', '1', '--workers', '1']) == 2


def test_reference_annotation_lists_map_onto_manual_dir(tmp_path):
  manual = make_dfew(tmp_path / 'DFEW')
  lists = tmp_path / 'annotation'
  far = '/scratch/someone/dfer_datasets/dfew/clip_224x224'
  write_text(lists / 'DFEW_set_1_train.txt', f'{far}/00001 20 4\n{far}/00002 20 5\n{far}/00006 20 6\n')
  write_text(lists / 'DFEW_set_1_test.txt', f'{far}/00007 20 1\n')
  code = common.main(dfew.Dfew, ['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'out'),
                                 '--folds', '1', '--annotations', str(lists), '--workers', '1'])
  assert code == 0
  config = tiny_config(dfew_config, tmp_path / 'out')
  seen, _ = eval_ids_and_labels(config)
  assert seen == {'00007': 1}
  source = input_pipeline.get_source(config, 'train')
  assert sorted((_text(source[i]['id']), int(source[i]['label'])) for i in range(len(source))) == [
      ('00001', 4), ('00002', 5), ('00006', 6)]


def test_folds_built_separately_are_each_found(tmp_path):
  manual = make_mafw(tmp_path / 'MAFW')
  sets = manual / 'Train & Test Set' / 'single' / 'no_caption'
  shutil.copytree(sets / 'set_1', sets / 'set_2')
  (sets / 'set_2' / 'test.txt').write_text('00009.mp4 surprise\n')
  common.build(mafw.Mafw, manual, tmp_path / 'out', [2])
  common.build(mafw.Mafw, manual, tmp_path / 'out', [1])
  for fold, size in ((1, 3), (2, 1)):
    config = tiny_config(mafw_config, tmp_path / 'out')
    config.fold = fold
    assert len(input_pipeline.get_source(config, 'test')) == size
  config.fold = 3
  with pytest.raises(input_pipeline.DatasetError, match=r'fold 3 of mafw is not built.*--folds 3'):
    input_pipeline.get_source(config, 'train')


def test_clips_with_frames_of_mixed_sizes_are_stored_and_listed(tmp_path):
  manual = make_mafw(tmp_path / 'MAFW')
  write_frames(manual / 'clips_faces' / '00009', 1, 7, lambda k: '3.jpg')  # 24x24, like the rest
  image = np.zeros((30, 30, 3), np.uint8)
  (manual / 'clips_faces' / '00009' / '4.jpg').write_bytes(cv2.imencode('.jpg', image)[1].tobytes())
  version_dir = common.build(mafw.Mafw, manual, tmp_path / 'out', [1])[1]
  test = json.loads((version_dir / 'metadata.json').read_text())['fold1_test']
  assert test['mixed_frame_sizes'] == ['00009'] and test['stored'] == 3


def test_mixed_size_clips_go_through_the_pipeline(tmp_path):
  manual = make_mafw(tmp_path / 'MAFW')
  folder = manual / 'clips_faces' / '00008'  # a test clip: frames 0..11, every other one larger
  for k in range(0, 12, 2):
    image = np.full((40, 36, 3), 20 * k, np.uint8)
    (folder / f'{k}.jpg').write_bytes(cv2.imencode('.jpg', image)[1].tobytes())
  common.build(mafw.Mafw, manual, tmp_path / 'out', [1])
  config = tiny_config(mafw_config, tmp_path / 'out')
  seen, _ = eval_ids_and_labels(config)  # every frame resized on its own
  assert '00008' in seen
  config.input.augment = True
  assert next(input_pipeline.create_train_iterator(config))['video'].shape == (2, 16, 32, 32, 3)


def test_package_build_function_and_tfds_build_command(tmp_path):
  import data.mafw  # pylint: disable=import-outside-toplevel
  import data.mafw.build  # pylint: disable=import-outside-toplevel,unused-import  (rebinds data.mafw.build)
  from data import tfds_build  # pylint: disable=import-outside-toplevel
  manual = make_mafw(tmp_path / 'MAFW')
  built = data.mafw.build(manual, tmp_path / 'a', folds=[1])
  assert built == {1: tmp_path / 'a' / 'mafw' / 'fold1' / '2.0.0'}
  root = Path(__file__).resolve().parents[1]
  assert tfds_build.main([str(root / 'data' / 'mafw'), '--manual_dir', str(manual), '--data_dir',
                          str(tmp_path / 'b'), '--config', 'fold1']) == 0
  files = sorted(p.name for p in (tmp_path / 'b' / 'mafw' / 'fold1' / '2.0.0').iterdir())
  assert 'mafw-fold1_train.array_record-00000-of-00001' in files and 'metadata.json' in files
  for data_dir in ('a', 'b'):
    source = input_pipeline.get_source(tiny_config(mafw_config, tmp_path / data_dir), 'test')
    assert sorted(_text(source[i]['id']) for i in range(len(source))) == ['00007', '00008', '00009']


def test_fbanks_are_cached_for_the_other_folds(tmp_path):
  manual = make_mafw(tmp_path / 'MAFW')
  sets = manual / 'Train & Test Set' / 'single' / 'no_caption'
  shutil.copytree(sets / 'set_1', sets / 'set_2')
  common.build(mafw.Mafw, manual, tmp_path / 'out', [1])
  cache = tmp_path / 'out' / 'downloads' / 'mafw_fbank'
  cached = sorted(cache.glob('00008_*.npy'))
  assert len(cached) == 1 and len(list(cache.glob('*.npy'))) == 8  # 00007 has no audio
  np.testing.assert_array_equal(np.load(cached[0]), audio_lib.load_fbank(manual / 'clips_wav' / '00008.wav'))
  marker = np.full((512, 128), 0.25, np.float32)
  np.save(cached[0], marker)  # fold 2 must take the cached fbank rather than compute it again
  common.build(mafw.Mafw, manual, tmp_path / 'out', [2])
  config = tiny_config(mafw_config, tmp_path / 'out')
  config.fold = 2
  source = input_pipeline.get_source(config, 'test')
  record = next(source[i] for i in range(len(source)) if _text(source[i]['id']) == '00008')
  np.testing.assert_array_equal(record['fbank'], marker)


# ---------------------------------------------------------------------------------------------------------------
# The owners' layouts give the reference's data: MAFW's label order and frame count, DFEW's part folders and audio.

# The reference's MAFW indices (the header comment of its annotation/preprocessing.py), written out here rather
# than read from labels.py so that a wrong order there fails.
REFERENCE_MAFW = {'happiness': 0, 'sadness': 1, 'neutral': 2, 'anger': 3, 'surprise': 4, 'disgust': 5, 'fear': 6,
                  'contempt': 7, 'anxiety': 8, 'helplessness': 9, 'disappointment': 10}


def make_mafw_all_classes(root: Path) -> Path:
  """One train clip per MAFW class (names in MAFW's alphabetical-like order, mixed case), 3 test clips."""
  names = ['Anger', 'disgust', 'FEAR', 'happiness', 'neutral', 'sadness', 'surprise', 'contempt', 'anxiety',
           'helplessness', 'disappointment']
  lines = []
  for k, name in enumerate(names):
    clip_id = f'{k + 1:05d}'
    write_frames(root / 'clips_faces' / clip_id, 6, k)
    write_tone(root / 'clips_wav' / f'{clip_id}.wav', 100.0 + 20 * k)
    lines.append(f'{clip_id}.mp4 {name}')
  for k in range(3):
    write_frames(root / 'clips_faces' / f'{20 + k:05d}', 6, 50 + k)
  sets = root / 'Train & Test Set' / 'single' / 'no_caption' / 'set_1'
  write_text(sets / 'train.txt', '\n'.join(lines) + '\n')
  write_text(sets / 'test.txt', '00020.mp4 happiness\n00021.mp4 Disappointment\n00022.mp4 anger\n')
  return root, dict(zip((f'{k + 1:05d}' for k in range(11)), (n.lower() for n in names)))


def test_mafw_class_names_map_to_the_reference_indices_in_both_build_modes(tmp_path):
  assert labels.class_names('mafw', 11) == tuple(sorted(REFERENCE_MAFW, key=REFERENCE_MAFW.get))
  manual, names = make_mafw_all_classes(tmp_path / 'MAFW')
  assert common.main(mafw.Mafw, ['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'split'),
                                 '--folds', '1', '--workers', '1']) == 0
  config = tiny_config(mafw_config, tmp_path / 'split')
  source = input_pipeline.get_source(config, 'train')
  by_id = {_text(source[i]['id']): int(source[i]['label']) for i in range(len(source))}
  assert by_id == {clip_id: REFERENCE_MAFW[name] for clip_id, name in names.items()}
  # What a confusion matrix, the metrics and predict print for those labels is the name in the split file.
  class_names = labels.class_names(config.dataset, config.model.num_classes)
  assert all(class_names[by_id[clip_id]] == name for clip_id, name in names.items())
  assert eval_ids_and_labels(config)[0] == {'00020': 0, '00021': 10, '00022': 3}
  # The reference's own lists (labels as numbers) give the same records.
  far = '/scratch/someone/dfer_datasets/mfaw/clips_faces'
  lists = tmp_path / 'annotation'
  write_text(lists / 'MAFW_set_1_train_faces.txt',
             ''.join(f'{far}/{clip_id} 5 {REFERENCE_MAFW[name]}\n' for clip_id, name in names.items()))
  write_text(lists / 'MAFW_set_1_test_faces.txt', f'{far}/00020 5 0\n{far}/00021 5 10\n{far}/00022 5 3\n')
  assert common.main(mafw.Mafw, ['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'lists'),
                                 '--folds', '1', '--annotations', str(lists), '--workers', '1']) == 0
  listed = input_pipeline.get_source(tiny_config(mafw_config, tmp_path / 'lists'), 'train')
  assert {_text(listed[i]['id']): int(listed[i]['label']) for i in range(len(listed))} == by_id


def test_an_old_mafw_build_with_the_wrong_label_order_is_refused(tmp_path):
  manual = make_mafw(tmp_path / 'MAFW')
  version_dir = common.build(mafw.Mafw, manual, tmp_path / 'out', [1])[1]
  version_dir.rename(version_dir.with_name('1.0.0'))
  with pytest.raises(input_pipeline.DatasetError, match=r'1\.0\.0 was built by an older version.*rebuild'):
    input_pipeline.get_source(tiny_config(mafw_config, tmp_path / 'out'), 'test')


def _index_frames(folder: Path, count: int):
  """Frames 0.jpg .. count-1.jpg, frame k a flat grey of value 4 + 8k (readable back after JPEG and resizing)."""
  folder.mkdir(parents=True, exist_ok=True)
  for k in range(count):
    image = np.full((24, 24, 3), 4 + 8 * k, np.uint8)
    (folder / f'{k}.jpg').write_bytes(cv2.imencode('.jpg', image)[1].tobytes())


def _frame_numbers(video: np.ndarray) -> list:
  return [int(round((float(frame.mean()) - 4) / 8)) for frame in video]


def _reference_test_picks(num_frames: int, segments: int = 16) -> list:
  """The reference's test-time choice over num_frames (its list's count), written out independently."""
  if num_frames > segments:
    tick = num_frames / float(segments)
    return [int(tick / 2.0 + tick * x) for x in range(segments)]
  return list(range(num_frames)) + [num_frames - 1] * (segments - num_frames)


@pytest.mark.parametrize('files', [30, 12])
def test_mafw_frames_are_the_references_over_one_less_than_the_files(tmp_path, files):
  manual = make_mafw(tmp_path / 'MAFW')
  folder = manual / 'clips_faces' / '00008'  # a test clip
  shutil.rmtree(folder)
  _index_frames(folder, files)
  common.build(mafw.Mafw, manual, tmp_path / 'out', [1])
  config = tiny_config(mafw_config, tmp_path / 'out')
  source = input_pipeline.get_source(config, 'test')
  position = next(i for i in range(len(source)) if _text(source[i]['id']) == '00008')
  record = source[position]
  assert len(record['frames']) == files and int(record['num_frames']) == files - 1
  on_disk = sorted(p.name for p in folder.iterdir())  # string order: 0, 1, 10, 11, ..., 2, ...
  expected = [int(on_disk[i].split('.')[0]) for i in _reference_test_picks(files - 1)]
  video = input_pipeline.test_example(record, config)['video']
  assert _frame_numbers(video) == expected
  assert _frame_numbers(video) != [int(on_disk[i].split('.')[0]) for i in _reference_test_picks(files)]
  # Training never takes the last frame in string order (augmentation off: it changes the pixel values).
  last = int(on_disk[-1].split('.')[0])
  config.input.augment = False
  for seed in range(20):
    train = input_pipeline.train_example(record, np.random.default_rng(seed), config)['video']
    assert last not in _frame_numbers(train)


def make_dfew_parts(root: Path, originals: bool = True) -> Path:
  """DFEW as its archives unpack: clip folders in clip_224x224/clip_224x224_part_<k>/, original clips (with audio
  tracks) in original/part_<k>/<n>.mp4, no raw_wav (DFEW ships none)."""
  clips = root / 'Clip' / 'clip_224x224'
  for number in range(1, 7):
    part = 1 + (number - 1) // 3
    clip_id = f'{number:05d}'
    write_frames(clips / f'clip_224x224_part_{part}' / clip_id, 18, number,
                 lambda k, c=clip_id: f'{c}_{k + 1:05d}.jpg')
    if originals:
      target = root / 'Clip' / 'original' / f'part_{part}' / f'{number}.mp4'
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(FIXTURE_VIDEO, target)
  splits = root / 'EmoLabel_DataSplit'
  write_text(splits / 'train(single-labeled)' / 'set_1.csv', 'video_name,label\n1,1\n2,2\n4,4\n5,5\n')
  write_text(splits / 'test(single-labeled)' / 'set_1.csv', 'video_name,label\n3,7\n6,3\n')
  return root


def test_dfew_in_part_folders_builds_with_audio_from_the_original_parts(tmp_path):
  require_fixture(FIXTURE_VIDEO)
  manual = make_dfew_parts(tmp_path / 'DFEW')
  # The README's command: wavs from original/part_<k>/ into raw_wav, named like the reference's (1.wav).
  assert extract_audio.main(['--src', str(manual / 'Clip' / 'original'), '--dst', str(manual / 'Clip' / 'raw_wav'),
                             '--workers', '1']) == 0
  assert sorted(p.name for p in (manual / 'Clip' / 'raw_wav').glob('*.wav')) == [f'{n}.wav' for n in range(1, 7)]
  assert common.main(dfew.Dfew, ['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'out'),
                                 '--folds', '1', '--workers', '1']) == 0
  version_dir = tmp_path / 'out' / 'dfew' / 'fold1' / '1.0.0'
  metadata = json.loads((version_dir / 'metadata.json').read_text())
  for split, stored in (('fold1_train', 4), ('fold1_test', 2)):
    assert metadata[split]['stored'] == stored and not metadata[split]['excluded']
    assert not metadata[split]['silent_audio']  # none without audio
  config = tiny_config(dfew_config, tmp_path / 'out')
  source = input_pipeline.get_source(config, 'train')
  records = {_text(source[i]['id']): source[i] for i in range(len(source))}
  assert {k: int(r['label']) for k, r in records.items()} == {'00001': 0, '00002': 1, '00004': 3, '00005': 4}
  np.testing.assert_allclose(records['00004']['fbank'], audio_lib.load_fbank(manual / 'Clip' / 'raw_wav' / '4.wav'))
  assert eval_ids_and_labels(config)[0] == {'00003': 6, '00006': 2}


def test_dfew_in_part_folders_extracts_missing_wavs_itself(tmp_path):
  require_fixture(FIXTURE_VIDEO)
  manual = make_dfew_parts(tmp_path / 'DFEW')
  version_dir = common.build(dfew.Dfew, manual, tmp_path / 'out', [1])[1]
  metadata = json.loads((version_dir / 'metadata.json').read_text())
  assert metadata['fold1_train']['stored'] == 4 and not metadata['fold1_train']['silent_audio']
  assert metadata['fold1_test']['stored'] == 2 and not metadata['fold1_test']['silent_audio']
  assert sorted(p.name for p in (tmp_path / 'out' / 'downloads' / 'dfew_wav').glob('*.wav')) == [
      f'{n:05d}.wav' for n in range(1, 7)]


def test_dfew_without_any_audio_stops_with_the_command_that_makes_it(tmp_path):
  manual = make_dfew_parts(tmp_path / 'DFEW', originals=False)
  with pytest.raises(common.AnnotationError, match=r'no DFEW audio.*extract_audio --src .*Clip/original'):
    common.build(dfew.Dfew, manual, tmp_path / 'out', [1])
  assert not list((tmp_path / 'out').glob('dfew/**/dataset_info.json'))


def test_extract_audio_without_videos_is_an_error_not_an_empty_success(tmp_path, capsys):
  (tmp_path / 'original' / 'part_1').mkdir(parents=True)
  assert extract_audio.main(['--src', str(tmp_path / 'original'), '--dst', str(tmp_path / 'wav')]) == 2
  assert 'no video files' in capsys.readouterr().err


@pytest.mark.parametrize('tool', ['extract_audio', 'mafw_crop_faces'])
def test_a_tool_run_as_a_file_names_the_module_command(tool):
  """data/ is importable as a package from the repository root only (nothing edits sys.path): run as a file, a
  tool says how to run it, in one line, exit 2, before importing anything heavy."""
  root = Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, str(root / 'data' / f'{tool}.py'), '--src', 'a', '--dst', 'b'], cwd='/',
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 2 and done.stderr.strip().splitlines() == [
      f'error: run it from the repository root as: python -m data.{tool} --src ... --dst ...']
  assert not [p for p in (root / 'data').rglob('*.py') if 'sys.path' in p.read_text()]


def test_dfew_clip_folders_are_found_in_part_folders_and_twice_is_an_error(tmp_path):
  root = tmp_path / 'Clip' / 'clip_224x224'
  for part, clip_id in ((1, '00001'), (2, '00002')):
    (root / f'clip_224x224_part_{part}' / clip_id).mkdir(parents=True)
  (tmp_path / 'Clip' / 'clip_224x224_part_3' / '00003').mkdir(parents=True)  # a part unpacked beside the folder
  found = common.find_clip_folders(dfew.frame_roots(tmp_path))
  assert {k: v.relative_to(tmp_path).as_posix() for k, v in found.items()} == {
      '00001': 'Clip/clip_224x224/clip_224x224_part_1/00001', '00002': 'Clip/clip_224x224/clip_224x224_part_2/00002',
      '00003': 'Clip/clip_224x224_part_3/00003'}
  (root / 'clip_224x224_part_2' / '00001').mkdir()
  with pytest.raises(common.AnnotationError, match=r'clip 00001 is in two folders'):
    common.find_clip_folders(dfew.frame_roots(tmp_path))


def test_a_wav_with_nan_samples_is_counted_and_never_stored(tmp_path):
  manual = make_mafw(tmp_path / 'MAFW')
  wav = manual / 'clips_wav' / '00008.wav'
  samples = 0.3 * np.sin(np.arange(16000) / 10.0).astype(np.float32)
  samples[100:110] = np.nan
  soundfile.write(wav, samples, 16000, subtype='FLOAT')
  version_dir = common.build(mafw.Mafw, manual, tmp_path / 'out', [1])[1]
  test = json.loads((version_dir / 'metadata.json').read_text())['fold1_test']
  assert test['non_finite_audio'] == ['00008'] and 'not finite' in test['silent_audio']['00008']
  source = input_pipeline.get_source(tiny_config(mafw_config, tmp_path / 'out'), 'test')
  record = next(source[i] for i in range(len(source)) if _text(source[i]['id']) == '00008')
  assert not bool(record['has_audio']) and np.isfinite(record['fbank']).all()


@pytest.mark.slow
def test_a_released_format_mafw_checkpoint_reads_with_the_reference_class_names(tmp_path, reference_small):
  """A released-format MAFW model (the fixture's weights with an 11-way classifier that always answers index 3),
  converted and evaluated on a miniature MAFW build: every prediction is the reference's 'anger', and the clip the
  split file calls anger is the one counted right."""
  from conftest import small_model_config  # pylint: disable=import-outside-toplevel
  from test_pth_reader import _tensor, _write_pth  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import checkpoint, convert, experiment, pth_reader  # pylint: disable=import-outside-toplevel
  tensors = pth_reader.state_dict(pth_reader.load_pth(reference_small / 'model.pth'))
  tensors['module.our_classifier.weight'] = np.zeros((11, 512), np.float32)
  tensors['module.our_classifier.bias'] = np.eye(11, dtype=np.float32)[REFERENCE_MAFW['anger']] * 10
  ops, storages = {}, {}
  for k, (name, array) in enumerate(tensors.items()):
    array = np.ascontiguousarray(array, np.float32)
    strides = tuple(s // 4 for s in array.strides)
    ops[name] = _tensor(str(k), array.size, 0, array.shape, strides)
    storages[str(k)] = array.tobytes()
  released = _write_pth(tmp_path / 'model.pth', ops, storages)
  manual, _ = make_mafw_all_classes(tmp_path / 'MAFW')
  common.build(mafw.Mafw, manual, tmp_path / 'out', [1])
  config = tiny_config(mafw_config, tmp_path / 'out')
  config.model = small_model_config(num_classes=11)
  params = convert.load_released_checkpoint(released, config.model)
  checkpoint.save_params(tmp_path / 'converted', params, config)
  config.init.checkpoint = str(tmp_path / 'converted')
  result = experiment.evaluate_checkpoint(config, tmp_path / 'eval')
  matrix = np.array(result['confusion_matrix'])  # rows: the split files' classes; columns: the model's answers
  anger = labels.class_names('mafw', 11).index('anger')
  assert matrix.sum() == 3 and matrix[:, anger].sum() == 3  # happiness, disappointment, anger: all answered anger
  assert anger == REFERENCE_MAFW['anger']
  for name in ('happiness', 'disappointment', 'anger'):  # each test clip sits in the row of its split-file name
    assert matrix[REFERENCE_MAFW[name]].sum() == 1 and matrix[REFERENCE_MAFW[name], anger] == 1
  assert abs(result['war'] - 100 / 3) < 1e-6
