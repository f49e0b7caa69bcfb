"""The training step: only the adapters learn; the two SSL encoders stay frozen (docs/training.md).

Which tensors train is decided in one place, `parameter_labels`, from parameter paths. The loss is differentiated
only with respect to the trainable subtree, so frozen weights get no gradient computation and no optimizer state:
backpropagation still flows *through* the frozen blocks (to reach earlier adapters), but never computes their
weight gradients. The optimizer is PyTorch's AdamW (decoupled weight decay on every trainable tensor).
"""
import dataclasses
import math
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mma_dfer_jax import cpu
from mma_dfer_jax import settings
from mma_dfer_jax import sharding
from mma_dfer_jax import models
from mma_dfer_jax.models import MMADFER

TRAINABLE, FROZEN = 'trainable', 'frozen'

# The frozen SSL encoders: everything of the two ViTs except what MMA-DFER adds or re-learns (pos_embed, prompts).
_FROZEN_TOP_LEVEL = ('vision_norm', 'audio_norm')
_FROZEN_EMBEDDING = ('patch_embed', 'cls_token')
_FROZEN_BLOCKS = ('vision_block', 'audio_block')


def is_frozen(path: tuple) -> bool:
  """Frozen: each encoder's patch embedding, cls token, transformer blocks and final norm."""
  if path[0] in _FROZEN_TOP_LEVEL:
    return True
  if path[0] in ('vision', 'audio') and path[1] == 'embed' and path[2] in _FROZEN_EMBEDDING:
    return True
  return path[0] == 'layers' and path[1] in _FROZEN_BLOCKS


def parameter_labels(params) -> dict:
  """A tree like `params` with 'trainable' / 'frozen' at every leaf."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({p: FROZEN if is_frozen(p) else TRAINABLE for p in flat})


def partition(params):
  """(trainable, frozen): two disjoint nested dicts whose union is `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  trainable = {p: v for p, v in flat.items() if not is_frozen(p)}
  frozen = {p: v for p, v in flat.items() if is_frozen(p)}
  return flax.traverse_util.unflatten_dict(trainable), flax.traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
  flat = flax.traverse_util.flatten_dict(trainable)
  flat.update(flax.traverse_util.flatten_dict(frozen))
  return flax.traverse_util.unflatten_dict(flat)


def learning_rate_schedule(config, steps_per_epoch=None) -> optax.Schedule:
  """The reference's per-epoch cosine (CosineAnnealingLR(T_max=epochs), constant within an epoch) by default.

  Without `steps_per_epoch` the epoch is unknown and the first epoch's rate is used throughout.
  """
  base, epochs = config.learning_rate, config.num_epochs
  if config.schedule == 'epoch_cosine':
    if not steps_per_epoch:
      return optax.constant_schedule(base)

    def schedule(step):
      epoch = jnp.floor_divide(step, steps_per_epoch)
      return base * (1 + jnp.cos(math.pi * epoch / epochs)) / 2
    return schedule
  if config.schedule == 'warmup_cosine':
    total = max(1, epochs * (steps_per_epoch or 1))
    return optax.warmup_cosine_decay_schedule(0.0, base, config.warmup_steps, total, end_value=0.0)
  if config.schedule == 'constant':
    return optax.constant_schedule(base)
  raise ValueError(f'config.schedule={config.schedule!r}: use one of {", ".join(settings.CHOICES["schedule"])}')


def optimizer(config, steps_per_epoch=None) -> optax.GradientTransformation:
  """PyTorch AdamW: optax's adamw has the same update (decay -lr*wd*p with the pre-update p, eps outside sqrt)."""
  return optax.adamw(learning_rate_schedule(config, steps_per_epoch), b1=config.adam_b1, b2=config.adam_b2,
                     eps=config.adam_eps, weight_decay=config.weight_decay)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static settings of the compiled step (hashable, so they live in the state's treedef)."""
  label_smoothing: float = 0.0
  grad_accum_steps: int = 1
  num_classes: int = 7


def _stored_in_compute_dtype(path: tuple) -> bool:
  """Frozen leaves that the model casts to its compute dtype before every use: Dense/Conv kernels and biases, the
  cls tokens. LayerNorm scales and biases enter the normalisation's float32 arithmetic, so they are not."""
  name = path[-1]
  return is_frozen(path) and (name in ('kernel', 'cls_token') or (name == 'bias' and 'norm' not in path[-2]))


def device_params(params, compute_dtype):
  """A copy of `params` in the dtypes the train state keeps: frozen weights the model computes with in
  `compute_dtype` are stored in it (with bfloat16, half the device memory and the same numbers the model used to
  cast to at every step); the trainable leaves (and so the optimizer state) and every other leaf in float32."""
  compute_dtype = jnp.dtype(compute_dtype)
  flat = flax.traverse_util.flatten_dict(params)
  stored = {p: jnp.array(v, dtype=compute_dtype if _stored_in_compute_dtype(p) else jnp.float32, copy=True)
            for p, v in flat.items()}
  return flax.traverse_util.unflatten_dict(stored)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any            # the whole tree, in the layout `MMADFER.apply` takes
  opt_state: Any         # AdamW state of the trainable leaves only
  model: MMADFER = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  options: StepOptions = flax.struct.field(pytree_node=False)


def create_train_state(config, params, steps_per_epoch=None, platforms=None) -> TrainState:
  # The attention/matmul implementations are fixed here for the platform(s) the steps are compiled for (default:
  # this host's backend and device count), not picked from the tracing host (cpu.implementations).
  model = models.build(cpu.resolved_model_config(config.model, platforms))
  tx = optimizer(config, steps_per_epoch)
  # A copy: the step donates the state's buffers, which must not invalidate the caller's `params`.
  params = device_params(params, config.model.dtype)
  trainable, _ = partition(params)
  options = StepOptions(float(config.get('label_smoothing', 0.0)), int(config.get('grad_accum_steps', 1)),
                        int(config.model.num_classes))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable), model=model,
                    tx=tx, options=options)


def to_model_inputs(batch):
  """Video to float in [0, 1] on the device (frames travel as uint8); audio as float32. A unimodal model's batch
  may leave out the other modality (None here; the model ignores it)."""
  video, audio = batch.get('video'), batch.get('audio')
  if video is not None and video.dtype == jnp.uint8:
    video = video.astype(jnp.float32) / 255.0
  return video, None if audio is None else audio.astype(jnp.float32)


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0):
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def _loss_and_grads(state, trainable, frozen, batch, rng):
  def loss_fn(trainable_params):
    video, audio = to_model_inputs(batch)
    logits = state.model.apply({'params': merge(trainable_params, frozen)}, video, audio, train=True,
                               rngs={'dropout': rng})
    return cross_entropy(logits, batch['label'], state.options.num_classes, state.options.label_smoothing)
  return jax.value_and_grad(loss_fn)(trainable)


def split_micro_batches(batch, k: int):
  """(B, ...) -> (k, B/k, ...) where micro-batch i holds rows i, i+k, i+2k, ... of the batch.

  Interleaved rather than contiguous: on a mesh the batch axis is split over the devices in contiguous blocks, so
  every micro-batch takes B/(k*D) rows of each device's own block and stays sharded over the same devices, with no
  data moving between them (contiguous micro-batches would all-gather the batch in the loop). The micro-batches do
  not depend on the number of devices.
  """
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, batch)


def _accumulated_loss_and_grads(state, trainable, frozen, batch, rng):
  """Mean loss and gradients over equal micro-batches: the same as one step on the whole batch (up to float
  rounding; with stochastic depth on, micro-batch i draws its samples' keep/drop from `fold_in(rng, i)`)."""
  k = state.options.grad_accum_steps
  if k == 1:
    return _loss_and_grads(state, trainable, frozen, batch, rng)
  size = batch['label'].shape[0]
  if size % k:
    raise ValueError(f'batch of {size} does not split into grad_accum_steps={k} equal micro-batches')
  micro = split_micro_batches(batch, k)

  def body(carry, inputs):
    index, micro_batch = inputs
    loss, grads = _loss_and_grads(state, trainable, frozen, micro_batch, jax.random.fold_in(rng, index))
    total_loss, total_grads = carry
    return (total_loss + loss, jax.tree_util.tree_map(jnp.add, total_grads, grads)), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
  (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(k), micro))
  return loss / k, jax.tree_util.tree_map(lambda g: g / k, grads)


def _train_step(state: TrainState, batch, rng):
  trainable, frozen = partition(state.params)
  loss, grads = _accumulated_loss_and_grads(state, trainable, frozen, batch, rng)
  updates, opt_state = state.tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  new_state = state.replace(step=state.step + 1, params=merge(trainable, frozen), opt_state=opt_state)
  return new_state, metrics


def _eval_logits(state: TrainState, batch):
  video, audio = to_model_inputs(batch)
  return state.model.apply({'params': state.params}, video, audio, train=False)


# ---------------------------------------------------------------------------------------------------------------
# The one place each step is jitted.

def jit_train_step(state=None, mesh=None):
  """The jitted `(state, batch, rng) -> (state, metrics)`; the state is donated (parameters and optimizer state are
  updated in place on the device). With a `mesh` (and the `state`, or its `jax.eval_shape`, for its structure): the
  training shardings, the batch split over the data axis, state and metrics replicated."""
  if mesh is None:
    return jax.jit(_train_step, donate_argnums=0)
  state_sh, batch_sh, repl = _shardings(state, mesh)
  return jax.jit(_train_step, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                 donate_argnums=0)


def jit_eval_step(state=None, mesh=None, outputs=None):
  """The jitted `(state, batch) -> outputs(logits, batch)` of the eval forward pass (`outputs` default: the logits
  alone). With a `mesh`, as `jit_train_step`: the batch split over the data axis, the outputs replicated."""
  def step(state, batch):
    logits = _eval_logits(state, batch)
    return logits if outputs is None else outputs(logits, batch)
  if mesh is None:
    return jax.jit(step)
  state_sh, batch_sh, repl = _shardings(state, mesh)
  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=repl)


def _shardings(state, mesh):
  return sharding.state_sharding(state, mesh), sharding.batch_sharding(mesh), sharding.replicated(mesh)


train_step = jit_train_step()
train_step.__doc__ = """`(state, batch, rng) -> (state, metrics)`; `metrics['loss']` is the mean cross-entropy of
the batch under the parameters before the update. `batch`: `video` (N,T,H,W,3) uint8 or float, `audio`, `label`."""

eval_step = jit_eval_step()


def trainable_l2(params) -> jax.Array:
  """L2 norm over every trainable parameter (summary.json's `trainable_l2`)."""
  return optax.tree.norm(partition(params)[0])


def count_parameters(tree) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
