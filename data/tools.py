"""What the data preparation tools share: a folder-to-folder command line, a process pool with a progress bar, the
lists of clips a run could not handle, and the error contract (mma_dfer_jax/cli.py: one line, exit 2).

The tools (data/extract_audio.py, data/mafw_crop_faces.py) run from the repository root as modules,
`python -m data.<tool> --src FOLDER --dst FOLDER [--workers N]`, and the dataset builders (data/common.py) prepare
their clips with `map_jobs`. This module imports nothing heavy: a tool's `--help` answers at once.
"""
import argparse
import functools
import multiprocessing
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

from tqdm import tqdm

from mma_dfer_jax import cli

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg', '.flv', '.wmv')


def find_videos(src: Path, recursive: bool = False) -> list:
  """The video files in src (and its subfolders when recursive), sorted by path."""
  candidates = src.glob('**/*') if recursive else src.iterdir()
  return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def folder_parser(description: str, src_help: str, dst_help: str) -> argparse.ArgumentParser:
  """A tool's command line: --src, --dst and --workers (default: one process per core); the tool adds its own."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--src', required=True, help=src_help)
  parser.add_argument('--dst', required=True, help=dst_help)
  parser.add_argument('--workers', type=int, default=max(1, multiprocessing.cpu_count()), help='processes')
  return parser


def map_jobs(function: Callable, jobs: Sequence, workers: int = 1, desc: str = '', progress: bool = True,
             ordered: bool = True, chunksize: int = 1, jobs_per_process: Optional[int] = None) -> Iterator:
  """function over jobs with a progress bar: in this process for one worker or one job, else in a pool of `spawn`
  processes (in job order when ordered). With jobs_per_process, always in a pool (of at least one process) whose
  processes are replaced after that many jobs: a process's leaked memory goes when it ends (see
  data/common.py, prepared_clips)."""
  bar = dict(total=len(jobs), desc=desc, unit='clip', smoothing=0.05, disable=not progress)
  if (workers <= 1 or len(jobs) <= 1) and not jobs_per_process:
    yield from tqdm(map(function, jobs), **bar)
    return
  with multiprocessing.get_context('spawn').Pool(max(workers, 1), maxtasksperchild=jobs_per_process) as pool:
    results = (pool.imap if ordered else pool.imap_unordered)(function, jobs, chunksize=chunksize)
    yield from tqdm(results, **bar)


def write_list(folder: Path, name: str, items: Sequence[str]) -> None:
  """folder/name holding items a line, sorted; nothing when there are none."""
  if items:
    (Path(folder) / name).write_text('\n'.join(sorted(items)) + '\n')


def counted(what: str, items: Sequence[str], folder: Path, name: str) -> str:
  """'<what> <count>', with where write_list put them when there are any."""
  return f'{what} {len(items)}' + (f' (listed in {Path(folder) / name})' if items else '')


def guarded(main: Callable[..., int], also: Tuple[type, ...] = ()) -> Callable[..., int]:
  """main, with a user error reported as one line and exit code 2 returned instead of raised: what
  mma_dfer_jax/cli.py counts as one, and the types in `also`. Other errors keep their traceback."""

  @functools.wraps(main)
  def guarded_main(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-exception-caught  (re-raised unless a user error)
      message = cli.user_error_message(e) or (' '.join(str(e).split()) if isinstance(e, also) else None)
      if message is None:
        raise
      cli.report(message)
      return cli.EXIT_USER_ERROR
  return guarded_main
