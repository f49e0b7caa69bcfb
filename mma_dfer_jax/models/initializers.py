"""Initialisers that reproduce how the reference (PyTorch) initialises its new, trainable tensors."""
import jax
import jax.numpy as jnp


def uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def scaled_normal(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * scale
  return init


def torch_linear(fan_in: int) -> dict:
  """nn.Linear's default: kaiming_uniform(a=sqrt(5)) weight and fan-in uniform bias, both U(+-1/sqrt(fan_in))."""
  bound = fan_in ** -0.5
  return dict(kernel_init=uniform(bound), bias_init=uniform(bound))
