"""The settings every experiment config shares, re-exported for config files written as `from configs import common`.

They live in the package (mma_dfer_jax/settings.py): new config files import `from mma_dfer_jax import settings`.
"""
from mma_dfer_jax.settings import base_config  # noqa: F401
from mma_dfer_jax.settings import model_config  # noqa: F401
from mma_dfer_jax.settings import paper_config  # noqa: F401
