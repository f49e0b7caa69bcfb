"""The Flax MMA-DFER against the reference's golden outputs, and at other sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model_config

from mma_dfer_jax import convert
from mma_dfer_jax.cpu import kernels
from mma_dfer_jax import models
from mma_dfer_jax.models import MMADFER
from mma_dfer_jax.models import mma_dfer


def fixture_inputs(io):
  video = io['images_uint8'].transpose(0, 1, 3, 4, 2).astype(np.float32) / 255.0  # NTCHW -> NTHWC
  return video, io['audio'][:, 0]


@pytest.fixture(scope='module')
def released(reference_small):
  config = small_model_config()
  params = convert.load_released_checkpoint(reference_small / 'model.pth', config)
  io = np.load(reference_small / 'io.npz')
  return config, params, io


def forward(config, params, video, audio):
  fn = jax.jit(lambda p, v, a: MMADFER(config).apply({'params': p}, v, a, mutable=['intermediates']))
  logits, state = fn(params, video, audio)
  return np.asarray(logits), {k: np.asarray(v[0]) for k, v in state['intermediates'].items()}


@pytest.mark.slow
def test_logits_and_features_match_reference(released):
  config, params, io = released
  logits, features = forward(config, params, *fixture_inputs(io))
  np.testing.assert_allclose(logits, io['logits'], atol=1e-4, rtol=0)
  for name in ('fused_frame_features', 'temporal_input', 'video_features'):
    np.testing.assert_allclose(features[name], io[name], atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.slow
def test_accepts_reference_audio_layout(released):
  config, params, io = released
  video, audio = fixture_inputs(io)
  a = MMADFER(config).apply({'params': params}, video[:1], audio[:1])
  b = MMADFER(config).apply({'params': params}, video[:1], audio[:1, None])
  np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bfloat16_encoders_close_to_float32(released):
  config, params, io = released
  config = config.copy_and_resolve_references()
  config.dtype = 'bfloat16'
  logits, _ = forward(config, params, *fixture_inputs(io))
  assert logits.dtype == np.float32
  # Measured 3.5e-3 (2026-12-01, logits up to 1.7); BGR input gives 1.2e-2. Frame order cannot be told apart at bf16
  # precision here (reversing the frames moves this model's float32 logits by 1.7e-3): the float32 parity test checks it.
  assert np.abs(logits - io['logits']).max() < 7e-3


@pytest.mark.slow
def test_train_mode_drop_path_rate_zero_equals_eval(released):
  config, params, io = released
  config = config.copy_and_resolve_references()
  config.drop_path_rate = 0.0
  video, audio = fixture_inputs(io)
  model = MMADFER(config)
  train = model.apply({'params': params}, video, audio, train=True, rngs={'dropout': jax.random.key(3)})
  np.testing.assert_allclose(train, io['logits'], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_train_mode_drops_paths(released):
  config, params, io = released
  video, audio = fixture_inputs(io)
  model = MMADFER(config)
  train = model.apply({'params': params}, video, audio, train=True, rngs={'dropout': jax.random.key(3)})
  assert np.abs(np.asarray(train) - io['logits']).max() > 1e-3


@pytest.mark.parametrize('sizes', [
    dict(width=64, depth=6, num_heads=2, mlp_dim=128, img_size=32, num_frames=4, num_classes=11,
         temporal_layers=2, temporal_width=96, temporal_heads=2, temporal_head_dim=16, temporal_mlp_dim=64),
    dict(width=48, depth=18, num_heads=4, mlp_dim=96, img_size=48, num_frames=8, num_classes=3,
         audio_frames=256, audio_mels=64, fusion_width=32, temporal_layers=1),
])
@pytest.mark.slow
def test_other_sizes_build_and_run(sizes):
  config = small_model_config(**sizes)
  n = 2
  video = jax.random.uniform(jax.random.key(0), (n, config.num_frames, config.img_size, config.img_size, 3))
  audio = jax.random.normal(jax.random.key(1), (n, config.audio_frames, config.audio_mels))
  model = MMADFER(config)
  params = jax.jit(model.init)(jax.random.key(2), video, audio)['params']
  logits = jax.jit(model.apply)({'params': params}, video, audio)
  assert logits.shape == (n, config.num_classes) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  stages = config.depth // 6
  assert params['vision']['prompts_progr'].shape == (stages, 3, config.width)
  grid = (config.img_size // 16) ** 2
  assert params['vision']['embed']['pos_embed'].shape == (1, 1 + grid + 3 * stages, config.width)
  assert params['temporal']['pos_embedding'].shape == (1, config.num_frames + 1, config.temporal_width)


def test_depth_not_multiple_of_six_is_an_error():
  config = small_model_config(depth=8)
  with pytest.raises(ValueError, match='multiple of 6'):
    jax.eval_shape(MMADFER(config).init, jax.random.key(0), jnp.zeros((1, 16, 224, 224, 3)), jnp.zeros((1, 512, 128)))


@pytest.mark.slow
@pytest.mark.parametrize('policy,attention', [('dots_with_no_batch_dims_saveable', 'einsum'),
                                              ('dots_and_attention_probs', 'einsum'),
                                              ('dots_with_no_batch_dims_saveable', 'cpu_fused')])
def test_remat_and_cpu_kernels_compute_the_same_function(policy, attention):
  """Remat (with either policy) and the CPU attentions against keeping every activation and XLA attention."""
  if attention == 'cpu_fused' and not kernels.available():
    pytest.skip('the fused CPU attention kernel could not be built here (no C++ compiler)')
  sizes = dict(width=32, depth=6, num_heads=2, mlp_dim=64, img_size=32, num_frames=2, audio_frames=32,
               audio_mels=32, fusion_width=16, drop_path_rate=0.0)
  video = jax.random.uniform(jax.random.key(0), (2, 2, 32, 32, 3))
  audio = jax.random.normal(jax.random.key(1), (2, 32, 32))
  default = small_model_config(**sizes, remat_policy=policy, attention_impl=attention)
  plain = small_model_config(**sizes, remat=False, attention_impl='xla', matmul_impl='xla')
  params = jax.jit(MMADFER(default).init)(jax.random.key(2), video, audio)['params']
  assert jax.tree.structure(jax.eval_shape(MMADFER(plain).init, jax.random.key(2), video, audio)['params']) == \
      jax.tree.structure(params)

  def loss_and_grads(config):
    def loss(p):
      logits = MMADFER(config).apply({'params': p}, video, audio, train=True, rngs={'dropout': jax.random.key(3)})
      return (logits ** 2).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(default), loss_and_grads(plain)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_dummy_inputs_and_init_params_follow_the_config():
  """The one helper that builds inputs for initialising and tracing: the config's shapes, any batch; the
  parameters it initialises are those the model's own init gives (checked by shape, nothing computed)."""
  config = small_model_config(img_size=32, num_frames=4, audio_frames=64, audio_mels=32)
  video, audio = models.dummy_inputs(config, batch=3)
  assert video.shape == (3, 4, 32, 32, 3) and audio.shape == (3, 64, 32)
  assert video.dtype == audio.dtype == jnp.float32
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  direct = jax.eval_shape(MMADFER(config).init, jax.random.key(0), *models.dummy_inputs(config))['params']
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, direct)
  assert shapes['vision']['embed']['pos_embed'].shape == (1, 1 + 4 + 3 * 2, config.width)


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match='remat_policy'):
    mma_dfer.remat_policy('keep_everything_please')


def test_models_build_gives_the_model_typed_fields_from_config_model():
  """One factory: models.build(config.model) holds a frozen ModelSpec with every key of settings.model_config; an
  older config's missing keys take the defaults; the parameters are those of MMADFER(config.model)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import settings  # pylint: disable=import-outside-toplevel
  assert set(models.spec.FIELDS) == set(settings.model_config(3).keys())
  config = demo.get_config().model
  spec = models.build(config).spec
  assert isinstance(spec, models.ModelSpec) and hash(spec) == hash(models.model_spec(config))
  assert (spec.width, spec.depth, spec.num_classes) == (config.width, config.depth, config.num_classes)
  old = ml_collections.ConfigDict(config.to_dict())
  del old['modalities'], old['matmul_impl']
  assert (models.model_spec(old).modalities, models.model_spec(old).matmul_impl) == ('audio_video', '')
  with pytest.raises(ValueError, match='config.model.num_classes'):
    models.model_spec({'width': 8})
  inputs = models.dummy_inputs(config)
  shapes = lambda model: jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(model.init, jax.random.key(0), *inputs))
  assert shapes(models.build(config)) == shapes(models.MMADFER(config))
