"""The trained (or converted) model as one portable file: a serialized `jax.export` of its forward pass.

  python -m mma_dfer_jax.export --checkpoint DIR --out model.jax [--platforms cpu,cuda,tpu]
                                [--config configs/X.py --config.key=value ...]

The exported function takes video uint8 (N, T, H, W, 3) (T = model.num_frames, H = W = model.img_size; RGB face
crops as the test pipeline makes them) and the normalised fbank float32 (N, 512, 128) and returns the class
probabilities float32 (N, C); N is symbolic. A unimodal model (model.modalities 'video' or 'audio') keeps this
two-input signature and ignores the absent modality's input (give zeros of its shape); the sidecar marks that
input `"used": false`. The uint8 -> [0, 1] conversion is inside, as in the eval step. The
parameters are baked into the module as constants, and all platforms share one module (jax.export lowers a
multi-platform module once; the constants are stored once), so the artifact is the one file a user needs:

  exported = jax.export.deserialize(open('model.jax', 'rb').read())
  probabilities = exported.call(video, fbank)

`portable_loader.py` does that (and reads the sidecar) with only jax and numpy installed. Beside FILE goes
FILE.json: class names, input and output shapes and dtypes, platforms, the implementations traced and the config
the model came from. The module uses XLA's own ops only (never this package's CPU kernels, which are not
registered where the package is absent). The checkpoint's stored config is used, with `--config.key=value`
overrides applied onto it, unless --config FILE replaces it.
A user error is one line and exit code 2 (cli.py).
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from mma_dfer_jax import audio as audio_lib
from mma_dfer_jax import checkpoint
from mma_dfer_jax import cli
from mma_dfer_jax import cpu
from mma_dfer_jax import labels as labels_lib
from mma_dfer_jax import train
from mma_dfer_jax import models
from mma_dfer_jax.models import mma_dfer

PLATFORMS = ('cpu', 'cuda', 'tpu')
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
SIDECAR_SUFFIX = '.json'
FORMAT = 'mma-dfer-jax exported model'
FORMAT_VERSION = 1


def portable_model_config(model_config, platforms=PLATFORMS):
  """config.model with the implementations fixed for a single-device module lowered for `platforms`, through XLA's
  own ops (the CPU kernels are custom calls of this package: absent where the artifact runs)."""
  return cpu.resolved_model_config(ml_collections.FrozenConfigDict(model_config), tuple(platforms),
                                   num_devices=1, custom_calls=False)


def probabilities_fn(params, model_config, platforms=PLATFORMS):
  """`(video uint8 (N,T,H,W,3), fbank (N,512,128)) -> softmax(logits)` with `params` closed over (constants)."""
  model = models.build(portable_model_config(model_config, platforms))

  def probabilities(video, audio):
    video, audio = train.to_model_inputs({'video': video, 'audio': audio})  # uint8 -> [0, 1], as in eval
    logits = model.apply({'params': params}, video, audio, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probabilities


def input_specs(model_config) -> tuple:
  """(video, audio) ShapeDtypeStructs with a symbolic batch dimension 'batch'."""
  c = model_config
  (batch,) = jax.export.symbolic_shape('batch')
  video = jax.ShapeDtypeStruct((batch, c.num_frames, c.img_size, c.img_size, 3), jnp.uint8)
  audio = jax.ShapeDtypeStruct((batch, c.audio_frames, c.audio_mels), jnp.float32)
  return video, audio


def export_model(params, model_config, platforms=PLATFORMS) -> jax.export.Exported:
  """The forward pass lowered for every platform in `platforms`, with `params` as constants."""
  params = jax.tree_util.tree_map(jnp.asarray, params)
  forward = jax.jit(probabilities_fn(params, model_config, platforms))
  return jax.export.export(forward, platforms=tuple(platforms))(*input_specs(model_config))


def _shape_text(spec) -> list:
  return [str(d) if not isinstance(d, int) else d for d in spec.shape]


def sidecar(exported: jax.export.Exported, config, checkpoint_dir=None) -> dict:
  """What a user of the artifact needs besides the module: classes, inputs, outputs, where it came from."""
  c = config.model
  video, audio = input_specs(c)
  traced = portable_model_config(c, exported.platforms)
  implementations = {'attention_impl': traced.attention_impl, 'matmul_impl': traced.matmul_impl}
  return {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'class_names': list(labels_lib.class_names(config.get('dataset', ''), c.num_classes)),
      'inputs': {
          'video': {'shape': _shape_text(video), 'dtype': 'uint8',
                    'meaning': 'RGB face crops, 0..255, the frames at the test-time segment centres',
                    'used': mma_dfer.uses_video(c)},
          'audio': {'shape': _shape_text(audio), 'dtype': 'float32',
                    'meaning': 'the normalised Kaldi fbank (mma_dfer_jax.audio.load_fbank)',
                    'silent_value': float(audio_lib.silent_fbank(1, 1)[0, 0]),  # a clip without audio: all this
                    'used': mma_dfer.uses_audio(c)},
      },
      'modalities': mma_dfer.modalities(c),
      'outputs': {'probabilities': {'shape': ['batch', c.num_classes], 'dtype': 'float32'}},
      'platforms': list(exported.platforms),
      'implementations': implementations,
      'calling_convention_version': exported.calling_convention_version,
      'jax_version': jax.__version__,
      'checkpoint': str(checkpoint_dir) if checkpoint_dir else None,
      'config': json.loads(config.to_json_best_effort()),
  }


def write(exported: jax.export.Exported, info: dict, out) -> dict:
  """Writes FILE (the serialized module) and FILE.json; returns {'bytes': ..., 'seconds': ...}."""
  start = time.perf_counter()
  blob = exported.serialize()
  out = checkpoint.as_path(out)  # a local file or a URL such as gs://bucket/model.jax
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(blob)
  out.with_name(out.name + SIDECAR_SUFFIX).write_text(json.dumps(info, indent=2) + '\n')
  return {'bytes': len(blob), 'seconds': time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def parse_platforms(text: str) -> tuple:
  platforms = tuple(p.strip() for p in text.split(',') if p.strip())
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if not platforms or unknown or len(set(platforms)) != len(platforms):
    raise cli.UserError(f'--platforms={text}: give distinct platforms among {",".join(KNOWN_PLATFORMS)}, '
                        'e.g. --platforms=cpu,cuda,tpu')
  return platforms


def _flag_values(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  flag_values = flags.FlagValues()
  cli.define_checkpoint_flags(flag_values, argv)
  flags.DEFINE_string('out', None, 'Where to write the serialized module (and OUT.json beside it).',
                      flag_values=flag_values)
  flags.DEFINE_string('platforms', ','.join(PLATFORMS), 'Platforms to lower for, comma-separated.',
                      flag_values=flag_values)
  return flag_values


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  flag_values = _flag_values(argv)
  rest = cli.parse_flags(flag_values, argv)
  if len(rest) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(rest[1:])}')
  if not flag_values.checkpoint or not flag_values.out:
    raise cli.UserError('--checkpoint DIR and --out FILE are required')
  platforms = parse_platforms(flag_values.platforms)
  cli.check_writable_dir(checkpoint.as_path(flag_values.out).parent, '--out')
  from mma_dfer_jax import predict  # pylint: disable=import-outside-toplevel
  # The checkpoint's config (or --config FILE) with the overrides applied, refused where it does not fit the params.
  params, config = predict.load_model(flag_values.checkpoint, cli.flag_value(argv, 'config'), flag_values.config,
                                      cli.override_keys(argv))

  start = time.perf_counter()
  exported = export_model(params, config.model, platforms)
  export_seconds = time.perf_counter() - start
  written = write(exported, sidecar(exported, config, checkpoint.as_path(flag_values.checkpoint)), flag_values.out)
  print(json.dumps({'out': str(flag_values.out), 'platforms': list(platforms), 'bytes': written['bytes'],
                    'export_s': round(export_seconds, 2), 'serialize_s': round(written['seconds'], 2)}))
  return 0


def run(argv=None):
  """The console script's entry point."""
  cli.run_main(main, argv)


if __name__ == '__main__':
  run()
