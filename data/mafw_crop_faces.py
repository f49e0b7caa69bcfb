"""Crop the faces of MAFW's original clips into frame folders, as the reference's extract_faces_mfaw.py did.

  python -m data.mafw_crop_faces --src MAFW/data/clips --dst MAFW/clips_faces [--workers 2] [--smooth]

(from the repository root). Each clip `<name>.<ext>` becomes a folder `<dst>/<name>/` (the name up to its first
dot, as the reference named them) holding one JPEG per decoded frame, `0.jpg, 1.jpg, ...`, each the frame's face
crop at its own size (not resized: the loader resizes to img_size) by the reference's rule (faces.py): the union box
of all faces, squared, clipped to the image; a centre square of half the shorter side when no face is found. JPEG
quality 95, as OpenCV's imwrite wrote them. By default each frame is cropped on its own, as in the reference (the
released models were trained on such crops); `--smooth` uses the boxes smoothed over the clip instead.

Runs in a process pool with a progress bar and resumes: a clip's folder is written under a temporary name and
renamed when complete, so an existing `<dst>/<name>/` is skipped. Clips that cannot be decoded are listed in
`<dst>/failed.txt`.
"""
import os
from pathlib import Path
import shutil
import sys

if not __package__:  # run as a file, where the `data` package is not importable
  print('error: run it from the repository root as: python -m data.mafw_crop_faces --src ... --dst ...',
        file=sys.stderr)
  sys.exit(2)

from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from data import tools  # pylint: disable=g-import-not-at-top,wrong-import-position
from mma_dfer_jax import faces  # pylint: disable=g-import-not-at-top,wrong-import-position
from mma_dfer_jax import video as video_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

JPEG_QUALITY = 95  # cv2.imwrite's default
FAILED_LIST = 'failed.txt'


def clip_folder_name(video_path: Path) -> str:
  return video_path.name.split('.')[0]


def crop_clip(video_path, out_dir, smooth: bool = False) -> int:
  """Writes the face crop of every frame of one clip to out_dir/<k>.jpg; returns the number of frames."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  boxes = None
  if smooth:  # a first pass finds the boxes, the second crops with the smoothed ones
    boxes = faces.smooth_boxes([faces.union_box(faces.detect_faces(f)) for f in video_lib.iter_frames(video_path)])
  count = 0
  for k, frame in enumerate(video_lib.iter_frames(video_path)):
    box = boxes[k] if boxes is not None and k < len(boxes) else faces.union_box(faces.detect_faces(frame))
    crop = faces.crop_box(frame, box)
    Image.fromarray(crop).save(out_dir / f'{k}.jpg', quality=JPEG_QUALITY)
    count += 1
  return count


def _crop_one(job):
  """('done' | 'skipped' | 'failed', video path, message)."""
  video_path, final_dir, smooth = job
  if final_dir.is_dir():
    return 'skipped', video_path, ''
  tmp_dir = final_dir.with_name(f'.{final_dir.name}.{os.getpid()}.tmp')
  try:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir)
    count = crop_clip(video_path, tmp_dir, smooth)
    if count == 0:
      raise video_lib.VideoError(f'{video_path}: no frames decoded')
    os.replace(tmp_dir, final_dir)
    return 'done', video_path, str(count)
  except video_lib.VideoError as e:
    return 'failed', video_path, str(e)
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)


def crop_folder(src, dst, workers: int = 2, smooth: bool = False, progress: bool = True) -> dict:
  """Crops every clip in `src` into `dst`; returns counts and the clips that failed."""
  src, dst = Path(src), Path(dst)
  if not src.is_dir():
    raise NotADirectoryError(f'{src}: no such folder of clips (--src)')
  dst.mkdir(parents=True, exist_ok=True)
  jobs = [(v, dst / clip_folder_name(v), smooth) for v in tools.find_videos(src)]
  summary = {'done': 0, 'skipped': 0, 'failed': []}
  for status, video_path, message in tools.map_jobs(_crop_one, jobs, workers, 'faces', progress, ordered=False):
    if status == 'failed':
      summary['failed'].append(f'{video_path}\t{message}')
    else:
      summary[status] += 1
  tools.write_list(dst, FAILED_LIST, summary['failed'])
  return summary


@tools.guarded
def main(argv=None) -> int:
  parser = tools.folder_parser(__doc__.split('\n')[0], "folder of MAFW's original clips",
                               'folder for the per-clip frame folders (clips_faces)')
  parser.add_argument('--smooth', action='store_true', help='smooth the face boxes over each clip')
  args = parser.parse_args(argv)
  summary = crop_folder(args.src, args.dst, args.workers, args.smooth)
  print(f"cropped {summary['done']}, already there {summary['skipped']}, "
        f"{tools.counted('failed', summary['failed'], args.dst, FAILED_LIST)}")
  return 1 if summary['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
