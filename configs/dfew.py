"""DFEW, the paper's recipe: 7 classes, 25 epochs, batch 8, AdamW 1e-4 / 1e-2, per-epoch cosine."""
from configs import common


def get_config():
  c = common.base_config()
  c.dataset = 'dfew'
  c.data_dir = 'datasets'
  c.model = common.model_config(num_classes=7)
  c.init.face_checkpoint = 'weights/mae_face_pretrain_vit_base.pth'
  c.init.audio_checkpoint = 'weights/audiomae_pretrained.pth'
  return c
