"""Step-time benchmark of the compiled train (or eval) step on synthetic clips; prints one JSON line.

  python -m mma_dfer_jax.bench --config configs/dfew.py [--config.key=value ...] [--mode train|eval]
      [--steps N] [--warmup N] [--with_input_pipeline]

Parameters are random (`models.init_params`), inputs are synthetic clips of the config's shapes (uint8 video,
float32 fbank), sharded over the config's mesh as in training. `step_time_s` is the median over `--steps` timed
steps after `--warmup` untimed ones, each blocking on its results. FLOPs:

- `flops_per_step`: XLA's cost analysis of the step. XLA counts a while-loop body once, so when the lockstep
  layers are scanned (scan_unroll < depth) it is taken from an unrolled lowering of the same step instead
  (`flops_source` says which), and with XLA's own attention and matmuls where the CPU kernels run (XLA cannot
  count into a custom call); it includes everything XLA computes (elementwise ops, remat recomputation).
- `kernels`: what the encoder blocks run: attention (cpu_fused, einsum, ...) and matmul (openblas or xla).
- `flops_analytic_per_step`: model FLOPs, matmuls only (see `analytic_flops`); `mfu` is these over the step time
  and the device's peak (null where the peak is unknown, e.g. CPU); `hfu` the same with XLA's count.
- `sgemm_gflops`: one float32 (3248 x 768) x (768 x 3072) `jnp.dot` in the same run (median of 5), the machine's
  matmul limit as the step sees it; `achieved_over_sgemm` is the step's model FLOP/s over it.
"""
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mma_dfer_jax import cli
from mma_dfer_jax import cpu
from mma_dfer_jax import models
from mma_dfer_jax import sharding
from mma_dfer_jax import train
from mma_dfer_jax.cpu import reference_timing
from mma_dfer_jax.models import mma_dfer

# Dense peak FLOP/s per device: (bfloat16, float32 as the default matmul precision runs it). GPUs run float32
# matmuls as TF32 by default; TPUs as single-pass bfloat16. Matched against device_kind, first match wins.
PEAK_FLOPS = (
    ('H100 PCIe', 756e12, 378e12),
    ('H100', 989e12, 494.5e12),    # SXM
    ('H200', 989e12, 494.5e12),
    ('TPU v4', 275e12, 275e12),
    ('TPU v5 lite', 197e12, 197e12),  # v5e
    ('TPU v5e', 197e12, 197e12),
    ('TPU v5p', 459e12, 459e12),
    ('TPU v5', 459e12, 459e12),       # v5p reports 'TPU v5'
    ('TPU v6 lite', 918e12, 918e12),  # v6e
    ('TPU v6e', 918e12, 918e12),
)


def peak_flops_per_device(device, dtype: str):
  """Dense peak of one device for `dtype` compute, or None (CPU and unknown devices)."""
  if device.platform == 'cpu':
    return None
  for kind, bf16, f32 in PEAK_FLOPS:
    if kind.lower() in device.device_kind.lower():
      return bf16 if dtype == 'bfloat16' else f32
  return None


# ---------------------------------------------------------------------------------------------------------------
# Analytic model FLOPs (2 per multiply-add, matmuls and convolutions only).

def _vit_block(tokens, width, mlp_dim):
  """(weight matmuls, attention matmuls) of one pre-norm ViT block over `tokens` tokens."""
  dense = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp_dim)
  attention = 2 * 2 * tokens * tokens * width   # q.k^T and p.v over all heads
  return dense, attention


def analytic_flops(model_config, batch: int, train_mode: bool = True) -> dict:
  """Model FLOPs of one step on `batch` clips, by part.

  Forward: both ViTs over every token (cls, patches, prompts), their patch embeddings, the fusion adapters on every
  token, the projection, temporal transformer and classifier; a unimodal model (model.modalities) counts its one ViT
  and no adapters. Backward (train): the frozen encoders need no weight
  gradients, so their weight matmuls cost the forward again (input gradients only); attention score/value matmuls
  and every trainable matmul cost twice the forward (both operands' gradients); the patch embeddings none (their
  input is the clip). Rematerialisation is not counted (model FLOPs, not hardware FLOPs).
  """
  c = model_config
  p, d, k = c.patch_size, c.width, mma_dfer.num_prompts(c)
  gv, ga = mma_dfer.vision_grid(c), mma_dfer.audio_grid(c)
  lv, la = 1 + gv[0] * gv[1] + k, 1 + ga[0] * ga[1] + k
  t = c.num_frames
  video_on, audio_on = mma_dfer.uses_video(c), mma_dfer.uses_audio(c)
  vd, va = (t * x * video_on for x in _vit_block(lv, d, c.mlp_dim))
  ad, aa = (x * audio_on for x in _vit_block(la, d, c.mlp_dim))
  frozen_dense = c.depth * (vd + ad)
  frozen_attention = c.depth * (va + aa)
  embed = 2 * (video_on * t * gv[0] * gv[1] * p * p * 3 + audio_on * ga[0] * ga[1] * p * p) * d
  adapters = c.depth * (t * lv + la) * 2 * (2 * d * c.fusion_width) * (video_on and audio_on)
  tw, inner, lt = c.temporal_width, c.temporal_heads * c.temporal_head_dim, t + 1
  temporal = (2 * t * d * tw
              + c.temporal_layers * (2 * lt * tw * 3 * inner + 2 * lt * inner * tw + 4 * lt * lt * inner
                                     + 2 * 2 * lt * tw * c.temporal_mlp_dim)
              + 2 * tw * c.num_classes)
  forward = frozen_dense + frozen_attention + embed + adapters + temporal
  backward = frozen_dense + 2 * (frozen_attention + adapters + temporal) if train_mode else 0
  return {'forward_per_clip': float(forward), 'backward_per_clip': float(backward),
          'per_step': float(batch * (forward + backward)),
          'encoder_blocks_forward_per_clip': float(frozen_dense + frozen_attention)}


# ---------------------------------------------------------------------------------------------------------------
# The benchmark.

def batch_keys(model_config) -> tuple:
  """The inputs a step is fed: a unimodal model (model.modalities) gets no input of the absent modality."""
  return tuple(k for k, used in (('video', mma_dfer.uses_video(model_config)),
                                 ('audio', mma_dfer.uses_audio(model_config)), ('label', True)) if used)


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict:
  c = config.model
  rng = np.random.default_rng(seed)
  batch = {'video': rng.integers(0, 256, (batch_size, c.num_frames, c.img_size, c.img_size, 3), dtype=np.uint8),
           'audio': rng.standard_normal((batch_size, c.audio_frames, c.audio_mels), dtype=np.float32),
           'label': rng.integers(0, c.num_classes, (batch_size,)).astype(np.int32)}
  return {k: batch[k] for k in batch_keys(c)}


def _xla_flops(cost):
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _lower(mode, state, batch, rng, mesh):
  """The step as training compiles it (`train.jit_train_step`, state donated; or `train.jit_eval_step`), lowered."""
  if mode == 'train':
    return train.jit_train_step(state, mesh).lower(state, batch, rng)
  return train.jit_eval_step(state, mesh).lower(state, batch)


def _unrolled_flops(config, mode, state, batch, rng, mesh):
  """XLA's count for the step with the layer scan fully unrolled (XLA counts a loop body only once), and with
  XLA's own attention and matmuls in place of the CPU kernels, whose custom calls XLA cannot count into."""
  unrolled = cpu.resolved_model_config(config.model, custom_calls=False)  # the kernels' settings -> XLA's ops
  unrolled.scan_unroll = unrolled.depth
  abstract = jax.eval_shape(lambda: state)
  abstract = abstract.replace(model=models.build(unrolled))
  return _xla_flops(_lower(mode, abstract, batch, rng, mesh).cost_analysis())


def _memory(compiled, devices):
  """(peak bytes, source, details): the device allocator's peak where it has one, else XLA's memory analysis."""
  details = {'max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # kB on Linux
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    analysis = None
  if analysis is not None:
    compiled_bytes = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      - analysis.alias_size_in_bytes)
    details.update(compiled_temp_bytes=int(analysis.temp_size_in_bytes),
                   compiled_argument_bytes=int(analysis.argument_size_in_bytes),
                   compiled_output_bytes=int(analysis.output_size_in_bytes),
                   compiled_alias_bytes=int(analysis.alias_size_in_bytes),
                   compiled_total_bytes=int(compiled_bytes))
  stats = devices[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device_memory_stats', details
  if analysis is not None:
    return int(compiled_bytes), 'xla_memory_analysis(temp+argument+output-alias)', details
  return details['max_rss_bytes'], 'process_max_rss', details


SGEMM_SHAPE = (3248, 768, 3072)  # (m, k, n): the face blocks' MLP matmul at batch 1 (16 frames x 203 tokens)


def sgemm_gflops(shape=SGEMM_SHAPE, repeats: int = 5) -> float:
  """The machine's matmul limit as the step sees it: median GFLOP/s of one float32 `jnp.dot` of `shape`
  (m x k times k x n), jitted, on the default device, after one untimed call."""
  m, k, n = shape
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    times.append(time.perf_counter() - started)
  return 2 * m * k * n / float(np.median(times)) / 1e9


def _time_steps(step, state, batches, rngs, steps, warmup, reference=None, hook=None):
  """Median seconds per step; `batches` is a callable giving the next global batch (timed with the step).

  With a `reference_timing.ReferenceStepper`, one reference step follows each of ours; its times go to
  `reference.times`. The CPU step hook (`cpu.step_hook`) sees every step, as in training.
  """
  times, waits = [], []
  if reference is not None:
    reference.times = []
  for i in range(warmup + steps):
    started = time.perf_counter()
    batch = batches()
    fetched = time.perf_counter()
    out = step(state, batch, rngs[i % len(rngs)])
    if isinstance(out, tuple):
      state = out[0]
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - started)
      waits.append(fetched - started)
    if hook is not None:
      hook.after_step(out)
    if reference is not None:
      seconds = reference.step()
      if i >= warmup:
        reference.times.append(seconds)
  return state, float(np.median(times)), float(np.median(waits)), times


def _input_pipeline_run(config, step, state, rngs, steps, warmup, mesh, synthetic_step_time):
  """Steps fed from `input_pipeline.create_train_iterator`; says whether the pipeline keeps up."""
  try:
    from mma_dfer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    iterator = input_pipeline.create_train_iterator(config, jax.process_index(), jax.process_count())
    first = next(iterator)
  except Exception as e:  # noqa: BLE001  (no pipeline, no dataset: a message, not a crash)
    return state, {'error': f'{type(e).__name__}: {e}'.splitlines()[0]}

  keys = batch_keys(config.model)
  expected = synthetic_batch(config, config.batch_size // jax.process_count())
  for k in keys:
    if np.shape(first[k]) != expected[k].shape:
      return state, {'error': f'the pipeline gives {k} of shape {np.shape(first[k])}, the model takes '
                              f'{expected[k].shape}'}
  batches = lambda: sharding.global_batch({k: next(iterator)[k] for k in keys}, mesh)
  state, median, wait, _ = _time_steps(step, state, batches, rngs, steps, warmup)
  return state, {'step_time_s': median, 'samples_per_s': config.batch_size / median, 'median_wait_s': wait,
                 'keeps_up': bool(median <= 1.05 * synthetic_step_time), 'dataset': config.dataset,
                 'read_threads': config.input.read_threads, 'worker_count': config.input.worker_count}


def run_benchmark(config, mode: str = 'train', steps: int = 5, warmup: int = 2,
                  with_input_pipeline: bool = False, reference=None) -> dict:
  """Compile and time the step; returns the JSON record.

  `reference`: a `reference_timing.ReferenceStepper` whose steps are interleaved with ours (train mode only).
  """
  if mode not in ('train', 'eval'):
    raise ValueError(f'mode={mode!r}: use train or eval')
  if reference is not None and mode != 'train':
    raise ValueError('the reference recipe is timed against the train step only (--mode train)')
  cpu.prepare_host(config)  # before the first JAX call starts the CPU client
  hook = cpu.step_hook()
  c = config.model
  mesh = sharding.make_mesh(config)
  batch_size = config.batch_size if mode == 'train' else config.get('eval_batch_size', config.batch_size)
  sharding.check_batch_size(batch_size, mesh)

  # Random parameters (not timed).
  params = models.init_params(c, jax.random.PRNGKey(config.seed))
  state = train.create_train_state(config, params)
  del params
  state = jax.device_put(state, sharding.state_sharding(state, mesh))
  local = batch_size // jax.process_count()
  batch = sharding.global_batch(synthetic_batch(config, local, seed=jax.process_index()), mesh)
  rngs = list(jax.random.split(jax.random.PRNGKey(config.seed + 1), 8))
  rng = rngs[0]

  started = time.perf_counter()
  lowered = _lower(mode, state, batch, rng, mesh)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - started

  flops = _xla_flops(compiled.cost_analysis())
  flops_source = 'compiled'
  kernels = cpu.implementations(c).names
  uses_cpu_kernels = kernels['attention'] == 'cpu_fused' or kernels['matmul'] == 'openblas'
  if c.scan_unroll < c.depth or uses_cpu_kernels:
    flops, flops_source = _unrolled_flops(config, mode, state, batch, rng, mesh), 'lowered_unrolled'
  analytic = analytic_flops(c, batch_size, train_mode=mode == 'train')

  hook.before_first_step(compiled)
  step = compiled if mode == 'train' else lambda state, batch, rng: compiled(state, batch)
  state, step_time, _, times = _time_steps(step, state, lambda: batch, rngs, steps, warmup, reference, hook)
  sgemm = sgemm_gflops()  # the same moment of the machine as the steps
  devices = mesh.devices.flatten().tolist()
  peak_mem, mem_source, mem_details = _memory(compiled, devices)
  peak = peak_flops_per_device(devices[0], c.dtype)
  per_s = lambda f: f / step_time if f else None
  utilisation = lambda f: f / step_time / (peak * len(devices)) if (f and peak) else None

  record = {
      'mode': mode,
      'step_time_s': step_time,
      'samples_per_s': batch_size / step_time,
      'compile_s': compile_s,
      'lower_s': lowered_at - started,
      'flops_per_step': flops,
      'flops_source': flops_source,
      'flops_analytic_per_step': analytic['per_step'],
      'flops_analytic_forward_per_clip': analytic['forward_per_clip'],
      'achieved_flops_per_s': per_s(analytic['per_step']),
      'mfu': utilisation(analytic['per_step']),
      'hfu': utilisation(flops),
      'peak_flops_per_device': peak,
      'peak_memory_bytes': peak_mem,
      'memory_source': mem_source,
      'memory': mem_details,
      'device': {'device_kind': devices[0].device_kind, 'platform': devices[0].platform, 'count': len(devices),
                 'process_count': jax.process_count()},
      'batch': batch_size,
      'dtype': c.dtype,
      'model': {k: c[k] for k in ('img_size', 'num_frames', 'width', 'depth', 'num_heads', 'mlp_dim',
                                  'temporal_layers', 'remat', 'remat_policy', 'scan_unroll', 'attention_impl',
                                  'matmul_impl')},
      'kernels': kernels,
      'steps': steps,
      'warmup': warmup,
      'step_times_s': times,
      'jax_version': jax.__version__,
      **hook.summary(),
      'sgemm_gflops': sgemm,
      'sgemm_shape': list(SGEMM_SHAPE),
      # The step's model FLOP/s over one large sgemm's: how close the step runs to the machine's matmul limit.
      'achieved_over_sgemm': analytic['per_step'] / step_time / (sgemm * 1e9),
  }
  if reference is not None:
    reference_time = float(np.median(reference.times))
    record['reference'] = {'impl': 'pytorch-eager-fp32 (reference recipe), interleaved step by step',
                           'torch_version': reference.torch_version, 'threads': reference.threads,
                           'step_time_s': reference_time, 'samples_per_s': batch_size / reference_time,
                           'step_times_s': reference.times}
    record['ours_over_reference'] = step_time / reference_time
  if with_input_pipeline and mode == 'train':
    state, record['input_pipeline'] = _input_pipeline_run(config, compiled, state, rngs, steps, warmup, mesh,
                                                          step_time)
  elif with_input_pipeline:
    record['input_pipeline'] = {'error': '--with_input_pipeline times the train step only'}
  return record


def main(argv=None) -> int:
  """Parses `argv` (sys.argv by default) with fresh flag values, so tests can call it in-process.

  User errors raise (cli.UserError and the package's error types); `cli.run_main` prints them as one line, exit 2.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  cli.define_config_flag(fv, argv, 'Experiment config file, e.g. configs/dfew.py.')
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Which step to time.', flag_values=fv)
  flags.DEFINE_integer('steps', 5, 'Timed steps (the median is reported).', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.', flag_values=fv, lower_bound=0)
  flags.DEFINE_bool('with_input_pipeline', False, 'Also time steps fed by the input pipeline.', flag_values=fv)
  flags.DEFINE_string('reference_python', None, 'A Python with torch and timm: interleave the reference recipe\'s '
                      'train steps with ours (needs --reference_tool).', flag_values=fv)
  flags.DEFINE_string('reference_tool', None, 'Path of torch_mma_dfer.py (../shared/tools/).', flag_values=fv)
  rest = cli.parse_flags(fv, argv)
  if len(rest) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(rest[1:])} (settings go as --config.key=value)')
  if fv.config is None:
    raise cli.UserError('--config is required, e.g. --config configs/dfew.py')
  if bool(fv.reference_python) != bool(fv.reference_tool):
    raise cli.UserError('--reference_python and --reference_tool go together')
  if fv.reference_python and fv.mode != 'train':
    raise cli.UserError('--reference_python: the reference recipe is timed against the train step only (--mode train)')
  # The device count is checked by run_benchmark (as a config.* ValueError): JAX must not start before it
  # configures the host allocator.
  cli.check_config(fv.config)
  reference = None
  if fv.reference_python:
    try:
      reference = reference_timing.ReferenceStepper(fv.reference_python, fv.reference_tool, fv.config.model,
                                                    fv.config.batch_size)
    except ValueError as e:
      raise cli.UserError(f'--reference_tool {fv.reference_tool}: {e}') from None
  try:
    record = run_benchmark(fv.config, fv.mode, fv.steps, fv.warmup, fv.with_input_pipeline, reference)
  finally:
    if reference is not None:
      reference.close()
  if 'error' in record.get('input_pipeline', {}):
    print(f'input pipeline not timed: {record["input_pipeline"]["error"]}', file=sys.stderr)
  print(json.dumps(record), flush=True)
  return 0


def run():
  """The console script's entry point (`mma-dfer-bench`)."""
  cli.run_main(main)


if __name__ == '__main__':
  run()
