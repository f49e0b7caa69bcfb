"""Flax Linen modules of MMA-DFER."""
from mma_dfer_jax.models.mma_dfer import MMADFER  # noqa: F401
