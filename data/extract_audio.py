"""Extract the audio track of every video in a folder to wav, as the reference's mp42wav.sh did with ffmpeg.

  python -m data.extract_audio --src DFEW/Clip/original --dst DFEW/Clip/raw_wav [--workers 2] [--flat]

(from the repository root). Videos are found in `--src` and its subfolders (DFEW's originals unpack as
`original/part_<k>/<n>.mp4`; `--flat` looks only in `--src` itself); their names must be unique. Each
`<name>.<ext>` becomes `<dst>/<name>.wav`: PCM16 at the track's own sample rate and channels (no resampling or
down-mixing: the features are computed from the wav as it is). Runs in a process pool with a progress bar and
resumes: a wav that exists is complete (each is written under a temporary name, then renamed) and is skipped. Clips
without an audio track are counted, listed in `<dst>/no_audio.txt`, and are not an error (the dataset gives them the
silent fbank); clips that cannot be decoded are listed in `<dst>/failed.txt`. A `--src` without any video is an
error (exit 2), not an empty success.
"""
import argparse
from pathlib import Path
import sys

if not __package__:  # run as a file, where the `data` package is not importable
  print('error: run it from the repository root as: python -m data.extract_audio --src ... --dst ...',
        file=sys.stderr)
  sys.exit(2)

from data import tools  # pylint: disable=g-import-not-at-top,wrong-import-position
from mma_dfer_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from mma_dfer_jax import video as video_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

NO_AUDIO_LIST = 'no_audio.txt'
FAILED_LIST = 'failed.txt'


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
  videos = tools.find_videos(src, recursive)
  if not videos:
    where = 'in it or its subfolders' if recursive else 'in it (without --flat its subfolders are searched too)'
    raise cli.UserError(f'--src {src}: no video files ({", ".join(tools.VIDEO_EXTENSIONS)}) {where}')
  names = {}
  for v in videos:
    if v.stem in names:
      raise cli.UserError(f'{v} and {names[v.stem]} would both write {v.stem}.wav: extract them to separate folders')
    names[v.stem] = v
  dst.mkdir(parents=True, exist_ok=True)
  jobs = [(v, wav_path_for(v, dst)) for v in videos]
  summary = {'done': 0, 'skipped': 0, 'no_audio': [], 'failed': []}
  for status, video_path, message in tools.map_jobs(_extract_one, jobs, workers, 'audio', progress, ordered=False,
                                                    chunksize=4):
    if status in ('no_audio', 'failed'):
      summary[status].append(str(video_path) + (f'\t{message}' if message else ''))
    else:
      summary[status] += 1
  tools.write_list(dst, NO_AUDIO_LIST, summary['no_audio'])
  tools.write_list(dst, FAILED_LIST, summary['failed'])
  return summary


@tools.guarded
def main(argv=None) -> int:
  parser = tools.folder_parser(__doc__.split('\n')[0], 'folder of video clips', 'folder for the wav files')
  parser.add_argument('--flat', action='store_true', help='look only in --src itself, not in its subfolders')
  parser.add_argument('--recursive', action='store_true', help=argparse.SUPPRESS)  # the default; for old scripts
  args = parser.parse_args(argv)
  summary = extract_folder(args.src, args.dst, args.workers, not args.flat)
  print(f"wrote {summary['done']}, already there {summary['skipped']}, "
        f"{tools.counted('without audio', summary['no_audio'], args.dst, NO_AUDIO_LIST)}, "
        f"{tools.counted('failed', summary['failed'], args.dst, FAILED_LIST)}")
  return 1 if summary['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
