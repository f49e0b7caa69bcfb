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
  with pytest.raises(input_pipeline.DatasetError, match='1..5'):
    input_pipeline.get_source(config, 'train')


def test_frame_indices_is_exported():
  assert input_pipeline.frame_indices(32, train=False).tolist() == [int(1 + 2 * k) for k in range(16)]
