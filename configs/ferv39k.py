"""FERV39k with the paper's recipe: 7 classes (DFEW's), the official train/test split (built as fold 1; fold is
always 1), no audio: every clip's fbank is the silent one, as MAFW's clips without audio get (data/ferv39k/README.md).

The model is the audio-visual one fed the silent fbank; a video-only model (config.model.modalities, where
available) is the natural choice for this dataset.

  python -m data.ferv39k.build --manual_dir /data/FERV39k --data_dir datasets
  python launch.py --config configs/ferv39k.py --workdir runs/ferv39k
"""
from configs import common

NUM_FOLDS = 1  # the official split: config.fold is 1


def get_config():
  c = common.base_config()
  c.dataset = 'ferv39k'
  c.fold = 1
  c.data_dir = 'datasets'
  c.model = common.model_config(num_classes=7)
  c.init.face_checkpoint = 'weights/mae_face_pretrain_vit_base.pth'
  c.init.audio_checkpoint = 'weights/audiomae_pretrained.pth'
  return c
