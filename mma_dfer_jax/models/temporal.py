"""The temporal transformer that classifies a clip from its 16 fused frame features (docs/model.md, step 8).

Pre-norm blocks with bias-free q/kv projections and a tanh-approximate GELU feed-forward; no final norm. The
reference's PreNorm also owns a second LayerNorm that it never applies; we do not build it.
"""
import flax.linen as nn
import jax.numpy as jnp

from mma_dfer_jax.models.initializers import torch_linear

TORCH_LN_EPS = 1e-5


class TemporalAttention(nn.Module):
  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    inner = self.num_heads * self.head_dim
    q = nn.Dense(inner, use_bias=False, name='to_q', **torch_linear(width))(x)
    k, v = jnp.split(nn.Dense(2 * inner, use_bias=False, name='to_kv', **torch_linear(width))(x), 2, axis=-1)
    split = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)
    logits = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)) * self.head_dim ** -0.5
    out = jnp.einsum('bhqk,bkhd->bqhd', nn.softmax(logits, axis=-1), split(v))
    return nn.Dense(width, name='to_out', **torch_linear(inner))(out.reshape(batch, length, inner))


class TemporalBlock(nn.Module):
  num_heads: int
  head_dim: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(epsilon=TORCH_LN_EPS, name='attn_norm')(x)
    x = x + TemporalAttention(self.num_heads, self.head_dim, name='attn')(h)
    h = nn.LayerNorm(epsilon=TORCH_LN_EPS, name='ff_norm')(x)
    h = nn.Dense(self.mlp_dim, name='fc1', **torch_linear(x.shape[-1]))(h)
    h = nn.Dense(x.shape[-1], name='fc2', **torch_linear(self.mlp_dim))(nn.gelu(h, approximate=True))
    return x + h


class TemporalTransformer(nn.Module):
  """[cls, frame features] + position embedding -> blocks -> the cls token's output."""
  num_frames: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    batch, frames, width = x.shape
    if frames > self.num_frames:
      raise ValueError(f'{frames} frames given; the temporal position embedding has {self.num_frames} '
                       '(model.num_frames)')
    cls = self.param('cls_token', nn.initializers.normal(1.0), (1, 1, width))
    pos = self.param('pos_embedding', nn.initializers.normal(1.0), (1, self.num_frames + 1, width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1) + pos[:, :frames + 1]
    for i in range(self.num_layers):
      x = TemporalBlock(self.num_heads, self.head_dim, self.mlp_dim, name=f'block_{i}')(x)
    return x[:, 0]
