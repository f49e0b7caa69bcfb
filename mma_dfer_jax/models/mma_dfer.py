"""MMA-DFER: two frozen ViT encoders run in lockstep, exchanging information through adapters after every layer,
then a temporal transformer classifies the clip. The numbered steps are those of docs/model.md.

`model.modalities` picks the variant: 'audio_video' (the paper's model), or a unimodal model that is the same steps
with one encoder left out: 'video' (the face ViT on every frame) or 'audio' (AudioMAE on the fbank). A unimodal
model has no parameters of the absent encoder nor of the fusion adapters (they exist to exchange information between
the two); each remaining encoder keeps its trainable position embedding and progressive prompts. Its input of the
absent modality is ignored and may be None. README.md, "Unimodal models", walks through the steps of each variant.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mma_dfer_jax import cpu
from mma_dfer_jax import settings
from mma_dfer_jax.models import adapters
from mma_dfer_jax.models import initializers
from mma_dfer_jax.models import spec as spec_lib
from mma_dfer_jax.models import temporal
from mma_dfer_jax.models import vit

PROMPT_STAGE_EVERY = settings.PROMPT_STAGE_EVERY  # a new stage of progressive prompts every 6 blocks
MODALITIES = settings.CHOICES['model.modalities']  # the paper's model, face-only, audio-only


def modalities(model_config) -> str:
  """model.modalities, checked (configs saved before the key existed get 'audio_video' where they are loaded)."""
  value = model_config.modalities
  if value not in MODALITIES:
    raise ValueError(f'model.modalities={value!r}: use one of {", ".join(MODALITIES)}')
  return value


def uses_video(model_config) -> bool:
  return 'video' in settings.MODEL_INPUTS[modalities(model_config)]


def uses_audio(model_config) -> bool:
  return 'audio' in settings.MODEL_INPUTS[modalities(model_config)]


def num_prompts(model_config) -> int:
  return model_config.prompts_per_stage * (model_config.depth // PROMPT_STAGE_EVERY)


def vision_grid(model_config):
  return (model_config.img_size // model_config.patch_size,) * 2


def audio_grid(model_config):
  p = model_config.patch_size
  return (model_config.audio_frames // p, model_config.audio_mels // p)


def remat_policy(name: str):
  """A policy of jax.checkpoint_policies by name, or 'dots_and_attention_probs': the weight-matmul outputs (as
  'dots_with_no_batch_dims_saveable') and the einsum attention's probabilities, so that the backward pass does not
  recompute the attention scores and softmax (more memory, fewer FLOPs).

  Except under 'nothing_saveable', what the attention and matmul implementations mark as outputs is kept too (the
  CPU kernels': the weight matmuls' as XLA's own dots are, and the fused attention's, which its backward pass reads;
  recomputing them would run the forward kernel a second time to save a few MB per layer).
  """
  policies = jax.checkpoint_policies
  if name == 'dots_and_attention_probs':
    policy = policies.save_from_both_policies(policies.dots_with_no_batch_dims_saveable,
                                              cpu.Implementations.probs_saveable)
  else:
    policy = None if name.startswith('_') else getattr(policies, name, None)
    if policy is None:
      raise ValueError(f'model.remat_policy={name!r}: use dots_and_attention_probs or a name in '
                       'jax.checkpoint_policies')
  if name == 'nothing_saveable':
    return policy
  return policies.save_from_both_policies(policy, cpu.Implementations.outputs_saveable)


def drop_path_rates(model_config) -> np.ndarray:
  """timm's linear stochastic-depth schedule: 0 at the first block, drop_path_rate at the last."""
  return np.linspace(0.0, model_config.drop_path_rate, model_config.depth, dtype=np.float32)


class EncoderStem(nn.Module):
  """An encoder's own parameters outside its blocks: the token embedding and its progressive prompts."""
  model_config: spec_lib.ModelSpec
  grid: tuple
  dtype: object

  def setup(self):
    c = self.model_config
    self.embed = vit.TokenEmbedding(c.width, c.patch_size, self.grid[0] * self.grid[1], num_prompts(c), self.dtype,
                                    name='embed')
    stages = c.depth // PROMPT_STAGE_EVERY
    self.prompts_progr = self.param('prompts_progr', initializers.scaled_normal(c.width ** -0.5),
                                    (stages, c.prompts_per_stage, c.width))

  def __call__(self, images):
    return self.embed(images)

  def prompt_updates(self):
    """(depth, num_prompts, D): what step 5's progressive-prompt rule adds after each layer."""
    c = self.model_config
    return jnp.stack([adapters.progressive_prompt_update(self.prompts_progr, i, c.prompts_per_stage, num_prompts(c))
                      for i in range(c.depth)])


class LockstepLayer(nn.Module):
  """Step 5 for one layer i: both frozen blocks, the fusion adapter, then the progressive prompts."""
  model_config: spec_lib.ModelSpec
  num_frames: int
  train: bool
  dtype: object
  ops: cpu.Implementations  # the blocks' attention and matmuls, resolved once for the model

  @nn.compact
  def __call__(self, carry, per_layer):
    xv, xa = carry
    drop_rate, vision_prompt_update, audio_prompt_update = per_layer
    c = self.model_config
    block = functools.partial(vit.EncoderBlock, c.num_heads, c.mlp_dim, self.dtype, self.ops)
    xv = block(name='vision_block')(xv, drop_rate, self.train)
    xa = block(name='audio_block')(xa, drop_rate, self.train)
    fusion = adapters.FusionAdapter(c.fusion_width, self.num_frames, self.dtype, self.ops, name='fusion')
    xv, xa = fusion(xv, xa)
    k = num_prompts(c)
    xv = xv.at[:, -k:].add(vision_prompt_update.astype(xv.dtype))
    xa = xa.at[:, -k:].add(audio_prompt_update.astype(xa.dtype))
    return (xv, xa), None


class EncoderLayer(nn.Module):
  """Step 5 of a unimodal model for one layer i: the encoder's frozen block, then its progressive prompts. There
  is no fusion adapter: both of its directions read the other modality's tokens."""
  model_config: spec_lib.ModelSpec
  encoder: str  # 'vision' or 'audio': names the block as the audio-visual model does, so paths match
  train: bool
  dtype: object
  ops: cpu.Implementations

  @nn.compact
  def __call__(self, x, per_layer):
    drop_rate, prompt_update = per_layer
    c = self.model_config
    x = vit.EncoderBlock(c.num_heads, c.mlp_dim, self.dtype, self.ops,
                         name=f'{self.encoder}_block')(x, drop_rate, self.train)
    return x.at[:, -num_prompts(c):].add(prompt_update.astype(x.dtype)), None


def _scanned(layer, model_config, *args):
  """`layer` scanned over the depth (one compiled layer; parameters stacked on a leading depth axis), with the
  configured rematerialisation, as the module named 'layers'."""
  c = model_config
  if c.remat:
    layer = nn.remat(layer, prevent_cse=False, policy=remat_policy(c.remat_policy))
  scanned = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                    in_axes=0, length=c.depth, unroll=c.scan_unroll)
  return scanned(c, *args, cpu.implementations(c), name='layers')  # the implementation choice, made once


def _final_cls(x, name, dtype):
  """Step 6 for one encoder: its frozen final LayerNorm on the cls token, as float32."""
  return nn.LayerNorm(epsilon=vit.VIT_LN_EPS, dtype=dtype, name=name)(x[:, 0]).astype(jnp.float32)


class MMADFER(nn.Module):
  """`apply({'params': p}, video (N,T,H,W,3) in [0,1], audio (N,512,128), train)` -> float32 logits (N, C).

  With model.modalities 'video' the audio argument is ignored (None is fine); with 'audio' the video one.
  """
  config: object  # config.model: a ConfigDict or a ModelSpec (models.build makes the latter)

  @property
  def spec(self) -> spec_lib.ModelSpec:
    """The config's settings as typed fields."""
    return spec_lib.model_spec(self.config)

  @nn.compact
  def __call__(self, video, audio, train: bool = False):
    c = self.spec
    if c.depth % PROMPT_STAGE_EVERY:
      raise ValueError(f'model.depth={c.depth}: MMA-DFER adds prompts every 6 blocks, so depth must be a multiple of 6')
    dtype = jnp.dtype(c.dtype)
    if audio is not None and audio.ndim == 4:  # accept the reference's (N, 1, frames, mels)
      audio = audio[:, 0]
    kind = modalities(c)
    if kind == 'audio_video':
      fused = self._audio_visual_features(video, audio, train, dtype)
    elif kind == 'video':
      fused = self._video_features(video, train, dtype)
    else:
      fused = self._audio_features(audio, train, dtype)
    self.sow('intermediates', 'fused_frame_features', fused)

    # Step 7-9: projection, temporal transformer, classifier (float32).
    h = nn.Dense(c.temporal_width, name='vision_proj', **initializers.torch_linear(c.width))(fused)
    self.sow('intermediates', 'temporal_input', h)
    clip = temporal.TemporalTransformer(c.num_frames, c.temporal_layers, c.temporal_heads, c.temporal_head_dim,
                                        c.temporal_mlp_dim, name='temporal')(h)
    self.sow('intermediates', 'video_features', clip)
    return nn.Dense(c.num_classes, name='classifier', **initializers.torch_linear(clip.shape[-1]))(clip)

  def _audio_visual_features(self, video, audio, train, dtype):
    """Steps 1-6 of the paper's model: (N, T, D) float32, each frame's cls plus the clip's audio cls."""
    c = self.spec
    n, t = video.shape[:2]
    # Steps 1-4: tokens of every frame and of the spectrogram.
    vision = EncoderStem(c, vision_grid(c), dtype, name='vision')
    audio_stem = EncoderStem(c, audio_grid(c), dtype, name='audio')
    xv = vision(video.reshape((n * t,) + video.shape[2:]))
    xa = audio_stem(audio[..., None])
    # Step 5: the lockstep layers.
    per_layer = (jnp.asarray(drop_path_rates(c)), vision.prompt_updates(), audio_stem.prompt_updates())
    (xv, xa), _ = _scanned(LockstepLayer, c, t, train, dtype)((xv, xa), per_layer)
    # Step 6: final norms, cls tokens.
    fv = _final_cls(xv, 'vision_norm', dtype)
    fa = _final_cls(xa, 'audio_norm', dtype)
    return fv.reshape(n, t, -1) + fa[:, None]

  def _video_features(self, video, train, dtype):
    """Steps 1-6 without audio: (N, T, D), each frame's cls from the face ViT alone."""
    c = self.spec
    n, t = video.shape[:2]
    vision = EncoderStem(c, vision_grid(c), dtype, name='vision')
    xv = vision(video.reshape((n * t,) + video.shape[2:]))
    per_layer = (jnp.asarray(drop_path_rates(c)), vision.prompt_updates())
    xv, _ = _scanned(EncoderLayer, c, 'vision', train, dtype)(xv, per_layer)
    return _final_cls(xv, 'vision_norm', dtype).reshape(n, t, -1)

  def _audio_features(self, audio, train, dtype):
    """Steps 1-6 without video: the clip's audio cls repeated for each of the num_frames temporal steps, which is
    what the paper's step 7 adds to every frame; (N, num_frames, D)."""
    c = self.spec
    audio_stem = EncoderStem(c, audio_grid(c), dtype, name='audio')
    xa = audio_stem(audio[..., None])
    per_layer = (jnp.asarray(drop_path_rates(c)), audio_stem.prompt_updates())
    xa, _ = _scanned(EncoderLayer, c, 'audio', train, dtype)(xa, per_layer)
    fa = _final_cls(xa, 'audio_norm', dtype)
    return jnp.broadcast_to(fa[:, None], (fa.shape[0], c.num_frames, fa.shape[-1]))
