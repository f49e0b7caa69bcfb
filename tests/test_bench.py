"""The benchmark runs end to end on a tiny model and reports sane figures (no timing assertions)."""
import json

from conftest import ROOT

from configs import dfew
from mma_dfer_jax import bench

TINY = ['--config.model.width=32', '--config.model.depth=6', '--config.model.num_heads=2',
        '--config.model.mlp_dim=64', '--config.model.img_size=32', '--config.model.num_frames=4',
        '--config.model.audio_frames=64', '--config.model.audio_mels=32', '--config.model.fusion_width=16',
        '--config.model.temporal_width=32', '--config.model.temporal_heads=2', '--config.model.temporal_head_dim=16',
        '--config.model.temporal_mlp_dim=64', '--config.batch_size=2']


def test_main_prints_one_sane_json_line(capsys):
  argv = ['bench', '--config', str(ROOT / 'configs' / 'dfew.py'), *TINY, '--steps', '2', '--warmup', '1']
  assert bench.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])

  assert record['mode'] == 'train' and record['batch'] == 2 and record['dtype'] == 'float32'
  assert record['step_time_s'] > 0 and len(record['step_times_s']) == 2
  assert abs(record['samples_per_s'] - 2 / record['step_time_s']) < 1e-6 * record['samples_per_s']
  assert record['compile_s'] > 0
  assert record['device']['platform'] == 'cpu' and record['device']['count'] >= 1
  assert record['mfu'] is None and record['hfu'] is None  # no known peak on CPU
  assert record['peak_memory_bytes'] > 0 and record['memory_source']
  assert record['model']['width'] == 32 and record['model']['depth'] == 6

  # XLA counts what the step computes (the scan unrolled, elementwise ops too); the analytic count is the
  # matmuls alone. On this tiny model they agree within a small factor.
  assert record['flops_source'] == 'lowered_unrolled'
  assert record['flops_per_step'] > 0 and record['flops_analytic_per_step'] > 0
  assert 0.7 < record['flops_per_step'] / record['flops_analytic_per_step'] < 2.0


def test_analytic_flops_at_the_papers_size():
  c = dfew.get_config().model
  train = bench.analytic_flops(c, batch=8, train_mode=True)
  evaluation = bench.analytic_flops(c, batch=1, train_mode=False)
  # ~625 GFLOP of encoder blocks per clip (16 frames x 203 tokens + 263 audio tokens, 12 ViT-B blocks).
  assert 615e9 < train['encoder_blocks_forward_per_clip'] < 635e9
  assert 625e9 < train['forward_per_clip'] < 665e9    # + patch embeddings, adapters, temporal head
  assert evaluation['per_step'] == train['forward_per_clip']
  # Frozen encoders: the backward costs about one more forward (no weight gradients).
  assert 1.0 < train['backward_per_clip'] / train['forward_per_clip'] < 1.1
  assert train['per_step'] == 8 * (train['forward_per_clip'] + train['backward_per_clip'])


def test_peak_table():
  class Device:
    def __init__(self, platform, kind):
      self.platform, self.device_kind = platform, kind
  assert bench.peak_flops_per_device(Device('cpu', 'cpu'), 'float32') is None
  assert bench.peak_flops_per_device(Device('gpu', 'NVIDIA H100 80GB HBM3'), 'bfloat16') == 989e12
  assert bench.peak_flops_per_device(Device('gpu', 'NVIDIA H200'), 'bfloat16') == 989e12
  assert bench.peak_flops_per_device(Device('tpu', 'TPU v5 lite'), 'bfloat16') == 197e12
  assert bench.peak_flops_per_device(Device('gpu', 'Some future GPU'), 'bfloat16') is None


def test_einsum_attention_matches_the_default():
  """attention_impl='einsum' (the faster one on XLA:CPU, BENCHMARKS.md) computes the same attention."""
  import jax
  import jax.numpy as jnp
  from mma_dfer_jax.models import vit
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 32))
  default, einsum = vit.Attention(4), vit.Attention(4, attention_impl='einsum')
  params = default.init(jax.random.PRNGKey(1), x)
  assert jnp.allclose(default.apply(params, x), einsum.apply(params, x), atol=1e-5, rtol=1e-5)
  grads = [jax.grad(lambda p, m=m: (m.apply(p, x) ** 2).sum())(params) for m in (default, einsum)]
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
    assert jnp.allclose(a, b, atol=1e-4, rtol=1e-4)
