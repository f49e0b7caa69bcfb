"""Train-pipeline throughput on a miniature DFEW of realistic 224x224 face frames (for BENCHMARKS.md).

  taskset -c 0 python -m data.dfew.throughput --work /tmp/bench_dfew --read_threads 1
  taskset -c 0,1 python -m data.dfew.throughput --work /tmp/bench_dfew --read_threads 2

Makes (once per frame size) `<work>/<size>px/DFEW` in the official layout: `--clips` clips of `--frames` frames,
each frame a `--frame_size` (default 224, DFEW's clip_224x224) square centre crop of a video's frames (default: the
shared face-and-speech fixture) saved as JPEG quality 95, the clip's wav taken from the same video; builds fold 1
with the DFEW builder; then runs `input_pipeline.measure_throughput` at 224 px, 16 frames, augmentation on, and
prints frames/s.
"""
import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from configs import dfew as dfew_config
from data import common
from data.dfew import dfew_dataset_builder as dfew
from mma_dfer_jax import input_pipeline
from mma_dfer_jax import video as video_lib

DEFAULT_VIDEO = '/work/shared/fixtures/audio/clip_face_speech.mp4'


def _square(frame: np.ndarray, size: int) -> np.ndarray:
  h, w = frame.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return cv2.resize(frame[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)


def make_manual_dir(root: Path, video: str, clips: int, frames: int, frame_size: int = 224) -> Path:
  """A DFEW download of `clips` clips cut from `video` (clip k starts k frames later, wrapping around)."""
  if (root / 'EmoLabel_DataSplit').is_dir():
    return root
  source = [_square(f, frame_size) for f in video_lib.iter_frames(video)]
  wav = root / 'Clip' / 'raw_wav'
  wav.mkdir(parents=True)
  video_lib.extract_wav(video, wav / 'template.wav')
  for k in range(clips):
    folder = root / 'Clip' / 'clip_224x224' / f'{k + 1:05d}'
    folder.mkdir(parents=True)
    for t in range(frames):
      rgb = source[(k + t) % len(source)]
      ok, data = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
      assert ok
      (folder / f'{k + 1:05d}_{t + 1:05d}.jpg').write_bytes(data.tobytes())
    (wav / f'{k + 1}.wav').write_bytes((wav / 'template.wav').read_bytes())
  (wav / 'template.wav').unlink()
  rows = [f'{k + 1},{k % 7 + 1}' for k in range(clips)]
  for split, part in (('train', rows), ('test', rows[:4])):
    path = root / 'EmoLabel_DataSplit' / f'{split}(single-labeled)' / 'set_1.csv'
    path.parent.mkdir(parents=True)
    path.write_text('video_name,label\n' + '\n'.join(part) + '\n')
  return root


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--work', default='/tmp/bench_dfew')
  parser.add_argument('--video', default=DEFAULT_VIDEO)
  parser.add_argument('--clips', type=int, default=40)
  parser.add_argument('--frames', type=int, default=40)
  parser.add_argument('--frame_size', type=int, default=224, help='stored frames are this many pixels square')
  parser.add_argument('--read_threads', type=int, default=1)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--batch_size', type=int, default=8)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.ERROR)
  work = Path(args.work) / f'{args.frame_size}px'
  manual = make_manual_dir(work / 'DFEW', args.video, args.clips, args.frames, args.frame_size)
  common.build(dfew.Dfew, manual, work / 'out', [1], workers=1)
  config = dfew_config.get_config()
  config.data_dir, config.fold = str(work / 'out'), 1
  config.batch_size, config.num_epochs = args.batch_size, 1000
  config.model.img_size, config.model.num_frames = 224, 16
  config.input.augment, config.input.read_threads, config.input.worker_count = True, args.read_threads, 0
  result = input_pipeline.measure_throughput(config, seconds=args.seconds)
  jpegs = list((manual / 'Clip' / 'clip_224x224').glob('*/*.jpg'))
  result.update(stored_frame_px=args.frame_size, mean_jpeg_kb=sum(p.stat().st_size for p in jpegs) / len(jpegs) / 1e3)
  print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == '__main__':
  main()
