"""The benchmark runs end to end on a tiny model and reports sane figures (no timing assertions)."""
import json
import sys

import pytest

from conftest import ROOT

from configs import dfew
from mma_dfer_jax import bench
from mma_dfer_jax import cpu

TINY = ['--config.model.width=32', '--config.model.depth=6', '--config.model.num_heads=2',
        '--config.model.mlp_dim=64', '--config.model.img_size=32', '--config.model.num_frames=4',
        '--config.model.audio_frames=64', '--config.model.audio_mels=32', '--config.model.fusion_width=16',
        '--config.model.temporal_width=32', '--config.model.temporal_heads=2', '--config.model.temporal_head_dim=16',
        '--config.model.temporal_mlp_dim=64', '--config.batch_size=2',
        '--config.cpu_keep_freed_memory=False']  # keeps this pytest process's allocator as it is


@pytest.mark.slow
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
  assert record['cpu_keep_freed_memory'] is False
  assert record['kernels'] == cpu.implementations(dfew.get_config().model).names
  # The machine's matmul limit in the same run, and the step's model FLOP/s against it.
  assert record['sgemm_gflops'] > 0 and record['sgemm_shape'] == [3248, 768, 3072]
  expected = record['flops_analytic_per_step'] / record['step_time_s'] / (record['sgemm_gflops'] * 1e9)
  assert abs(record['achieved_over_sgemm'] - expected) < 1e-9 * expected

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


def test_sgemm_gflops_counts_two_flops_per_multiply_add(monkeypatch):
  ticks = iter([0.0, 0.5, 1.0, 3.0])   # two timed calls of 0.5 s and 2 s: the median 1.25 s
  monkeypatch.setattr(bench.time, 'perf_counter', lambda: next(ticks))
  assert bench.sgemm_gflops((8, 4, 2), repeats=2) == 2 * 8 * 4 * 2 / 1.25 / 1e9


def test_peak_table():
  class Device:
    def __init__(self, platform, kind):
      self.platform, self.device_kind = platform, kind
  assert bench.peak_flops_per_device(Device('cpu', 'cpu'), 'float32') is None
  assert bench.peak_flops_per_device(Device('gpu', 'NVIDIA H100 80GB HBM3'), 'bfloat16') == 989e12
  assert bench.peak_flops_per_device(Device('gpu', 'NVIDIA H200'), 'bfloat16') == 989e12
  assert bench.peak_flops_per_device(Device('tpu', 'TPU v5 lite'), 'bfloat16') == 197e12
  assert bench.peak_flops_per_device(Device('gpu', 'Some future GPU'), 'bfloat16') is None


@pytest.mark.slow
def test_einsum_attention_matches_the_default():
  """attention_impl='einsum' (the faster one on XLA:CPU, BENCHMARKS.md) computes the same attention."""
  import jax
  import jax.numpy as jnp
  from mma_dfer_jax.models import vit
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 32))
  default, einsum = vit.Attention(4), vit.Attention(4, ops=cpu.Implementations('einsum', 'xla'))
  params = default.init(jax.random.PRNGKey(1), x)
  assert jnp.allclose(default.apply(params, x), einsum.apply(params, x), atol=1e-5, rtol=1e-5)
  grads = [jax.grad(lambda p, m=m: (m.apply(p, x) ** 2).sum())(params) for m in (default, einsum)]
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
    assert jnp.allclose(a, b, atol=1e-4, rtol=1e-4)


FAKE_REFERENCE_TOOL = '''
import time, types
class _Loss:
  def backward(self):
    time.sleep(0.01)
class MMADFER:
  def __init__(self, width, depth, heads, img, classes, temporal_layers, drop_path):
    assert (width, depth, heads, img, classes) == (32, 6, 2, 32, 5), (width, depth, heads, img, classes)
  def train(self):
    return self
  def trainable(self):
    return []
  def __call__(self, video, audio):
    return None
class _Optimizer:
  def __init__(self, params, lr, weight_decay):
    pass
  def zero_grad(self):
    pass
  def step(self):
    pass
torch = types.SimpleNamespace(
    __version__='fake', manual_seed=lambda s: None, get_num_threads=lambda: 1,
    rand=lambda *shape: None, randn=lambda *shape: None, randint=lambda lo, hi, shape: None,
    optim=types.SimpleNamespace(AdamW=_Optimizer))
F = types.SimpleNamespace(cross_entropy=lambda logits, labels: _Loss())
'''


@pytest.mark.slow
def test_reference_steps_interleave_with_ours(tmp_path, capsys):
  """`--reference_python/--reference_tool` drive the reference recipe step by step (here a stand-in for torch)."""
  tool = tmp_path / 'fake_torch_mma_dfer.py'
  tool.write_text(FAKE_REFERENCE_TOOL)
  tiny = [a for a in TINY if 'num_frames' not in a and 'mlp_dim' not in a and 'temporal' not in a]
  argv = ['bench', '--config', str(ROOT / 'configs' / 'dfew.py'), *tiny, '--config.model.mlp_dim=128',
          '--config.model.num_classes=5', '--steps', '3', '--warmup', '1', '--reference_python', sys.executable,
          '--reference_tool', str(tool)]
  assert bench.main(argv) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  reference = record['reference']
  assert reference['torch_version'] == 'fake' and len(reference['step_times_s']) == 3
  assert all(t >= 0.01 for t in reference['step_times_s'])
  assert abs(record['ours_over_reference'] - record['step_time_s'] / reference['step_time_s']) < 1e-9


def test_reference_timing_refuses_shapes_the_tool_cannot_build():
  from mma_dfer_jax.cpu import reference_timing
  config = dfew.get_config().model
  config.num_frames = 8
  with pytest.raises(ValueError, match='num_frames=8'):
    reference_timing.ReferenceStepper(sys.executable, 'unused.py', config, 1)
