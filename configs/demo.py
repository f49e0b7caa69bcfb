"""The demo: a tiny MMA-DFER on synthetic audio-visual clips; trains and evaluates in minutes on a laptop CPU.

The encoders are random and frozen (there are no SSL weights for this size), so only the adapters, prompts and the
temporal head learn, as in the paper's recipe.
"""
from mma_dfer_jax import settings


def get_config():
  c = settings.base_config()
  c.dataset = 'synthetic'
  c.data_dir = ''                # the synthetic clips are generated in memory from the seed
  c.num_epochs = 12
  c.batch_size = 16
  c.eval_batch_size = 32
  c.learning_rate = 3e-3
  c.weight_decay = 1e-2
  c.seed = 1

  m = c.model
  m.num_classes = 4
  m.img_size = 32
  m.num_frames = 16
  m.width = 48
  m.depth = 6
  m.num_heads = 3
  m.mlp_dim = 96
  m.fusion_width = 32
  m.temporal_width = 64
  m.temporal_heads = 2
  m.temporal_head_dim = 32
  m.temporal_mlp_dim = 128
  m.drop_path_rate = 0.0

  c.init.face_checkpoint = ''
  c.init.audio_checkpoint = ''
  c.checkpoint_every_steps = 20
  c.log_every_steps = 5
  return c
