"""The train step against the reference's two AdamW steps, and what freezing and accumulation must guarantee."""
import flax
import jax
import numpy as np
import pytest
from conftest import small_model_config

from configs import dfew
from mma_dfer_jax import convert
from mma_dfer_jax import models
from mma_dfer_jax import train


def fixture_batch(steps, i):
  return {'video': steps['images_uint8'][i].transpose(0, 1, 3, 4, 2), 'audio': steps['audio'][i][:, 0],
          'label': steps['labels'][i]}


def experiment(lr=1e-4, wd=1e-2, **model):
  config = dfew.get_config()
  config.model = small_model_config(drop_path_rate=0.0, **model)  # the fixture's steps ran in eval mode
  config.learning_rate, config.weight_decay = lr, wd
  return config


def run_two_steps(config, params, steps, with_gradients=False):
  state = train.create_train_state(config, params)
  losses, gradients = [], []
  grads_fn = jax.jit(train._loss_and_grads)  # pylint: disable=protected-access
  for i in range(2):
    if with_gradients:
      gradients.append(flax.traverse_util.flatten_dict(
          grads_fn(state, *train.partition(state.params), fixture_batch(steps, i), jax.random.key(i))[1]))
    state, metrics = train.train_step(state, fixture_batch(steps, i), jax.random.key(i))
    losses.append(float(metrics['loss']))
  if with_gradients:
    return state, np.array(losses), gradients
  return state, np.array(losses)


# AdamW's update is lr * m / (sqrt(v) + eps): where a step's gradient is of the order of eps (1e-8), the update
# depends on the gradient's last bits, which differ between any two float32 implementations (and between CPUs).
# Those elements are compared at the bound AdamW itself guarantees (lr per step); every other one at 1e-5.
ADAM_EPS = 1e-8
NOISE_FLOOR = 10 * ADAM_EPS


@pytest.fixture(scope='module')
def two_steps(reference_small):
  config = experiment()
  params = convert.load_released_checkpoint(reference_small / 'model.pth', config.model)
  steps = np.load(reference_small / 'train_steps.npz')
  state, losses, gradients = run_two_steps(config, params, steps, with_gradients=True)
  return config, params, steps, state, losses, gradients


@pytest.mark.slow
def test_two_adamw_steps_match_reference(two_steps, reference_small):
  config, _, steps, state, losses, gradients = two_steps
  np.testing.assert_allclose(losses, steps['losses'], rtol=1e-4)
  expected = np.load(reference_small / 'trained_params.npz')
  ours = flax.traverse_util.flatten_dict(state.params)
  compared = elements = ill_conditioned = 0
  for path, src in convert.reference_layout(config.model).items():
    if train.is_frozen(path):
      continue
    values = [src.transform(expected[n]) for n in src.names]
    reference = np.stack(values) if src.stacked else values[0]
    noisy = (np.abs(gradients[0][path]) < NOISE_FLOOR) | (np.abs(gradients[1][path]) < NOISE_FLOOR)
    name = '/'.join(path)
    np.testing.assert_allclose(ours[path][~noisy], reference[~noisy], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(ours[path][noisy], reference[noisy], atol=2 * config.learning_rate, rtol=0,
                               err_msg=name)
    compared += len(src.names)
    elements, ill_conditioned = elements + noisy.size, ill_conditioned + int(noisy.sum())
  assert compared == len([n for n in expected.files if 'norm2' not in n])
  assert ill_conditioned < 1e-3 * elements  # a handful of elements, not a loophole
  io = np.load(reference_small / 'io.npz')
  logits = train.eval_step(state, {'video': io['images_uint8'].transpose(0, 1, 3, 4, 2), 'audio': io['audio'][:, 0]})
  np.testing.assert_allclose(logits, steps['logits_after_steps'], atol=2e-4, rtol=0)


@pytest.mark.slow
def test_strong_steps_see_weight_decay_and_betas(two_steps, reference_small):
  _, params, steps, _, _, _ = two_steps
  config = experiment(lr=float(steps['strong_lr']), wd=float(steps['strong_weight_decay']))
  state, losses = run_two_steps(config, params, steps)
  np.testing.assert_allclose(losses, steps['strong_losses'], rtol=1e-4)
  io = np.load(reference_small / 'io.npz')
  logits = train.eval_step(state, {'video': io['images_uint8'].transpose(0, 1, 3, 4, 2), 'audio': io['audio'][:, 0]})
  np.testing.assert_allclose(logits, steps['strong_logits_after_steps'], atol=2e-3, rtol=0)


@pytest.mark.slow
def test_frozen_leaves_are_bit_identical_and_the_rest_moved(two_steps):
  _, params, _, state, _, _ = two_steps
  before, after = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(state.params)
  for path in before:
    if train.is_frozen(path):
      np.testing.assert_array_equal(after[path], before[path], err_msg='/'.join(path))
    else:
      assert not np.array_equal(after[path], before[path]), '/'.join(path)


@pytest.mark.slow
def test_optimizer_state_covers_exactly_the_trainable_parameters(two_steps):
  _, params, _, state, _, _ = two_steps
  trainable, frozen = train.partition(params)
  n_trainable = train.count_parameters(trainable)
  assert n_trainable + train.count_parameters(frozen) == train.count_parameters(params)
  mu_nu = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in mu_nu) == 2 * n_trainable
  labels = flax.traverse_util.flatten_dict(train.parameter_labels(params))
  frozen_names = {'/'.join(p[:3]) for p, label in labels.items() if label == train.FROZEN}
  assert frozen_names == {'vision/embed/patch_embed', 'vision/embed/cls_token', 'audio/embed/patch_embed',
                          'audio/embed/cls_token', 'vision_norm/scale', 'vision_norm/bias', 'audio_norm/scale',
                          'audio_norm/bias', 'layers/vision_block/norm1', 'layers/vision_block/norm2',
                          'layers/vision_block/attn', 'layers/vision_block/mlp', 'layers/audio_block/norm1',
                          'layers/audio_block/norm2', 'layers/audio_block/attn', 'layers/audio_block/mlp'}


@pytest.mark.slow
def test_every_adapter_receives_gradient(two_steps):
  config, params, steps, _, _, _ = two_steps
  state = train.create_train_state(config, params)
  trainable, frozen = train.partition(state.params)
  _, grads = train._loss_and_grads(state, trainable, frozen, fixture_batch(steps, 0), jax.random.key(0))
  for path, g in flax.traverse_util.flatten_dict(grads).items():
    g = np.asarray(g)
    if path[0] == 'layers':  # stacked over layers: every layer's slice must receive gradient
      assert (np.abs(g.reshape(g.shape[0], -1)).max(axis=1) > 0).all(), '/'.join(path)
    else:
      assert np.abs(g).max() > 0, '/'.join(path)


TINY = dict(width=32, depth=6, num_heads=2, mlp_dim=64, img_size=32, num_frames=4, audio_frames=64, audio_mels=32,
            fusion_width=16, temporal_width=32, temporal_heads=2, temporal_head_dim=16, temporal_mlp_dim=64)


def tiny_setup(batch_size=4, **overrides):
  config = experiment(**TINY)
  config.model.drop_path_rate = 0.1
  config.update(overrides)
  c = config.model
  key = jax.random.key(0)
  batch = {'video': np.asarray(jax.random.randint(key, (batch_size, c.num_frames, 32, 32, 3), 0, 256), np.uint8),
           'audio': np.asarray(jax.random.normal(key, (batch_size, c.audio_frames, c.audio_mels))),
           'label': np.arange(batch_size) % c.num_classes}
  params = models.init_params(c, key)
  return config, params, batch


@pytest.mark.slow
def test_gradient_accumulation_equals_one_large_batch():
  config, params, batch = tiny_setup()
  config.model.drop_path_rate = 0.0
  one, m1 = train.train_step(train.create_train_state(config, params), batch, jax.random.key(1))
  config.grad_accum_steps = 2
  two, m2 = train.train_step(train.create_train_state(config, params), batch, jax.random.key(1))
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), one.params, two.params)


@pytest.mark.slow
def test_step_compiles_once_per_shape():
  config, params, batch = tiny_setup()
  state = train.create_train_state(config, params)
  state, _ = train.train_step(state, batch, jax.random.key(0))
  compiled = train.train_step._cache_size()
  for i in range(3):
    state, _ = train.train_step(state, batch, jax.random.key(i + 1))
  assert train.train_step._cache_size() == compiled
  assert int(state.step) == 4


@pytest.mark.slow
def test_frozen_weight_gradients_are_not_computed():
  """Backprop through frozen blocks costs one activation-gradient pass (about 1x the forward FLOPs); computing their
  weight gradients would add about another 1x. The compiled step must stay well under 3x the forward."""
  config, params, batch = tiny_setup(batch_size=2)
  # XLA's own ops: XLA counts no FLOPs inside the CPU kernels' custom calls, which would blind this test.
  config.model.attention_impl, config.model.matmul_impl = 'einsum', 'xla'
  state = train.create_train_state(config, params)
  step_flops = train.train_step.lower(state, batch, jax.random.key(0)).compile().cost_analysis()['flops']
  forward_flops = train.eval_step.lower(state, batch).compile().cost_analysis()['flops']
  assert 1.5 * forward_flops < step_flops < 2.5 * forward_flops  # the backward pass is counted, not its weights


def test_epoch_cosine_schedule_is_constant_within_an_epoch():
  config = experiment()
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(schedule(0)) == pytest.approx(1e-4) and float(schedule(9)) == pytest.approx(1e-4)
  assert float(schedule(10)) == pytest.approx(1e-4 * (1 + np.cos(np.pi / 25)) / 2, rel=1e-5)
  assert float(schedule(24 * 10 + 3)) == pytest.approx(1e-4 * (1 + np.cos(np.pi * 24 / 25)) / 2, rel=1e-5)
  config.schedule = 'warmup_cosine'
  config.warmup_steps = 5
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(schedule(0)) == 0 and float(schedule(5)) == pytest.approx(1e-4)
