"""The model's settings as typed fields: what the Linen modules read, made from `config.model` in one place.

`model_spec(config.model)` takes a ConfigDict (or FrozenConfigDict, a dict, or a ModelSpec) and gives a frozen,
hashable `ModelSpec`; keys an older config lacks take the defaults of mma_dfer_jax/settings.py (where saved configs
are loaded, `settings.upgrade` has filled them already). `models.build(config.model)` is the model made from it.
"""
import dataclasses

from mma_dfer_jax import settings


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """config.model's keys (settings.model_config documents each)."""
  num_classes: int
  modalities: str              # 'audio_video' | 'video' | 'audio'
  img_size: int
  patch_size: int
  num_frames: int
  audio_frames: int
  audio_mels: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  prompts_per_stage: int
  fusion_width: int
  temporal_width: int
  temporal_layers: int
  temporal_heads: int
  temporal_head_dim: int
  temporal_mlp_dim: int
  drop_path_rate: float
  dtype: str                   # 'float32' | 'bfloat16'
  remat: bool
  remat_policy: str
  scan_unroll: int
  attention_impl: str          # '' = chosen for the platform (mma_dfer_jax/cpu)
  matmul_impl: str


FIELDS = tuple(field.name for field in dataclasses.fields(ModelSpec))


def model_spec(model_config) -> ModelSpec:
  """`model_config` as a ModelSpec; keys it does not hold take settings' defaults (num_classes is required)."""
  if isinstance(model_config, ModelSpec):
    return model_config
  defaults = settings.model_config(num_classes=0)

  def value(name):
    if isinstance(model_config, dict):
      return model_config.get(name, defaults[name])
    return getattr(model_config, name, defaults[name])  # ConfigDict: AttributeError for a missing key

  spec = ModelSpec(**{name: value(name) for name in FIELDS})
  if not spec.num_classes:
    raise ValueError('config.model.num_classes: missing; the model needs the number of classes')
  return spec
