"""Shared test helpers: the reference fixtures and small model configs."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ and data/ import from the repository root
FIXTURES = ROOT.parent / 'shared' / 'fixtures'
REFERENCE_SMALL = FIXTURES / 'reference_small'


def require_fixture(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f'{path} is absent: parity tests need ../shared/fixtures beside the checkout')
  return path


def small_model_config(**overrides):
  """The reference_small fixture's model: ViT width 96, 3 heads, depth 12, MLP 384, 224 px, 7 classes."""
  from configs import common
  c = common.model_config(num_classes=7)
  c.width, c.num_heads, c.mlp_dim = 96, 3, 384
  c.drop_path_rate = 0.1
  c.update(overrides)
  return c


@pytest.fixture(scope='session')
def reference_small():
  return require_fixture(REFERENCE_SMALL)
