"""Unimodal models (config.model.modalities 'video' / 'audio'): parameters, forward pass, training, frozen labels,
SSL conversion, released checkpoints, prediction, timeline, export and bench. The audio-visual default stays the
paper's model: tests/test_model.py's parity tests against the reference fixtures cover it.
"""
import functools
import os
import subprocess
import sys
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import FIXTURES, ROOT, small_model_config

from configs import common
from configs import demo
from mma_dfer_jax import cli
from mma_dfer_jax import convert
from mma_dfer_jax import train
from mma_dfer_jax.models import MMADFER
from mma_dfer_jax.models import adapters
from mma_dfer_jax.models import mma_dfer
from mma_dfer_jax.models import temporal
from mma_dfer_jax.models import vit

UNIMODAL = ('video', 'audio')
ENCODER = {'video': 'vision', 'audio': 'audio'}
FACE_CLIP = FIXTURES / 'audio' / 'clip_face_speech.mp4'


def tiny_config(modalities):
  """The demo experiment with an even smaller model (few frames, a short fbank: quick to compile and run)."""
  config = demo.get_config()
  m = config.model
  m.modalities = modalities
  m.num_frames, m.audio_frames, m.width, m.mlp_dim = 4, 32, 24, 48  # 128 mels: what audio.py computes
  return config


def inputs(model_config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  c = model_config
  video = rng.uniform(0, 1, (batch, c.num_frames, c.img_size, c.img_size, 3)).astype(np.float32)
  audio = rng.standard_normal((batch, c.audio_frames, c.audio_mels)).astype(np.float32)
  return jnp.asarray(video), jnp.asarray(audio)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_count(module, *args, **kwargs) -> int:
  """Parameters of `module` alone, by shape (nothing computed)."""
  return count(jax.eval_shape(functools.partial(module.init, jax.random.key(0), **kwargs), *args)['params'])


def model_shapes(model_config):
  return convert.param_shapes(model_config)


# ---------------------------------------------------------------------------------------------------------------
# Parameters.

def encoder_count(c, encoder) -> int:
  """One frozen ViT with MMA-DFER's trainable pos_embed and prompts: its stem, depth blocks and final norm."""
  grid = mma_dfer.vision_grid(c) if encoder == 'vision' else mma_dfer.audio_grid(c)
  image = (1, c.img_size, c.img_size, 3) if encoder == 'vision' else (1, c.audio_frames, c.audio_mels, 1)
  stem = abstract_count(mma_dfer.EncoderStem(c, grid, jnp.float32), jnp.zeros(image))
  tokens = jnp.zeros((1, 1 + grid[0] * grid[1] + mma_dfer.num_prompts(c), c.width))
  block = abstract_count(vit.EncoderBlock(c.num_heads, c.mlp_dim), tokens, 0.0, train=False)
  norm = abstract_count(nn.LayerNorm(), jnp.zeros((1, c.width)))
  return stem + c.depth * block + norm


def head_count(c) -> int:
  """The projection to the temporal width, the temporal transformer and the classifier."""
  projection = abstract_count(nn.Dense(c.temporal_width), jnp.zeros((1, c.width)))
  transformer = abstract_count(
      temporal.TemporalTransformer(c.num_frames, c.temporal_layers, c.temporal_heads, c.temporal_head_dim,
                                   c.temporal_mlp_dim), jnp.zeros((1, c.num_frames, c.temporal_width)))
  classifier = abstract_count(nn.Dense(c.num_classes), jnp.zeros((1, c.temporal_width)))
  return projection + transformer + classifier


def fusion_count(c) -> int:
  gv, ga = mma_dfer.vision_grid(c), mma_dfer.audio_grid(c)
  k = mma_dfer.num_prompts(c)
  xv = jnp.zeros((c.num_frames, 1 + gv[0] * gv[1] + k, c.width))
  xa = jnp.zeros((1, 1 + ga[0] * ga[1] + k, c.width))
  return c.depth * abstract_count(adapters.FusionAdapter(c.fusion_width, c.num_frames), xv, xa)


def test_unimodal_parameter_count_is_one_encoder_plus_the_temporal_head():
  c = tiny_config('audio_video').model
  counts = {}
  for kind in mma_dfer.MODALITIES:
    c.modalities = kind
    counts[kind] = sum(int(np.prod(s)) for s in model_shapes(c).values())
  for kind in UNIMODAL:
    c.modalities = kind
    assert counts[kind] == encoder_count(c, ENCODER[kind]) + head_count(c), kind
  # The paper's model is both encoders, one head and the fusion adapters: nothing else was dropped.
  assert counts['audio_video'] == (encoder_count(c, 'vision') + encoder_count(c, 'audio') + head_count(c)
                                   + fusion_count(c))
  assert counts['video'] < counts['audio_video'] and counts['audio'] < counts['audio_video']


@pytest.mark.parametrize('kind', UNIMODAL)
def test_unimodal_tree_has_no_absent_encoder_nor_fusion(kind):
  c = tiny_config(kind).model
  paths = set(model_shapes(c))
  absent = 'audio' if kind == 'video' else 'vision'
  assert not any(p[0] in (absent, f'{absent}_norm') or p[:2] == ('layers', f'{absent}_block') for p in paths)
  assert any(p[0] == ENCODER[kind] for p in paths)
  assert not any('fusion' in p for p in paths)
  # The remaining encoder has the audio-visual model's paths, so conversion and freezing read it the same way.
  c.modalities = 'audio_video'
  same = {p: s for p, s in model_shapes(c).items() if p in paths}
  assert same == {p: s for p, s in model_shapes(tiny_config(kind).model).items()}


@pytest.mark.parametrize('kind', UNIMODAL)
def test_frozen_labels_freeze_the_encoder_and_train_prompts_and_head(kind):
  shapes = model_shapes(tiny_config(kind).model)
  enc = ENCODER[kind]
  frozen = {p for p in shapes if train.is_frozen(p)}
  assert frozen == {p for p in shapes if p[0] == f'{enc}_norm' or p[:3] in {(enc, 'embed', 'patch_embed'),
                                                                          (enc, 'embed', 'cls_token')}
                    or p[:2] == ('layers', f'{enc}_block')}
  assert frozen  # the encoder is there and frozen
  trainable = set(shapes) - frozen
  assert {p[0] for p in trainable} == {enc, 'vision_proj', 'temporal', 'classifier'}
  assert {(enc, 'embed', 'pos_embed'), (enc, 'embed', 'prompts_init'), (enc, 'prompts_progr')} <= trainable


# ---------------------------------------------------------------------------------------------------------------
# Forward pass.

@pytest.mark.slow
@pytest.mark.parametrize('kind', UNIMODAL)
def test_forward_ignores_the_absent_input(kind):
  """(None in place of the absent input: the train-step test below feeds batches without it.)"""
  c = tiny_config(kind).model
  model = MMADFER(c)
  video, audio = inputs(c)
  params = jax.jit(model.init)(jax.random.key(0), video, audio)['params']
  forward = jax.jit(lambda p, v, a: model.apply({'params': p}, v, a, train=False))
  logits = forward(params, video, audio)
  assert logits.shape == (2, c.num_classes) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  other_video, other_audio = inputs(c, seed=1)
  if kind == 'video':
    np.testing.assert_array_equal(forward(params, video, other_audio), logits)
    assert not np.allclose(forward(params, other_video, audio), logits)  # the input it uses matters
  else:
    np.testing.assert_array_equal(forward(params, other_video, audio), logits)
    assert not np.allclose(forward(params, video, other_audio), logits)


@pytest.mark.slow
def test_audio_only_temporal_steps_repeat_the_clips_audio_token():
  c = tiny_config('audio').model
  model = MMADFER(c)
  _, audio = inputs(c)
  params = jax.jit(model.init)(jax.random.key(0), None, audio)['params']
  _, state = jax.jit(lambda p, a: model.apply({'params': p}, None, a, mutable=['intermediates']))(params, audio)
  fused = np.asarray(state['intermediates']['fused_frame_features'][0])
  assert fused.shape == (2, c.num_frames, c.width)
  np.testing.assert_array_equal(fused, np.broadcast_to(fused[:, :1], fused.shape))
  assert not np.allclose(fused[0], fused[1])  # each clip its own


# ---------------------------------------------------------------------------------------------------------------
# Training.

def fixed_batch(config, kind, size=8):
  """Clips whose frames' colour and fbank level follow the label (noise on top), so a few steps can fit them."""
  video, audio = inputs(config.model, batch=size, seed=3)
  label = np.arange(size, dtype=np.int32) % config.model.num_classes
  colour = np.random.default_rng(4).uniform(0, 1, (config.model.num_classes, 3))[label][:, None, None, None]
  batch = {'video': ((0.8 * colour + 0.2 * np.asarray(video)) * 255).astype(np.uint8),
           'audio': np.asarray(audio) * 0.2 + label[:, None, None] - 1.5, 'label': label}
  drop = {'video': 'audio', 'audio': 'video'}[kind]
  return {k: jnp.asarray(v) for k, v in batch.items() if k != drop}  # the absent input is not fed at all


@pytest.mark.slow
@pytest.mark.parametrize('kind', UNIMODAL)
def test_train_steps_update_only_trainable_params_and_fit_a_fixed_batch(kind):
  config = tiny_config(kind)
  config.learning_rate = 3e-3
  c = config.model
  video, audio = inputs(c, batch=1)
  params = jax.jit(MMADFER(c).init)(jax.random.key(0), video, audio)['params']
  before = {p: np.array(v) for p, v in flax.traverse_util.flatten_dict(params).items()}
  state = train.create_train_state(config, params)
  batch = fixed_batch(config, kind)
  losses = []
  for step in range(10):
    state, metrics = train.train_step(state, batch, jax.random.key(step))
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.8 * losses[0], losses
  after = flax.traverse_util.flatten_dict(state.params)
  assert after.keys() == before.keys()
  for path, value in after.items():
    if train.is_frozen(path):
      np.testing.assert_array_equal(np.asarray(value), before[path], err_msg=str(path))
  changed = [p for p in after if not train.is_frozen(p) and not np.array_equal(np.asarray(after[p]), before[p])]
  assert {p[0] for p in changed} == {ENCODER[kind], 'vision_proj', 'temporal', 'classifier'}
  # The optimizer holds state for the trainable leaves only.
  trainable_tree = jax.tree_util.tree_structure(train.partition(state.params)[0])
  assert jax.tree_util.tree_structure(state.opt_state[0].mu) == trainable_tree


# ---------------------------------------------------------------------------------------------------------------
# Configuration and conversion.

def test_check_model_config_names_the_key():
  c = tiny_config('audio_video').model
  for kind in mma_dfer.MODALITIES:
    c.modalities = kind
    cli.check_model_config(c)
  c.modalities = 'vision'
  with pytest.raises(cli.UserError, match=r"config.model.modalities='vision'") as error:
    cli.check_model_config(c)
  assert '\n' not in str(error.value)
  assert common.model_config(7).modalities == 'audio_video'  # the paper's model by default


def test_config_without_the_key_is_the_papers_model():
  from mma_dfer_jax import settings  # pylint: disable=import-outside-toplevel
  saved = tiny_config('audio_video').to_dict()  # a config saved before the key existed, as checkpoints load it
  del saved['model']['modalities']
  c = settings.upgrade(ml_collections.ConfigDict(saved)).model
  assert mma_dfer.modalities(c) == 'audio_video'
  assert any('fusion' in p for p in model_shapes(c))


def ssl_config(kind):
  # The fixture's SSL files are ViTs of width 96; 6 of their 12 blocks and 32 px frames keep the model small.
  return small_model_config(modalities=kind, depth=6, img_size=32)


@pytest.mark.slow
def test_ssl_init_of_a_video_only_model_reads_only_the_face_file(reference_small):
  from mma_dfer_jax import pth_reader
  face_file = reference_small / 'mae_face_pretrain_vit_base.pth'
  face = pth_reader.state_dict(pth_reader.load_pth(face_file))
  c = ssl_config('video')
  params = convert.init_from_ssl(c, face_file, '', jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(params)
  assert {p: v.shape for p, v in flat.items()} == model_shapes(c)
  np.testing.assert_array_equal(flat[('vision', 'embed', 'patch_embed', 'kernel')],
                                np.asarray(face['patch_embed.proj.weight']).transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat[('layers', 'vision_block', 'mlp', 'fc2', 'bias')],
                                np.stack([np.asarray(face[f'blocks.{i}.mlp.fc2.bias']) for i in range(6)]))
  np.testing.assert_array_equal(flat[('vision_norm', 'scale')], np.asarray(face['norm.weight']))
  with pytest.raises(convert.ConversionError, match='face'):
    convert.init_from_ssl(c, '', reference_small / 'audiomae_pretrained.pth', jax.random.key(0))


def test_ssl_init_of_an_audio_only_model_reads_only_the_audio_file(reference_small):
  from mma_dfer_jax import pth_reader
  audio_file = reference_small / 'audiomae_pretrained.pth'
  tensors = pth_reader.state_dict(pth_reader.load_pth(audio_file))
  c = ssl_config('audio')
  params = convert.init_from_ssl(c, None, audio_file, jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(params)
  assert {p: v.shape for p, v in flat.items()} == model_shapes(c)
  np.testing.assert_array_equal(flat[('layers', 'audio_block', 'attn', 'qkv', 'kernel')],
                                np.stack([np.asarray(tensors[f'blocks.{i}.attn.qkv.weight']).T for i in range(6)]))
  assert flat[('audio', 'embed', 'pos_embed')].shape[1] == 1 + 32 * 8 + mma_dfer.num_prompts(c)


@pytest.mark.parametrize('kind', UNIMODAL)
def test_released_checkpoint_into_a_unimodal_config_is_one_line_error(reference_small, kind):
  with pytest.raises(convert.ConversionError) as error:
    convert.load_released_checkpoint(reference_small / 'model.pth', small_model_config(modalities=kind))
  message = str(error.value)
  assert '\n' not in message and 'audio-visual' in message and f"modalities={kind!r}" in message
  assert cli.user_error_message(error.value) is not None  # a user error: one line, exit code 2 on the command line


def test_convert_command_refuses_released_into_unimodal(reference_small, tmp_path):
  done = subprocess.run([sys.executable, '-m', 'mma_dfer_jax.convert', 'released', '--src',
                         str(reference_small / 'model.pth'), '--out', str(tmp_path / 'out'), '--config',
                         'configs/dfew.py', '--config.model.modalities=video'], cwd=ROOT, text=True,
                        capture_output=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1 and 'audio-visual' in lines[0], done.stderr
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------------------------
# Prediction, timeline, export, bench.

def face_clip() -> Path:
  if not FACE_CLIP.is_file():
    pytest.skip(f'{FACE_CLIP} is absent: these tests need ../shared/fixtures beside the checkout')
  return FACE_CLIP


def tiny_checkpoint(directory, kind):
  """A checkpoint of a tiny random model, written as `convert` writes one; MAFW class names."""
  from mma_dfer_jax import checkpoint
  config = tiny_config(kind)
  config.dataset = 'mafw'
  config.model.num_classes = 11
  rng = np.random.default_rng(0)
  flat = {path: rng.normal(0.0, 0.02, shape).astype(np.float32) for path, shape in model_shapes(config.model).items()}
  checkpoint.save_params(directory, flax.traverse_util.unflatten_dict(flat), config)
  return directory


def check_prediction(result, names):
  assert result['label'] in names and set(result['probabilities']) == set(names)
  assert abs(sum(result['probabilities'].values()) - 1) < 1e-6
  assert result['label'] == max(result['probabilities'], key=result['probabilities'].get)


def _refuse(*_args, **_kwargs):
  raise AssertionError('called for a model that does not use it')


def test_video_only_prediction_needs_no_audio(tmp_path, monkeypatch):
  from mma_dfer_jax import audio as audio_lib
  from mma_dfer_jax import labels
  from mma_dfer_jax import predict
  params, config = predict.load_model(tiny_checkpoint(tmp_path / 'ckpt', 'video'))
  monkeypatch.setattr(audio_lib, 'fbank_from_waveform', _refuse)  # the track's fbank is never computed
  result = predict.predict_video(face_clip(), params, config)
  check_prediction(result, labels.class_names('mafw', 11))
  assert result['face_detected'] is True and result['has_audio'] is True  # has_audio: the file's track, as before
  assert any('video-only' in n for n in result['notes'])


def test_audio_only_prediction_skips_face_detection(tmp_path, monkeypatch):
  from mma_dfer_jax import faces
  from mma_dfer_jax import labels
  from mma_dfer_jax import predict
  checkpoint_dir = tiny_checkpoint(tmp_path / 'ckpt', 'audio')
  params, config = predict.load_model(checkpoint_dir)
  monkeypatch.setattr(faces, 'detect_faces', _refuse)
  result = predict.predict_video(face_clip(), params, config)
  check_prediction(result, labels.class_names('mafw', 11))
  assert result['face_detected'] is None and result['has_audio'] is True
  assert any('audio-only' in n for n in result['notes'])
  assert 'not looked for' in predict.format_table(result)


def test_audio_only_timeline_starts_no_face_detector(tmp_path, monkeypatch):
  from mma_dfer_jax import predict
  from mma_dfer_jax import timeline
  params, config = predict.load_model(tiny_checkpoint(tmp_path / 'ckpt', 'audio'))
  monkeypatch.setattr(timeline, '_FaceDetector', _refuse)
  result = timeline.predict_timeline(face_clip(), params, config, progress=False)
  assert result['windows'] and all(r['has_audio'] and not r['face_detected'] for r in result['windows'])
  assert any('audio-only' in n for n in result['notes'])


@pytest.mark.slow
def test_video_only_export_keeps_both_inputs_and_ignores_audio(tmp_path):
  from mma_dfer_jax import export
  config = tiny_config('video')
  c = config.model
  params = jax.jit(MMADFER(c).init)(jax.random.key(0), *inputs(c, batch=1))['params']
  exported = export.export_model(params, c, platforms=('cpu',))
  assert len(exported.in_avals) == 2
  video = np.random.default_rng(0).integers(0, 256, (2, c.num_frames, c.img_size, c.img_size, 3), dtype=np.uint8)
  zeros = np.zeros((2, c.audio_frames, c.audio_mels), np.float32)
  noise = np.random.default_rng(1).standard_normal(zeros.shape).astype(np.float32)
  np.testing.assert_array_equal(exported.call(video, zeros), exported.call(video, noise))
  info = export.sidecar(exported, config)
  assert info['modalities'] == 'video'
  assert info['inputs']['video']['used'] is True and info['inputs']['audio']['used'] is False


def test_bench_feeds_only_the_models_inputs_and_counts_one_encoder():
  from mma_dfer_jax import bench
  flops = {}
  for kind in mma_dfer.MODALITIES:
    config = tiny_config(kind)
    assert set(bench.synthetic_batch(config, 2)) == {'video', 'audio', 'label'} - {
        'video': {'audio'}, 'audio': {'video'}, 'audio_video': set()}[kind]
    flops[kind] = bench.analytic_flops(config.model, 2)['encoder_blocks_forward_per_clip']
  assert flops['video'] + flops['audio'] == pytest.approx(flops['audio_video'])
  assert 0 < flops['audio'] < flops['video']


@pytest.mark.slow
@pytest.mark.parametrize('kind', UNIMODAL)
def test_bench_analytic_flops_agree_with_xla(kind):
  from mma_dfer_jax import bench
  from configs import dfew
  config = dfew.get_config()
  m = config.model
  m.modalities, m.width, m.depth, m.num_heads, m.mlp_dim, m.img_size, m.num_frames = kind, 32, 6, 2, 64, 32, 4
  m.audio_frames, m.audio_mels, m.fusion_width = 64, 32, 16
  m.temporal_width, m.temporal_heads, m.temporal_head_dim, m.temporal_mlp_dim = 32, 2, 16, 64
  config.batch_size, config.cpu_keep_freed_memory = 2, False
  record = bench.run_benchmark(config, mode='train', steps=1, warmup=0)
  assert 0.7 < record['flops_per_step'] / record['flops_analytic_per_step'] < 2.0


# The whole run of a unimodal model from launch.py: tests/test_dataset_runs.py (FERV39k, video only; RAVDESS, audio
# only), each asserting it learns above chance.
