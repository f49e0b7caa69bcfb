"""Pod readiness: when the distributed runtime starts, gradient accumulation on a mesh, what the state keeps on the
device with bfloat16.

The cluster decisions run JAX's own detection against faked environments, with `jax.distributed.initialize`
replaced by a recorder (nothing is started). The mesh checks run in a subprocess with 4 CPU devices.
"""
import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from conftest import small_model_config
from jax._src.clusters import cloud_tpu_cluster

from configs import dfew
from mma_dfer_jax import distributed
from mma_dfer_jax import train

# Every variable through which JAX (or our legacy fallback) could detect a cluster.
CLUSTER_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID',
                     'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK',
                     'OMPI_COMM_WORLD_LOCAL_RANK', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'TPU_WORKER_ID',
                     'MEGASCALE_COORDINATOR_ADDRESS', 'MEGASCALE_NUM_SLICES', 'KUBERNETES_SERVICE_HOST',
                     'JAX_COORDINATOR_ADDRESS')


@pytest.fixture
def started(monkeypatch):
  """A clean environment and a recorder in place of jax.distributed.initialize: the list of calls' kwargs."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  return calls


NO_ARGUMENTS = {'coordinator_address': None, 'num_processes': None, 'process_id': None}


def test_a_single_process_without_a_cluster_stays_without_it(started):
  assert distributed.initialize() == distributed.Decision(False)
  assert distributed.initialize(num_processes=1) == distributed.Decision(False, 'flags', 1)
  assert not started


def test_explicit_flags_start_it_with_their_values(started):
  decision = distributed.initialize('localhost:1234', 2, 1)
  assert decision == distributed.Decision(True, 'flags', 2)
  assert started == [{'coordinator_address': 'localhost:1234', 'num_processes': 2, 'process_id': 1}]
  assert jax.config.jax_cpu_collectives_implementation == 'gloo'


@pytest.mark.parametrize('arguments, message', [
    (dict(num_processes=2), '--coordinator_address'),
    (dict(num_processes=2, coordinator_address='h:1'), '--process_id'),
    (dict(coordinator_address='h:1', process_id=0), 'need --num_processes'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), '0..1'),
    (dict(num_processes=0), 'at least 1'),
])
def test_incomplete_flags_are_one_clear_error(started, arguments, message):
  with pytest.raises(distributed.DistributedConfigError, match=message) as error:
    distributed.initialize(**arguments)
  assert '\n' not in str(error.value)
  assert not started


def slurm(monkeypatch, tasks):
  for name, value in dict(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='node[1-2]', SLURM_NTASKS=str(tasks),
                          SLURM_PROCID='1', SLURM_LOCALID='0').items():
    monkeypatch.setenv(name, value)


def test_slurm_with_several_tasks_starts_it_and_jax_fills_the_values(started, monkeypatch):
  slurm(monkeypatch, tasks=4)
  assert distributed.initialize() == distributed.Decision(True, 'SlurmCluster', 4)
  assert started == [NO_ARGUMENTS]  # JAX reads the coordinator, count and id from the same environment
  # An explicit count alongside the cluster is passed on; JAX fills the rest from SLURM.
  assert distributed.initialize(num_processes=4) == distributed.Decision(True, 'flags', 4)
  assert started[1] == {'coordinator_address': None, 'num_processes': 4, 'process_id': None}


def test_a_one_task_slurm_job_stays_single_process(started, monkeypatch):
  slurm(monkeypatch, tasks=1)
  assert distributed.initialize() == distributed.Decision(False, 'SlurmCluster', 1)
  assert not started


def test_open_mpi_starts_it(started, monkeypatch):
  for name, value in dict(OMPI_MCA_orte_hnp_uri='1531576320.0;tcp://10.96.0.1:34911', OMPI_COMM_WORLD_SIZE='2',
                          OMPI_COMM_WORLD_RANK='0', OMPI_COMM_WORLD_LOCAL_RANK='0').items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize() == distributed.Decision(True, 'OmpiCluster', 2)
  assert started == [NO_ARGUMENTS]


def test_gke_tpu_pod_starts_it(started, monkeypatch):
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  monkeypatch.setenv('TPU_SKIP_MDS_QUERY', '1')  # the GCE check comes first; no metadata server here
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'host-0,host-1,host-2,host-3')
  monkeypatch.setenv('MEGASCALE_NUM_SLICES', '1')  # else JAX asks the (GKE) metadata server for the slice count
  assert distributed.initialize() == distributed.Decision(True, 'GkeTpuCluster', 4)
  assert started == [NO_ARGUMENTS]


def test_gce_tpu_vm_pod_found_through_the_metadata_server_starts_it(started, monkeypatch):
  """A TPU VM made with gcloud: no TPU_* variables, the peers come from the metadata server (faked here)."""
  metadata = {'agent-worker-number': ('3', 200), 'worker-network-endpoints': ('a:0:10.0.0.1,b:1:10.0.0.2', 200),
              'tpu-env': ('', 200)}
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  monkeypatch.delenv('TPU_SKIP_MDS_QUERY', raising=False)
  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', metadata.__getitem__)
  assert distributed.initialize() == distributed.Decision(True, 'GceTpuCluster', 2)
  assert started == [NO_ARGUMENTS]


def test_off_a_tpu_vm_the_metadata_server_is_never_asked(started, monkeypatch):
  """No TPU chips here: JAX's TPU checks must decide from local state, without a (possibly hanging) request."""
  def no_network(key):
    raise AssertionError(f'metadata server queried for {key}')
  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', no_network)
  monkeypatch.delenv('TPU_SKIP_MDS_QUERY', raising=False)
  assert not cloud_tpu_cluster.running_in_cloud_tpu_vm  # this machine has no TPU
  assert distributed.detect_cluster() is None
  assert distributed.initialize() == distributed.Decision(False)


def test_kubernetes_without_its_client_package_stays_single_process(started, monkeypatch):
  monkeypatch.setitem(sys.modules, 'kubernetes', None)  # import fails, as where `jax[k8s]` is not installed
  monkeypatch.setenv('KUBERNETES_SERVICE_HOST', '10.0.0.1')
  with pytest.warns(UserWarning, match='kubernetes'):
    assert distributed.initialize() == distributed.Decision(False)
  assert not started


def test_a_cluster_whose_process_count_cannot_be_read_says_how_to_run_alone(started, monkeypatch):
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  monkeypatch.delenv('TPU_SKIP_MDS_QUERY', raising=False)
  def metadata(key):
    if key == 'agent-worker-number':
      return '0', 200
    raise OSError('metadata server: 503')
  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', metadata)
  with pytest.raises(distributed.DistributedConfigError, match='GceTpuCluster.*--num_processes=1'):
    distributed.initialize()
  assert distributed.initialize(num_processes=1) == distributed.Decision(False, 'flags', 1)
  assert not started


def test_without_jax_cluster_detection_the_tpu_pod_variables_still_start_it(started, monkeypatch):
  monkeypatch.setattr(distributed, '_cluster_types', lambda: None)
  assert distributed.initialize() == distributed.Decision(False)
  monkeypatch.setenv('MEGASCALE_COORDINATOR_ADDRESS', '10.0.0.1')
  assert distributed.initialize() == distributed.Decision(True, 'tpu_pod_variables')
  assert started == [NO_ARGUMENTS]


def test_an_initialized_runtime_is_not_started_twice(started, monkeypatch):
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  assert distributed.initialize('localhost:1234', 2, 0).source == 'already_initialized'
  assert not started


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation: micro-batches are slices of every device's own shard.

TINY = dict(width=32, depth=6, num_heads=2, mlp_dim=64, img_size=32, num_frames=4, audio_frames=64, audio_mels=32,
            fusion_width=16, temporal_width=32, temporal_heads=2, temporal_head_dim=16, temporal_mlp_dim=64)


def tiny_config(dtype='float32', drop_path_rate=0.0, grad_accum_steps=1):
  config = dfew.get_config()
  config.model = small_model_config(drop_path_rate=drop_path_rate, dtype=dtype, **TINY)
  config.grad_accum_steps = grad_accum_steps
  return config


def tiny_params(config):
  c = config.model
  return jax.jit(train.MMADFER(c).init)(jax.random.key(0), jnp.zeros((1, c.num_frames, c.img_size, c.img_size, 3)),
                                        jnp.zeros((1, c.audio_frames, c.audio_mels)))['params']


def abstract_batch(config, size):
  c = config.model
  return {'video': jax.ShapeDtypeStruct((size, c.num_frames, c.img_size, c.img_size, 3), jnp.uint8),
          'audio': jax.ShapeDtypeStruct((size, c.audio_frames, c.audio_mels), jnp.float32),
          'label': jax.ShapeDtypeStruct((size,), jnp.int32)}


def test_micro_batch_i_holds_rows_i_plus_multiples_of_k():
  batch = {'label': np.arange(12), 'video': np.arange(12 * 2).reshape(12, 2)}
  micro = train.split_micro_batches(batch, 3)
  np.testing.assert_array_equal(micro['label'], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  np.testing.assert_array_equal(micro['video'][1], batch['video'][[1, 4, 7, 10]])
  # On 2 devices (rows 0-5 and 6-11), every micro-batch takes 2 rows of each device's block.
  for rows in np.asarray(micro['label']):
    assert sorted(rows // 6) == [0, 0, 1, 1]


def accumulation_loops(config, size):
  """The lengths of the top-level scans of the traced step that loop over a uint8 video batch, with its shape."""
  state = jax.eval_shape(lambda: train.create_train_state(config, tiny_params(config)))
  step = train._train_step  # pylint: disable=protected-access
  jaxpr = jax.make_jaxpr(step)(state, abstract_batch(config, size), jax.random.key(0))
  loops = []
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == 'scan':
      videos = [v.aval.shape for v in eqn.invars if v.aval.dtype == jnp.uint8]
      if videos:  # not the model's scan over layers
        loops.append((eqn.params['length'], videos))
  return loops


def test_the_accumulation_setting_sets_the_number_of_micro_steps():
  assert accumulation_loops(tiny_config(grad_accum_steps=1), 6) == []
  assert accumulation_loops(tiny_config(grad_accum_steps=3), 6) == [(3, [(3, 2, 4, 32, 32, 3)])]


MESH_SCRIPT = textwrap.dedent('''
    import json, re, sys
    sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
    import jax, numpy as np
    import test_distributed as t
    from mma_dfer_jax import sharding, train
    size, k = 8, 2
    assert jax.device_count() == 4

    def setup(drop_path_rate, accumulation):
      config = t.tiny_config(drop_path_rate=drop_path_rate, grad_accum_steps=accumulation)
      config.mesh.data = -1
      c, key = config.model, jax.random.key(0)
      batch = {'video': np.asarray(jax.random.randint(key, (size, c.num_frames, 32, 32, 3), 0, 256), np.uint8),
               'audio': np.asarray(jax.random.normal(key, (size, c.audio_frames, c.audio_mels))),
               'label': np.arange(size) % c.num_classes}
      return config, train.create_train_state(config, t.tiny_params(config)), batch

    def sharded_step(config, state):
      mesh = sharding.make_mesh(config)
      state_sh, repl = sharding.state_sharding(state, mesh), sharding.replicated(mesh)
      return jax.jit(train._train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh), repl),
                     out_shardings=(state_sh, repl))

    def trainable(state):
      return [np.asarray(x) for x in jax.tree_util.tree_leaves(train.partition(state.params)[0])]

    def difference(a, b):
      (state_a, metrics_a), (state_b, metrics_b) = a, b
      params = max(float(np.max(np.abs(x - y))) for x, y in zip(trainable(state_a), trainable(state_b)))
      return {'loss': abs(float(metrics_a['loss']) - float(metrics_b['loss'])), 'params': params}

    out = {}
    config, state, batch = setup(0.0, k)
    step = sharded_step(config, state)
    hlo = step.lower(state, batch, jax.random.key(1)).compile().as_text()
    out['all_gathers'] = [line.split('=')[1].split('all-gather')[0].strip() for line in hlo.splitlines()
                          if re.search(r'= \\S+ all-gather', line)]
    out['video_shapes'] = sorted(set(re.findall(r'u8\\[[0-9,]+\\]', hlo)))
    accumulated = step(state, batch, jax.random.key(1))
    config, state, batch = setup(0.0, 1)
    out['vs_one_batch'] = difference(accumulated, sharded_step(config, state)(state, batch, jax.random.key(1)))

    # Stochastic depth on: the 4-device step equals the single-device step (micro-batches do not depend on D).
    config, state, batch = setup(0.1, k)
    on_mesh = sharded_step(config, state)(state, batch, jax.random.key(1))
    config, state, batch = setup(0.1, k)
    out['mesh_vs_one_device'] = difference(on_mesh, jax.jit(train._train_step)(state, batch, jax.random.key(1)))
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_accumulation_on_a_mesh_keeps_each_device_on_its_own_shard():
  environment = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  run = subprocess.run([sys.executable, '-c', MESH_SCRIPT, str(ROOT)], capture_output=True, text=True,
                       env=environment, check=False, timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out['all_gathers'] == []  # before: u8[2,2,4,32,32,3], f32[2,2,64,32] and s32[2,2] gathered in the loop
  # Per device: its shard of 2 clips, split into k=2 micro-batches of 1 clip each.
  assert out['video_shapes'] == ['u8[1,1,4,32,32,3]', 'u8[2,1,4,32,32,3]', 'u8[2,4,32,32,3]']
  assert out['vs_one_batch']['loss'] < 1e-6 and out['vs_one_batch']['params'] < 1e-6
  assert out['mesh_vs_one_device']['loss'] < 1e-5 and out['mesh_vs_one_device']['params'] < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# bfloat16: the frozen weights live on the device in bfloat16; what learns, and its optimizer state, in float32.

def leaf_dtypes(tree):
  return {'/'.join(p): x.dtype for p, x in flax.traverse_util.flatten_dict(tree).items()}


def test_bfloat16_state_keeps_frozen_matmul_weights_in_bfloat16_and_the_rest_in_float32():
  config = tiny_config('bfloat16')
  state = jax.eval_shape(lambda: train.create_train_state(config, tiny_params(config)))
  dtypes = leaf_dtypes(state.params)
  frozen = {p for p in dtypes if train.is_frozen(tuple(p.split('/')))}
  in_bfloat16 = {p for p, d in dtypes.items() if d == jnp.bfloat16}
  norms = {p for p in frozen if p.split('/')[-2].endswith(('norm', 'norm1', 'norm2'))}
  assert in_bfloat16 == frozen - norms
  assert {p.split('/')[-1] for p in in_bfloat16} == {'kernel', 'bias', 'cls_token'}
  assert 'layers/vision_block/attn/qkv/kernel' in in_bfloat16 and 'vision/embed/patch_embed/kernel' in in_bfloat16
  assert all(dtypes[p] == jnp.float32 for p in set(dtypes) - in_bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
  # Most of the parameter bytes are the frozen encoders: the bfloat16 state is well under 60% of the float32 one.
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
  f32_state = jax.eval_shape(lambda: train.create_train_state(tiny_config(), tiny_params(config)))
  assert size(state.params) < 0.6 * size(f32_state.params)


def test_float32_state_is_all_float32_even_from_a_bfloat16_checkpoint():
  config = tiny_config('bfloat16')
  state = jax.eval_shape(lambda: train.create_train_state(
      tiny_config(), train.create_train_state(config, tiny_params(config)).params))
  assert set(leaf_dtypes(state.params).values()) == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_bfloat16_weights_stored_ahead_give_the_same_logits():
  """The model cast these weights to bfloat16 at every use; stored in bfloat16 the numbers are the same."""
  config = tiny_config('bfloat16')
  params = tiny_params(config)
  state = train.create_train_state(config, params)
  key = jax.random.key(3)
  batch = {'video': np.asarray(jax.random.randint(key, (2, 4, 32, 32, 3), 0, 256), np.uint8),
           'audio': np.asarray(jax.random.normal(key, (2, 64, 32))), 'label': np.array([1, 2])}
  stored = train.eval_step(state, batch)
  in_float32 = train.eval_step(state.replace(params=params), batch)
  np.testing.assert_array_equal(stored, in_float32)


def test_stochastic_depth_keeps_and_scales_in_float32_under_bfloat16():
  from mma_dfer_jax.models import vit  # pylint: disable=g-import-not-at-top
  rng, rate = jax.random.key(5), np.float32(0.1)
  x = jax.random.normal(jax.random.key(6), (256, 8, 16)).astype(jnp.bfloat16)
  out = jax.jit(vit.drop_path)(x, rate, rng)
  assert out.dtype == jnp.bfloat16
  keep = jax.random.bernoulli(rng, np.float32(0.9), (256, 1, 1))
  assert 0 < int(keep.sum()) < 256
  expected = jnp.where(keep, (x.astype(jnp.float32) / np.float32(0.9)).astype(jnp.bfloat16), 0)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
  # Scaling by a bfloat16 keep probability (0.8984) would have given other numbers.
  in_bfloat16 = jnp.where(keep, x / jnp.bfloat16(0.9), 0)
  assert not np.array_equal(np.asarray(out, np.float32), np.asarray(in_bfloat16, np.float32))
