"""Convert PyTorch weights to our Flax parameters: the released MMA-DFER models and the two SSL encoders.

  python -m mma_dfer_jax.convert released --src model.pth --out DIR --config configs/mafw.py
  python -m mma_dfer_jax.convert ssl --face mae_face.pth --audio audiomae.pth --out DIR --config configs/dfew.py

Both write an Orbax checkpoint (see `checkpoint.py`) that `init.checkpoint`, `predict` and `launch.py --mode eval`
accept. Tensor names are mapped in one table (`reference_layout`); PyTorch layouts are channels-first with Linear
weights (out, in), ours channels-last with kernels (in, out).
"""
import dataclasses
import math
import re
import sys
import time
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mma_dfer_jax import cli
from mma_dfer_jax import models
from mma_dfer_jax import pth_reader
from mma_dfer_jax.models import mma_dfer

# The only reference tensors we drop: the SSL encoders' unused classifier heads and the temporal PreNorm's
# never-applied second LayerNorm.
DROPPED_REFERENCE_TENSORS = (
    r'image_encoder\.head\.(weight|bias)',
    r'audio_model\.head\.(weight|bias)',
    r'temporal_net\.temporal_transformer\.layers\.\d+\.[01]\.fn\.norm2\.(weight|bias)',
)
ENCODERS = (('vision', 'image_encoder'), ('audio', 'audio_model'))


class ConversionError(ValueError):
  """A checkpoint does not match the model: names every missing, unexpected or mis-shaped tensor."""


# Layout transforms, PyTorch -> Flax.
def _same(x):
  return x


def _linear_weight(w):
  return w.T


def _conv_weight(w):  # (out, in, kh, kw) -> (kh, kw, in, out)
  return w.transpose(2, 3, 1, 0)


def _scalar(x):
  return x.reshape(())


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one of our parameters comes from: reference names (several: stacked on a new leading axis)."""
  names: tuple
  transform: Callable = _same
  stacked: bool = False


def _linear(prefix, ref, stack=None, bias=True):
  """kernel/bias entries of a Dense from a torch Linear `ref` (a format string over the layer when stacked)."""
  def src(suffix, transform):
    if stack is None:
      return Source((f'{ref}.{suffix}',), transform)
    return Source(tuple(f'{ref.format(i=i)}.{suffix}' for i in range(stack)), transform, stacked=True)
  out = {prefix + ('kernel',): src('weight', _linear_weight)}
  if bias:
    out[prefix + ('bias',)] = src('bias', _same)
  return out


def _layernorm(prefix, ref, stack=None):
  def src(suffix):
    if stack is None:
      return Source((f'{ref}.{suffix}',))
    return Source(tuple(f'{ref.format(i=i)}.{suffix}' for i in range(stack)), stacked=True)
  return {prefix + ('scale',): src('weight'), prefix + ('bias',): src('bias')}


def encoder_layout(model_config, ours: str, ref: str) -> dict:
  """The frozen ViT tensors of one encoder, in the SSL checkpoints' timm names (prefix `ref.`, may be empty)."""
  depth = model_config.depth
  p = f'{ref}.' if ref else ''
  layout = {
      (ours, 'embed', 'patch_embed', 'kernel'): Source((f'{p}patch_embed.proj.weight',), _conv_weight),
      (ours, 'embed', 'patch_embed', 'bias'): Source((f'{p}patch_embed.proj.bias',)),
      (ours, 'embed', 'cls_token'): Source((f'{p}cls_token',)),
  }
  layout.update(_layernorm((f'{ours}_norm',), f'{p}norm'))
  block = ('layers', f'{ours}_block')
  layout.update(_layernorm(block + ('norm1',), p + 'blocks.{i}.norm1', depth))
  layout.update(_layernorm(block + ('norm2',), p + 'blocks.{i}.norm2', depth))
  layout.update(_linear(block + ('attn', 'qkv'), p + 'blocks.{i}.attn.qkv', depth))
  layout.update(_linear(block + ('attn', 'proj'), p + 'blocks.{i}.attn.proj', depth))
  layout.update(_linear(block + ('mlp', 'fc1'), p + 'blocks.{i}.mlp.fc1', depth))
  layout.update(_linear(block + ('mlp', 'fc2'), p + 'blocks.{i}.mlp.fc2', depth))
  return layout


def reference_layout(model_config) -> dict:
  """Every parameter of `MMADFER(model_config)` -> the released reference checkpoint's tensor names."""
  depth = model_config.depth
  stages = depth // mma_dfer.PROMPT_STAGE_EVERY
  layout = {}
  for ours, ref in ENCODERS:
    layout.update(encoder_layout(model_config, ours, ref))
    layout[(ours, 'embed', 'pos_embed')] = Source((f'{ref}.pos_embed',))
    layout[(ours, 'embed', 'prompts_init')] = Source((f'{ref}.learnable_prompts_init',))
    layout[(ours, 'prompts_progr')] = Source(tuple(f'{ref}.learnable_prompts_progr.{j}' for j in range(stages)),
                                             stacked=True)
    up = ('layers', 'fusion', f'{ours}_up')
    layout.update(_linear(up + ('proj',), ref + '.temporal_att_post.{i}.0', depth))
    layout[up + ('gate',)] = Source(tuple(f'{ref}.all_gate.{i}' for i in range(depth)), _scalar, stacked=True)
  # Both down-projections live in the reference's image encoder.
  down = ('layers', 'fusion')
  layout.update(_linear(down + ('vision_down', 'proj'), 'image_encoder.temporal_pre.{i}', depth))
  layout.update(_layernorm(down + ('vision_down', 'norm'), 'image_encoder.temporal_pre_norm.{i}', depth))
  layout.update(_linear(down + ('audio_down', 'proj'), 'image_encoder.audio_proj_pre.{i}.0', depth))
  layout.update(_layernorm(down + ('audio_down', 'norm'), 'image_encoder.audio_proj_pre.{i}.1', depth))
  layout.update(_linear(('vision_proj',), 'vision_proj'))
  layout.update(_linear(('classifier',), 'our_classifier'))
  layout[('temporal', 'cls_token')] = Source(('temporal_net.cls_token',))
  layout[('temporal', 'pos_embedding')] = Source(('temporal_net.pos_embedding',))
  for l in range(model_config.temporal_layers):
    ours, ref = ('temporal', f'block_{l}'), f'temporal_net.temporal_transformer.layers.{l}'
    layout.update(_layernorm(ours + ('attn_norm',), f'{ref}.0.fn.norm'))
    layout.update(_linear(ours + ('attn', 'to_q'), f'{ref}.0.fn.fn.to_q', bias=False))
    layout.update(_linear(ours + ('attn', 'to_kv'), f'{ref}.0.fn.fn.to_kv', bias=False))
    layout.update(_linear(ours + ('attn', 'to_out'), f'{ref}.0.fn.fn.to_out.0'))
    layout.update(_layernorm(ours + ('ff_norm',), f'{ref}.1.fn.norm'))
    layout.update(_linear(ours + ('fc1',), f'{ref}.1.fn.fn.net.0'))
    layout.update(_linear(ours + ('fc2',), f'{ref}.1.fn.fn.net.3'))
  return layout


def param_shapes(model_config) -> dict:
  """{path: shape} of every parameter of the model, without allocating it."""
  shapes = jax.eval_shape(lambda: models.init_params(model_config, jax.random.key(0)))
  return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}


def _gather(layout, tensors, shapes, where) -> dict:
  """Our flat params from reference tensors; every problem collected and reported at once, by name."""
  missing, misshaped, flat = [], [], {}
  for path, src in layout.items():
    absent = [n for n in src.names if n not in tensors]
    if absent:
      missing.extend(absent)
      continue
    arrays = [src.transform(np.asarray(tensors[n], np.float32)) for n in src.names]
    value = np.stack(arrays) if src.stacked else arrays[0]
    if value.shape != shapes[path]:
      misshaped.append(f'{"/".join(path)} from {src.names[0]}{" (stacked)" if src.stacked else ""}: '
                       f'checkpoint gives {value.shape}, the model needs {shapes[path]}')
      continue
    flat[path] = value
  problems = []
  if missing:
    problems.append(f'missing tensors: {_listing(missing)}')
  if misshaped:
    problems.append(f'mis-shaped tensors: {_listing(misshaped, "; ")}')
  if problems:
    raise ConversionError(f'{where}: ' + ' | '.join(problems) + ' (check that the config matches the checkpoint)')
  return flat


def _listing(items, sep=', ', limit=12) -> str:
  more = f'{sep}... and {len(items) - limit} more' if len(items) > limit else ''
  return sep.join(items[:limit]) + more


def _is_dropped(name):
  return any(re.fullmatch(p, name) for p in DROPPED_REFERENCE_TENSORS)


def _require_audio_visual(model_config, where) -> None:
  """The released models are the paper's audio-visual model; dropping an encoder and the fusion adapters from one
  would be a different, untrained model, so a unimodal config is refused rather than half-filled."""
  kind = mma_dfer.modalities(model_config)
  if kind != 'audio_video':
    raise ConversionError(f"{where}: released MMA-DFER checkpoints are audio-visual; config.model.modalities="
                          f"{kind!r} cannot hold one: convert with --config.model.modalities=audio_video (a "
                          "unimodal model starts from the SSL encoders: convert ssl)")


def load_released_checkpoint(path, model_config) -> dict:
  """Params of `MMADFER(model_config)` from a released MMA-DFER `model.pth` (module.-prefixed state_dict)."""
  _require_audio_visual(model_config, path)  # before reading a large file
  return params_from_reference(pth_reader.state_dict(pth_reader.load_pth(path), path), model_config, path)


def params_from_reference(tensors: dict, model_config, where='checkpoint') -> dict:
  """Params from a reference state dict {name: array}; every tensor must be used or be in the dropped list."""
  _require_audio_visual(model_config, where)
  tensors = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in tensors.items()}
  layout = reference_layout(model_config)
  used = {n for src in layout.values() for n in src.names}
  extra = sorted(n for n in tensors if n not in used and not _is_dropped(n))
  if extra:
    raise ConversionError(f'{where}: unexpected tensors the model has no place for: {_listing(extra)} '
                          '(check model.depth / model.temporal_layers in the config)')
  flat = _gather(layout, tensors, param_shapes(model_config), where)
  return flax.traverse_util.unflatten_dict(flat)


# PyTorch's bicubic kernel (upsample_bicubic2d): Keys' cubic convolution with a = -0.75.
_CUBIC_A = -0.75


def _cubic_weights(t):
  """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) interpolation matrix of torch's bicubic with align_corners=False, no antialias.

  Source coordinate (dst + 0.5) * in/out - 0.5, not clamped (torch does not clamp for cubic); taps beyond the edge
  read the edge value.
  """
  src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  matrix = np.zeros((size_out, size_in))
  for tap in range(4):
    index = np.clip(base.astype(int) - 1 + tap, 0, size_in - 1)
    np.add.at(matrix, (np.arange(size_out), index), weights[:, tap])
  return matrix


def resize_bicubic(grid: np.ndarray, new_hw) -> np.ndarray:
  """Resize (H, W, C) like F.interpolate(mode='bicubic', align_corners=False) (separable, so applied per axis)."""
  h, w = grid.shape[:2]
  if (h, w) == tuple(new_hw):
    return grid
  rows, cols = _bicubic_matrix(h, new_hw[0]), _bicubic_matrix(w, new_hw[1])
  out = np.einsum('ph,hwc->pwc', rows, grid.astype(np.float64))
  return np.einsum('qw,pwc->pqc', cols, out).astype(grid.dtype)


def _ssl_grid(num_patches: int, width_patches: int, name: str):
  """The SSL checkpoint's patch grid: square for faces; for audio, time x (the model's mel patches)."""
  if name == 'vision':
    side = math.isqrt(num_patches)
    if side * side != num_patches:
      raise ConversionError(f'face checkpoint: pos_embed has {num_patches} patch rows, not a square grid')
    return side, side
  if num_patches % width_patches:
    raise ConversionError(f'audio checkpoint: pos_embed has {num_patches} patch rows, not divisible by '
                          f'{width_patches} mel patches (model.audio_mels / patch_size)')
  return num_patches // width_patches, width_patches


def resize_pos_embed(ssl_pos, old_grid, new_grid, new_rows, rng) -> np.ndarray:
  """The reference's pos_embed: [cls, resized SSL grid, new N(0,1) prompt rows]."""
  width = ssl_pos.shape[-1]
  cls, grid = ssl_pos[0, :1], ssl_pos[0, 1:].reshape(old_grid + (width,))
  grid = resize_bicubic(grid, new_grid).reshape(-1, width)
  prompt_rows = np.asarray(jax.random.normal(rng, (new_rows, width), jnp.float32))
  return np.concatenate([cls, grid, prompt_rows])[None]


def ssl_encoders(model_config) -> tuple:
  """(our encoder name, SSL file role) of each encoder the model has: ('vision', 'face') and/or ('audio', 'audio')."""
  used = []
  if mma_dfer.uses_video(model_config):
    used.append(('vision', 'face'))
  if mma_dfer.uses_audio(model_config):
    used.append(('audio', 'audio'))
  return tuple(used)


def init_from_ssl(model_config, face_path, audio_path, rng) -> dict:
  """Starting params: frozen encoders from MAE-Face / AudioMAE, everything new initialised as the reference does.

  A unimodal model (model.modalities 'video' or 'audio') reads only its encoder's file; the other path is not
  opened and may be empty or None.
  """
  c = model_config
  init_rng, face_rng, audio_rng = jax.random.split(rng, 3)
  params = models.init_params(c, init_rng)
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  shapes = {k: v.shape for k, v in flat.items()}
  grids = {'vision': mma_dfer.vision_grid(c), 'audio': mma_dfer.audio_grid(c)}
  paths = {'face': face_path, 'audio': audio_path}
  pos_rngs = {'vision': face_rng, 'audio': audio_rng}
  for ours, role in ssl_encoders(c):
    path, pos_rng = paths[role], pos_rngs[ours]
    if not path:
      raise ConversionError(f'config.model.modalities={mma_dfer.modalities(c)!r} needs the {role} SSL checkpoint; '
                            f'none was given')
    tensors = pth_reader.state_dict(pth_reader.load_pth(path), path)
    flat.update(_gather(encoder_layout(c, ours, ''), tensors, shapes, path))
    if 'pos_embed' not in tensors:
      raise ConversionError(f'{path}: missing tensors: pos_embed')
    ssl_pos = np.asarray(tensors['pos_embed'], np.float32)
    old_grid = _ssl_grid(ssl_pos.shape[1] - 1, grids[ours][1], ours)
    new_rows = mma_dfer.num_prompts(c)
    flat[(ours, 'embed', 'pos_embed')] = resize_pos_embed(ssl_pos, old_grid, grids[ours], new_rows, pos_rng)
  return flax.traverse_util.unflatten_dict(flat)


def _count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _checked_out(out: str, overwrite: bool) -> str:
  """Refuses an --out that cannot take a checkpoint, before any conversion work (one line, exit code 2)."""
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  path = checkpoint.as_path(out)  # a local directory or a URL such as gs://bucket/ckpt
  if path.exists() and not path.is_dir():
    raise cli.UserError(f'--out {out}: is a file; give a directory (convert writes DIR/{checkpoint.PARAMS_DIR}/ '
                        f'and DIR/{checkpoint.CONFIG_FILE})')
  cli.check_writable_dir(out, '--out')
  if not overwrite:
    if (path / checkpoint.PARAMS_DIR).exists():
      raise cli.UserError(f'--out {out}: already holds a converted checkpoint ({checkpoint.PARAMS_DIR}/); choose '
                          'another --out, or pass --overwrite to replace it')
    if (path / checkpoint.CONFIG_FILE).exists() or (path / checkpoint.TRAIN_CHECKPOINTS_DIR).exists():
      raise cli.UserError(f'--out {out}: holds a {checkpoint.CONFIG_FILE} (a training work directory?); choose '
                          f'another --out, or pass --overwrite to replace its {checkpoint.CONFIG_FILE}')
  return out


def main(argv=None) -> int:
  """The command line (`mma-dfer-convert`): parses `argv` (sys.argv by default) with fresh flag values."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel

  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  f = flags.FlagValues()
  cli.define_config_flag(f, argv, 'Experiment config file (configs/*.py); gives the model sizes.')
  flags.DEFINE_string('out', None, 'Output directory for the Orbax checkpoint.', flag_values=f)
  flags.DEFINE_string('src', None, 'released: the MMA-DFER model.pth.', flag_values=f)
  flags.DEFINE_string('face', None, 'ssl: the MAE-Face checkpoint (mae_face_pretrain_vit_base.pth).', flag_values=f)
  flags.DEFINE_string('audio', None, 'ssl: the AudioMAE checkpoint (pretrained.pth).', flag_values=f)
  flags.DEFINE_bool('overwrite', False, 'Replace a checkpoint or config.json already in --out.', flag_values=f)
  rest = cli.parse_flags(f, argv)
  if len(rest) != 2 or rest[1] not in ('released', 'ssl'):
    raise cli.UserError('usage: python -m mma_dfer_jax.convert {released|ssl} --out DIR --config configs/X.py '
                        '[--src model.pth | --face F.pth --audio A.pth]')
  config = f.config
  if config is None:
    raise cli.UserError('--config is required (e.g. --config configs/mafw.py): it gives the model sizes')
  if not f.out:
    raise cli.UserError('--out is required: the directory the checkpoint is written to')
  if rest[1] == 'released' and not f.src:
    raise cli.UserError('`released` needs --src model.pth')
  cli.check_model_config(config.model)
  needed = {'face': (f.face, '--face mae_face_pretrain_vit_base.pth'), 'audio': (f.audio, '--audio audiomae.pth')}
  missing = [needed[role][1] for _, role in ssl_encoders(config.model) if not needed[role][0]]
  if rest[1] == 'ssl' and missing:
    raise cli.UserError(f'`ssl` with config.model.modalities={mma_dfer.modalities(config.model)!r} needs '
                        + ' and '.join(missing))
  out = _checked_out(f.out, f.overwrite)
  logging.set_verbosity(logging.WARNING)
  started = time.perf_counter()
  if rest[1] == 'released':
    params = load_released_checkpoint(f.src, config.model)
  else:
    params = init_from_ssl(config.model, f.face, f.audio, jax.random.key(config.seed))
  old_params = checkpoint.as_path(out) / checkpoint.PARAMS_DIR
  if f.overwrite and old_params.is_dir():
    old_params.rmtree()  # only now that the new parameters are ready
  written = checkpoint.save_params(out, params, config)
  print(f'wrote {_count(params) / 1e6:.1f}M parameters to {written} in {time.perf_counter() - started:.1f} s')
  return 0


def run():
  """The console script's entry point (`mma-dfer-convert`)."""
  cli.run_main(main)


if __name__ == '__main__':
  run()
