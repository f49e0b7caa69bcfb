"""The Grain pipeline: global batches independent of the process count, exact resume, eval coverage."""
import numpy as np
import pytest

from configs import demo
from mma_dfer_jax import input_pipeline
from mma_dfer_jax import synthetic


def tiny_config(**overrides):
  config = demo.get_config()
  config.input.synthetic_train_size = 10
  config.input.synthetic_test_size = 5
  config.batch_size, config.eval_batch_size, config.num_epochs = 4, 4, 2
  config.model.img_size = 32
  config.update(overrides)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_shapes_and_epochs():
  config = tiny_config()
  assert input_pipeline.steps_per_epoch(config) == 2  # 10 clips // 4: the remainder is dropped
  batches = list(input_pipeline.create_train_iterator(config))
  assert len(batches) == 4  # 2 epochs x 2 steps, then the iterator ends
  b = batches[0]
  assert b['video'].shape == (4, 16, 32, 32, 3) and b['video'].dtype == np.uint8
  assert b['audio'].shape == (4, 512, 128) and b['audio'].dtype == np.float32
  assert b['label'].dtype == np.int32


def test_global_batches_do_not_depend_on_process_count():
  config = tiny_config()
  whole = take(input_pipeline.create_train_iterator(config, 0, 1), 3)
  halves = [take(input_pipeline.create_train_iterator(config, p, 2), 3) for p in (0, 1)]
  for step in range(3):
    for key in ('video', 'audio', 'label'):
      np.testing.assert_array_equal(whole[step][key],
                                    np.concatenate([halves[0][step][key], halves[1][step][key]]))


def test_epochs_are_shuffled_differently_and_deterministically():
  config = tiny_config()
  first = [b['label'] for b in input_pipeline.create_train_iterator(config)]
  again = [b['label'] for b in input_pipeline.create_train_iterator(config)]
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  orders = [input_pipeline.epoch_order(config.seed, e, 10) for e in (0, 1)]
  assert not np.array_equal(*orders) and sorted(orders[0]) == list(range(10))


def test_iterator_state_resumes_exactly():
  config = tiny_config()
  iterator = input_pipeline.create_train_iterator(config)
  next(iterator)
  state = iterator.get_state()
  expected = take(iterator, 2)
  resumed = input_pipeline.create_train_iterator(config)
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 2)):
    np.testing.assert_array_equal(a['video'], b['video'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_a_resume_at_a_step_on_another_process_count_continues_the_same_global_batches():
  config = tiny_config()
  whole = take(input_pipeline.create_train_iterator(config, 0, 1), 4)  # 2 epochs x 2 steps
  for step in (1, 2, 3):
    halves = [list(input_pipeline.create_train_iterator(config, p, 2, step=step)) for p in (0, 1)]
    assert len(halves[0]) == 4 - step
    for expected, first, second in zip(whole[step:], *halves):
      for key in ('video', 'audio', 'label'):
        np.testing.assert_array_equal(expected[key], np.concatenate([first[key], second[key]]))
  with pytest.raises(input_pipeline.DatasetError, match='step=5'):
    input_pipeline.create_train_iterator(config, step=5)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_yields_every_test_clip_once(process_count):
  config = tiny_config()
  seen = []
  for p in range(process_count):
    for batch in input_pipeline.create_eval_iterator(config, p, process_count):
      assert batch['video'].shape[0] == 4 // process_count
      seen.extend(batch['index'][batch['mask']].tolist())
  assert sorted(seen) == list(range(5))


def test_test_time_sampling_is_deterministic_and_unaugmented():
  config = tiny_config()
  a = next(input_pipeline.create_eval_iterator(config))
  b = next(input_pipeline.create_eval_iterator(config))
  np.testing.assert_array_equal(a['video'], b['video'])


def test_synthetic_dataset_is_balanced_and_reproducible():
  source = synthetic.SyntheticSource(seed=3, split='train', size=12, num_classes=4)
  labels = [source[i]['label'] for i in range(12)]
  assert np.bincount(labels).tolist() == [3, 3, 3, 3]
  synthetic.make_clip.cache_clear()
  again = synthetic.SyntheticSource(seed=3, split='train', size=12, num_classes=4)[5]
  assert again['frames'] == source[5]['frames']
  np.testing.assert_array_equal(again['fbank'], source[5]['fbank'])
  assert min(len(source[i]['frames']) for i in range(12)) >= 12  # some shorter than 16: edge padding


def test_missing_dataset_and_bad_fold_are_clear_errors(tmp_path):
  from configs import dfew
  config = dfew.get_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(input_pipeline.DatasetError, match=r'python -m data\.dfew\.build'):
    input_pipeline.get_source(config, 'train')
  config.fold = 6
  with pytest.raises(ValueError, match=r'config\.fold=6: .*1\.\.5'):  # settings.ConfigError
    input_pipeline.get_source(config, 'train')


def test_frame_indices_is_exported():
  assert input_pipeline.frame_indices(32, train=False).tolist() == [int(1 + 2 * k) for k in range(16)]


def solid_jpeg(value, height=24, width=24):
  import cv2  # pylint: disable=import-outside-toplevel
  return cv2.imencode('.jpg', np.full((height, width, 3), value, np.uint8))[1].tobytes()


def test_short_clips_are_edge_padded():
  config = tiny_config()
  record = {'frames': [solid_jpeg(40 * k) for k in range(5)], 'fbank': np.zeros((512, 128), np.float32),
            'label': 2, 'id': 'short', 'has_audio': True}
  video = input_pipeline.test_example(record, config)['video']
  means = video.reshape(16, -1).mean(axis=1)
  np.testing.assert_allclose(means[:5], [0, 40, 80, 120, 160], atol=2)
  np.testing.assert_array_equal(video[5:], np.broadcast_to(video[4], (11,) + video.shape[1:]))
  train = input_pipeline.train_example(record, np.random.default_rng(0), config)['video']
  assert train.shape == (16, 32, 32, 3)
  bright = train.reshape(16, -1).mean(axis=1)
  assert np.all(np.diff(bright[:5]) > 0) and np.ptp(bright[4:]) == 0  # frames 0..4 in order, then the last


def test_frames_of_different_sizes_are_cut_like_pil_crops():
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((30, 40, 3), (24, 50, 3), (36, 32, 3))]
  stacked = input_pipeline.stack_for_crop(frames)
  assert stacked.shape == (3, 30, 40, 3)
  x, y, w, h = 5, 8, 33, 22  # a box inside the first frame, outside the others in places
  for frame, fitted in zip(frames, stacked):
    expected = np.asarray(Image.fromarray(frame).crop((x, y, x + w, y + h)))
    np.testing.assert_array_equal(fitted[y:y + h, x:x + w], expected)
  resized = input_pipeline.resize_each(frames, 16)
  assert resized.shape == (3, 16, 16, 3)
  np.testing.assert_array_equal(resized[1], np.asarray(Image.fromarray(frames[1]).resize((16, 16), Image.BILINEAR)))


def test_batches_do_not_depend_on_threads_and_do_depend_on_the_seed():
  config = tiny_config()
  config.input.read_threads = 1
  one = take(input_pipeline.create_train_iterator(config), 3)
  config.input.read_threads, config.input.prefetch = 3, 4
  three = take(input_pipeline.create_train_iterator(config), 3)
  for a, b in zip(one, three):
    for key in ('video', 'audio', 'label'):
      np.testing.assert_array_equal(a[key], b[key])
  config.seed = 2
  other = take(input_pipeline.create_train_iterator(config), 3)
  assert not all(np.array_equal(a['video'], b['video']) for a, b in zip(one, other))


def test_resume_across_an_epoch_boundary_with_two_processes():
  config = tiny_config()
  for process in (0, 1):
    iterator = input_pipeline.create_train_iterator(config, process, 2)
    take(iterator, 2)  # the whole first epoch (2 steps)
    state = iterator.get_state()
    expected = take(iterator, 2)
    resumed = input_pipeline.create_train_iterator(config, process, 2)
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 2)):
      np.testing.assert_array_equal(a['video'], b['video'])
    with pytest.raises(StopIteration):
      next(resumed)


def test_unknown_dataset_and_split_are_clear_errors():
  config = tiny_config()
  with pytest.raises(ValueError, match='validation'):
    input_pipeline.get_source(config, 'validation')
  config.dataset = 'affwild'
  with pytest.raises(ValueError, match="'affwild'.*dfew, mafw, cremad, ravdess, ferv39k, synthetic"):
    input_pipeline.get_source(config, 'train')


def _worker_batches(worker_count):
  config = tiny_config()
  config.input.worker_count = worker_count
  return take(input_pipeline.create_train_iterator(config), 2)


def test_worker_processes_give_the_same_batches():
  for a, b in zip(_worker_batches(0), _worker_batches(1)):
    np.testing.assert_array_equal(a['video'], b['video'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_synthetic_options_silent_clips_colour_and_frame_size():
  from mma_dfer_jax import audio as audio_lib  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import frames as frames_lib  # pylint: disable=import-outside-toplevel
  plain = synthetic.SyntheticSource(seed=5, split='test', size=60, num_classes=3, frame_size=40)
  assert all(plain[i]['has_audio'] for i in range(60))
  harder = synthetic.SyntheticSource(seed=5, split='test', size=60, num_classes=3, frame_size=40,
                                     colour_jitter=0.4, silent_fraction=0.2)
  silent = [harder[i] for i in range(60) if not harder[i]['has_audio']]
  assert 4 <= len(silent) <= 24
  np.testing.assert_array_equal(silent[0]['fbank'], audio_lib.silent_fbank())
  assert harder[0]['frames'] != plain[0]['frames'] and harder[0]['label'] == plain[0]['label']
  assert frames_lib.decode_frame(plain[0]['frames'][0]).shape == (40, 40, 3)
  assert synthetic.SyntheticSource(seed=6, split='test', size=1, num_classes=3)[0]['frames'] != plain[0]['frames']
  with pytest.raises(ValueError, match='validation'):
    synthetic.SyntheticSource(seed=5, split='validation', size=1, num_classes=3)
  config = tiny_config()
  config.input.synthetic_silent_fraction, config.input.synthetic_test_size = 0.5, 8
  source = input_pipeline.get_source(config, 'test')
  assert 0 < sum(not source[i]['has_audio'] for i in range(8)) < 8


def test_starting_at_an_epoch_gives_that_epochs_batches():
  config = tiny_config(num_epochs=3)
  everything = list(input_pipeline.create_train_iterator(config))
  assert len(everything) == 6
  for process_count in (1, 2):
    halves = [list(input_pipeline.create_train_iterator(config, p, process_count, epoch=1))
              for p in range(process_count)]
    assert len(halves[0]) == 4
    for whole, *parts in zip(everything[2:], *halves):
      np.testing.assert_array_equal(whole['video'], np.concatenate([part['video'] for part in parts]))
  with pytest.raises(ValueError, match='epoch=4'):
    input_pipeline.create_train_iterator(config, epoch=4)


# ---------------------------------------------------------------------------------------------------------------
# Unimodal models: only the inputs the model reads are prepared.

class _ReadLog(dict):
  """A record that notes which of its fields were read."""

  def __init__(self, record, log):
    super().__init__(record)
    self.log = log

  def __getitem__(self, key):
    self.log.add(key)
    return super().__getitem__(key)

  def get(self, key, default=None):
    self.log.add(key)
    return super().get(key, default)


def _logged_batches(monkeypatch, modalities):
  """Every train and eval batch of the tiny config for `modalities`, the fields read from the records and the
  number of frames decoded."""
  from mma_dfer_jax import frames as frames_lib  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.model.modalities = modalities
  read, decoded = set(), []
  plain = {split: input_pipeline.get_source(config, split) for split in ('train', 'test')}
  monkeypatch.setattr(input_pipeline, 'get_source', lambda c, split: [
      _ReadLog(plain[split][i], read) for i in range(len(plain[split]))])
  decode = frames_lib.decode_frame
  monkeypatch.setattr(frames_lib, 'decode_frame', lambda data: decoded.append(1) or decode(data))
  train = list(input_pipeline.create_train_iterator(config))
  test = list(input_pipeline.create_eval_iterator(config))
  return train, test, read, len(decoded)


def test_unimodal_pipelines_prepare_only_the_models_input(monkeypatch):
  both, both_test, read, decoded = _logged_batches(monkeypatch, 'audio_video')
  assert {'frames', 'fbank', 'label'} <= read and decoded >= 16 * (len(both) * 4 + len(both_test) * 4) // 3
  video, video_test, read, decoded = _logged_batches(monkeypatch, 'video')
  assert 'fbank' not in read and decoded > 0  # no fbank read, cut or padded
  audio, audio_test, read, decoded = _logged_batches(monkeypatch, 'audio')
  assert 'frames' not in read and decoded == 0  # no JPEG decoded
  assert [set(b) for b in video] == [{'video', 'label'}] * 4 and [set(b) for b in audio] == [{'audio', 'label'}] * 4
  assert {frozenset(b) for b in video_test} == {frozenset({'video', 'label', 'mask', 'index'})}
  assert {frozenset(b) for b in audio_test} == {frozenset({'audio', 'label', 'mask', 'index'})}
  # What a unimodal pipeline gives is the audio-visual pipeline's batch without the other input.
  for whole, *parts in zip(both + both_test, video + video_test, audio + audio_test):
    np.testing.assert_array_equal(parts[0]['video'], whole['video'])
    np.testing.assert_array_equal(parts[1]['audio'], whole['audio'])
    for part in parts:
      np.testing.assert_array_equal(part['label'], whole['label'])


def test_unknown_modalities_is_a_clear_error():
  config = tiny_config()
  config.model.modalities = 'face'
  with pytest.raises(input_pipeline.DatasetError, match=r"config\.model\.modalities='face': use one of"):
    next(input_pipeline.create_train_iterator(config))
