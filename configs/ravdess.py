"""RAVDESS audio-visual speech with the paper's recipe: 8 classes (neutral, calm, happy, sad, angry, fearful,
disgust, surprised), 6 subject-independent folds of 4 actors (fold k tests actors 4k-3..4k; data/ravdess/README.md),
audio and video.

  python -m data.ravdess.build --manual_dir /data/RAVDESS --data_dir datasets
  python launch.py --config configs/ravdess.py --workdir runs/ravdess --mode cross_validate --folds 1,2,3,4,5,6
"""
from configs import common

NUM_FOLDS = 6  # config.fold is 1..6


def get_config():
  c = common.base_config()
  c.dataset = 'ravdess'
  c.fold = 1
  c.data_dir = 'datasets'
  c.model = common.model_config(num_classes=8)
  c.init.face_checkpoint = 'weights/mae_face_pretrain_vit_base.pth'
  c.init.audio_checkpoint = 'weights/audiomae_pretrained.pth'
  return c
