"""The frozen self-supervised encoders: timm-style ViT pieces (MAE-Face for frames, AudioMAE for fbanks).

Channels-last. Blocks are pre-norm with qkv bias, exact GELU and LayerNorm eps 1e-6, as timm builds ViT-B/16.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mma_dfer_jax import cpu
from mma_dfer_jax.models.initializers import scaled_normal

VIT_LN_EPS = 1e-6
Dtype = Any


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """Stochastic depth, one Bernoulli draw per sample (timm's `drop_path`, scaled by 1/keep).

  `rate` may be traced (it differs per scanned layer); rate 0 keeps every sample and divides by 1, so it is exact.
  The keep probability and the 1/keep scaling are float32 whatever the compute dtype (bfloat16 would round 0.9 to
  0.8984 and bias the kept samples' scale); the result is rounded to `x.dtype` once.
  """
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, (x.astype(jnp.float32) / keep_prob).astype(x.dtype), jnp.zeros_like(x))


def _implementations(ops, dtype):
  """The blocks' attention and matmuls: `ops` as given (the model resolves them once, `cpu.implementations`), or
  for a block built on its own this host's automatic choice for `dtype`."""
  return ops if ops is not None else cpu.implementations(dtype=dtype)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (with bias), as timm's ViT."""
  num_heads: int
  dtype: Dtype = jnp.float32
  ops: cpu.Implementations | None = None

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    ops = _implementations(self.ops, self.dtype)
    qkv = nn.Dense(3 * width, dtype=self.dtype, dot_general=ops.dot_general, name='qkv')(x)
    out = ops.attention(qkv.reshape(batch, length, 3, self.num_heads, head_dim))
    return nn.Dense(width, dtype=self.dtype, dot_general=ops.dot_general,
                    name='proj')(out.reshape(batch, length, width))


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32
  ops: cpu.Implementations | None = None

  @nn.compact
  def __call__(self, x):
    dot_general = _implementations(self.ops, self.dtype).dot_general
    h = nn.Dense(self.hidden_dim, dtype=self.dtype, dot_general=dot_general, name='fc1')(x)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, dot_general=dot_general, name='fc2')(h)


class EncoderBlock(nn.Module):
  """x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x)))."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  ops: cpu.Implementations | None = None

  @nn.compact
  def __call__(self, x, drop_rate, train: bool):
    def residual(branch):
      if train:
        return drop_path(branch, drop_rate, self.make_rng('dropout'))
      return branch

    h = nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=self.dtype, name='norm1')(x)
    x = x + residual(Attention(self.num_heads, self.dtype, self.ops, name='attn')(h))
    h = nn.LayerNorm(epsilon=VIT_LN_EPS, dtype=self.dtype, name='norm2')(x)
    return x + residual(Mlp(self.mlp_dim, self.dtype, self.ops, name='mlp')(h))


class TokenEmbedding(nn.Module):
  """Tokens entering block 0: [cls, patches (row-major), prompts] + position embedding.

  The position embedding covers all 1 + patches + prompts tokens and is trainable in MMA-DFER.
  """
  width: int
  patch_size: int
  num_patches: int
  num_prompts: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='patch_embed')(images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)
    if x.shape[1] != self.num_patches:
      raise ValueError(f'input of shape {images.shape[1:]} gives {x.shape[1]} patches; the model expects '
                       f'{self.num_patches}: check model.img_size / model.audio_frames / model.audio_mels')
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, self.width))
    prompts = self.param('prompts_init', scaled_normal(self.width ** -0.5), (self.num_prompts, self.width))
    pos = self.param('pos_embed', nn.initializers.normal(1.0),
                     (1, 1 + self.num_patches + self.num_prompts, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x,
                         jnp.broadcast_to(prompts, (batch,) + prompts.shape).astype(x.dtype)], axis=1)
    return x + pos.astype(x.dtype)

