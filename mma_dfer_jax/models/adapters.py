"""MMA-DFER's trainable adapters: the 128-d audio-visual fusion bottleneck and the progressive prompts."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mma_dfer_jax import cpu
from mma_dfer_jax.models.initializers import torch_linear

TORCH_LN_EPS = 1e-5  # nn.LayerNorm's default, used by every adapter norm
Dtype = Any


def _dot_general(ops, dtype):
  """The Dense matmul of `ops` (`cpu.implementations`), or this host's automatic one for `dtype`."""
  return (ops if ops is not None else cpu.implementations(dtype=dtype)).dot_general


class Bottleneck(nn.Module):
  """z = LN(Linear_{D->F}(x)) on every token: the adapter's way into the shared fusion space."""
  fusion_width: int
  dtype: Dtype = jnp.float32
  ops: cpu.Implementations | None = None  # None: this host's automatic choice for `dtype`

  @nn.compact
  def __call__(self, x):
    dot_general = _dot_general(self.ops, self.dtype)
    z = nn.Dense(self.fusion_width, dtype=self.dtype, dot_general=dot_general, name='proj',
                 **torch_linear(x.shape[-1]))(x)
    return nn.LayerNorm(epsilon=TORCH_LN_EPS, dtype=self.dtype, name='norm')(z)


class GatedUp(nn.Module):
  """x + tanh(gate) * GELU(Linear_{F->D}(z)) on every token; the gate starts at 0, so a fresh adapter is silent."""
  dtype: Dtype = jnp.float32
  ops: cpu.Implementations | None = None  # None: this host's automatic choice for `dtype`

  @nn.compact
  def __call__(self, x, z):
    dot_general = _dot_general(self.ops, self.dtype)
    up = nn.Dense(x.shape[-1], dtype=self.dtype, dot_general=dot_general, name='proj',
                  **torch_linear(z.shape[-1]))(z)
    up = nn.gelu(up, approximate=False)
    gate = self.param('gate', nn.initializers.zeros, ())
    return x + jnp.tanh(gate).astype(x.dtype) * up


class FusionAdapter(nn.Module):
  """One layer's audio-visual exchange (docs/model.md, step 5).

  Each modality is squeezed to `fusion_width`, receives the other modality's mean over all of its tokens (and, for
  audio, over all frames of the clip), and is added back through a gated up-projection.
  """
  fusion_width: int
  num_frames: int
  dtype: Dtype = jnp.float32
  ops: cpu.Implementations | None = None  # None: this host's automatic choice for `dtype`

  @nn.compact
  def __call__(self, xv, xa):
    # xv: (N*T, Lv, D) frame tokens; xa: (N, La, D) audio tokens.
    zv = Bottleneck(self.fusion_width, self.dtype, self.ops, name='vision_down')(xv)
    za = Bottleneck(self.fusion_width, self.dtype, self.ops, name='audio_down')(xa)
    n, t = xa.shape[0], self.num_frames
    zv_clip = zv.reshape(n, t, zv.shape[1], self.fusion_width)
    audio_summary = za.mean(axis=1)                  # (N, F)
    vision_summary = zv_clip.mean(axis=(1, 2))       # (N, F): of zv, before it hears the audio
    zv2 = (zv_clip + audio_summary[:, None, None]).reshape(zv.shape)
    za2 = za + vision_summary[:, None]
    xv = GatedUp(self.dtype, self.ops, name='vision_up')(xv, zv2)
    xa = GatedUp(self.dtype, self.ops, name='audio_up')(xa, za2)
    return xv, xa


def progressive_prompt_update(prompts_progr, layer, prompts_per_stage, num_prompts):
  """The additive prompt update of one layer, as (num_prompts, D) rows (zero outside the active stage).

  After layer i with i % 6 == 0, prompt slots [s*k, (s+1)*k) get += prompts_progr[s], s = i // 6. Written as a dense
  update so that every layer of the scan has the same shape.
  """
  stage = layer // 6
  update = jnp.zeros((num_prompts, prompts_progr.shape[-1]), prompts_progr.dtype)
  if layer % 6 == 0:
    update = update.at[stage * prompts_per_stage:(stage + 1) * prompts_per_stage].set(prompts_progr[stage])
  return update
