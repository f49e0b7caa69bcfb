"""Extract the audio track of every video in a folder to wav, as the reference's mp42wav.sh did with ffmpeg.

  python data/extract_audio.py --src DFEW/Clip/original --dst DFEW/Clip/raw_wav [--workers 2] [--flat]

Videos are found in `--src` and its subfolders (DFEW's originals unpack as `original/part_<k>/<n>.mp4`; `--flat`
looks only in `--src` itself); their names must be unique. Each `<name>.<ext>` becomes `<dst>/<name>.wav`: PCM16 at
the track's own sample rate and channels (no resampling or down-mixing: the features are computed from the wav as
it is). Runs in a process pool with a progress bar and resumes: a wav that exists is complete (each is written
under a temporary name, then renamed) and is skipped. Clips without an audio track are counted, listed in
`<dst>/no_audio.txt`, and are not an error (the dataset gives them the silent fbank); clips that cannot be decoded
are listed in `<dst>/failed.txt`. A `--src` without any video is an error (exit 2), not an empty success.
"""
import argparse
import multiprocessing
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from mma_dfer_jax import video as video_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg', '.flv', '.wmv')
NO_AUDIO_LIST = 'no_audio.txt'
FAILED_LIST = 'failed.txt'


def find_videos(src: Path, recursive: bool = True):
  pattern = '**/*' if recursive else '*'
  return sorted(p for p in src.glob(pattern) if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def wav_path_for(video_path: Path, dst: Path) -> Path:
  return dst / f'{video_path.stem}.wav'


def _extract_one(job):
  """('done' | 'skipped' | 'no_audio' | 'failed', video path, message)."""
  video_path, wav_path = job
  if wav_path.is_file():
    return 'skipped', video_path, ''
  try:
    wrote = video_lib.extract_wav(video_path, wav_path)
  except video_lib.VideoError as e:
    return 'failed', video_path, str(e)
  return ('done' if wrote else 'no_audio'), video_path, ''


def extract_folder(src, dst, workers: int = 2, recursive: bool = True, progress: bool = True) -> dict:
  """Extracts every video under `src` to `dst`; returns the counts and the clips without audio / that failed."""
  src, dst = Path(src), Path(dst)
  if not src.is_dir():
    raise NotADirectoryError(f'{src}: no such folder of videos (--src)')
  videos = find_videos(src, recursive)
  if not videos:
    where = 'in it or its subfolders' if recursive else 'in it (without --flat its subfolders are searched too)'
    raise ValueError(f'--src {src}: no video files ({", ".join(VIDEO_EXTENSIONS)}) {where}')
  dst.mkdir(parents=True, exist_ok=True)
  names = {}
  for v in videos:
    if v.stem in names:
      raise ValueError(f'{v} and {names[v.stem]} would both write {v.stem}.wav: extract them to separate folders')
    names[v.stem] = v
  jobs = [(v, wav_path_for(v, dst)) for v in videos]
  summary = {'done': 0, 'skipped': 0, 'no_audio': [], 'failed': []}
  bar = tqdm(total=len(jobs), desc='audio', unit='clip', disable=not progress)
  if workers > 1 and len(jobs) > 1:
    pool = multiprocessing.get_context('spawn').Pool(workers)
    results = pool.imap_unordered(_extract_one, jobs, chunksize=4)
  else:
    pool, results = None, map(_extract_one, jobs)
  try:
    for status, video_path, message in results:
      if status in ('no_audio', 'failed'):
        summary[status].append(str(video_path) + (f'\t{message}' if message else ''))
      else:
        summary[status] += 1
      bar.update()
  finally:
    bar.close()
    if pool is not None:
      pool.close()
      pool.join()
  for name, items in ((NO_AUDIO_LIST, summary['no_audio']), (FAILED_LIST, summary['failed'])):
    if items:
      (dst / name).write_text('\n'.join(sorted(items)) + '\n')
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--src', required=True, help='folder of video clips')
  parser.add_argument('--dst', required=True, help='folder for the wav files')
  parser.add_argument('--workers', type=int, default=max(1, multiprocessing.cpu_count()), help='processes')
  parser.add_argument('--flat', action='store_true', help='look only in --src itself, not in its subfolders')
  parser.add_argument('--recursive', action='store_true', help=argparse.SUPPRESS)  # the default now; kept for old scripts
  args = parser.parse_args(argv)
  try:
    summary = extract_folder(args.src, args.dst, args.workers, not args.flat)
  except (NotADirectoryError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f"wrote {summary['done']}, already there {summary['skipped']}, without audio {len(summary['no_audio'])}"
        + (f' (listed in {Path(args.dst) / NO_AUDIO_LIST})' if summary['no_audio'] else '')
        + f", failed {len(summary['failed'])}"
        + (f' (listed in {Path(args.dst) / FAILED_LIST})' if summary['failed'] else ''))
  return 1 if summary['failed'] else 0


if __name__ == '__main__':
  from mma_dfer_jax import cli  # pylint: disable=g-import-not-at-top  (one line and exit 2 for a user error)
  sys.exit(cli.guard(main)())
