"""CREMA-D with the paper's recipe: 6 classes (anger, disgust, fear, happy, neutral, sad), 5 subject-independent
folds (HiCMAE's actor split; data/cremad/README.md), audio and video.

  python -m data.cremad.build --manual_dir /data/CREMA-D --data_dir datasets
  python launch.py --config configs/cremad.py --workdir runs/cremad --mode cross_validate
"""
from configs import common

NUM_FOLDS = 5  # config.fold is 1..5


def get_config():
  c = common.base_config()
  c.dataset = 'cremad'
  c.fold = 1
  c.data_dir = 'datasets'
  c.model = common.model_config(num_classes=6)
  c.init.face_checkpoint = 'weights/mae_face_pretrain_vit_base.pth'
  c.init.audio_checkpoint = 'weights/audiomae_pretrained.pth'
  return c
