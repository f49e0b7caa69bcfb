"""Flax Linen modules of MMA-DFER: the one factory that builds the model from config.model (`build`), and the one
place that builds inputs to trace it with."""
import jax
import jax.numpy as jnp

from mma_dfer_jax.models.mma_dfer import MMADFER  # noqa: F401
from mma_dfer_jax.models.spec import model_spec
from mma_dfer_jax.models.spec import ModelSpec  # noqa: F401


def build(model_config) -> MMADFER:
  """The model of `config.model` (a ConfigDict or a ModelSpec), its settings as typed fields (models/spec.py)."""
  return MMADFER(model_spec(model_config))


def dummy_inputs(model_config, batch: int = 1) -> tuple:
  """(video, audio) zeros of the model's input shapes, float32: video (batch, T, H, W, 3), fbank (batch, frames,
  mels). For initialising parameters and tracing shapes; inside `jax.eval_shape` nothing is allocated."""
  c = model_config
  return (jnp.zeros((batch, c.num_frames, c.img_size, c.img_size, 3), jnp.float32),
          jnp.zeros((batch, c.audio_frames, c.audio_mels), jnp.float32))


def init_params(model_config, rng) -> dict:
  """Freshly initialised parameters of `MMADFER(model_config)` (compiled, so the paper's model initialises in
  seconds); `jax.eval_shape(lambda: init_params(c, rng))` gives their shapes without computing them."""
  return jax.jit(build(model_config).init)(rng, *dummy_inputs(model_config))['params']
