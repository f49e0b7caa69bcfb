"""Weight conversion: the torch-free .pth reader, the released-model and SSL mappings, bicubic resize, Orbax."""
import io
import pickle
import zipfile

import flax
import jax
import numpy as np
import pytest
from conftest import small_model_config

from mma_dfer_jax import checkpoint
from mma_dfer_jax import convert
from mma_dfer_jax import pth_reader


@pytest.fixture(scope='module')
def reference_tensors(reference_small):
  return pth_reader.state_dict(pth_reader.load_pth(reference_small / 'model.pth'))


def test_reader_reads_released_checkpoint_without_its_classes(reference_small):
  obj = pth_reader.load_pth(reference_small / 'model.pth')
  assert set(obj) == {'epoch', 'state_dict', 'best_acc', 'optimizer', 'recorder'}
  assert isinstance(obj['recorder'], pth_reader.Placeholder)  # a class from the training script's __main__
  sd = obj['state_dict']
  assert len(sd) == 500 and all(k.startswith('module.') for k in sd)
  w = sd['module.vision_proj.weight']
  assert w.shape == (512, 96) and w.dtype == np.float32


def _malicious_pth(path, marker):
  class Evil:
    def __reduce__(self):
      import os
      return (os.system, (f'touch {marker}',))
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', pickle.dumps({'model': {'x': Evil()}}, protocol=2))
    z.writestr('archive/byteorder', 'little')


def test_malicious_pickle_runs_nothing(tmp_path):
  marker = tmp_path / 'pwned'
  _malicious_pth(tmp_path / 'evil.pth', marker)
  obj = pth_reader.load_pth(tmp_path / 'evil.pth')
  assert not marker.exists()
  assert isinstance(obj['model']['x'], pth_reader.Placeholder)
  with pytest.raises(convert.ConversionError):
    convert.load_released_checkpoint(tmp_path / 'evil.pth', small_model_config())


def test_legacy_and_missing_files_are_clear_errors(tmp_path):
  legacy = tmp_path / 'legacy.pth'
  legacy.write_bytes(pickle.dumps({'a': 1}))
  with pytest.raises(pth_reader.PthFormatError, match='legacy'):
    pth_reader.load_pth(legacy)
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    pth_reader.load_pth(tmp_path / 'nope.pth')


def test_missing_extra_and_misshaped_tensors_are_named(reference_tensors):
  config = small_model_config()
  tensors = dict(reference_tensors)
  del tensors['module.image_encoder.all_gate.3']
  with pytest.raises(convert.ConversionError, match=r'missing tensors: image_encoder\.all_gate\.3'):
    convert.params_from_reference(tensors, config)
  tensors = dict(reference_tensors, **{'module.image_encoder.surprise': np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError, match=r'unexpected tensors.*image_encoder\.surprise'):
    convert.params_from_reference(tensors, config)
  tensors = dict(reference_tensors)
  tensors['module.our_classifier.weight'] = np.zeros((5, 512), np.float32)
  with pytest.raises(convert.ConversionError, match=r'mis-shaped tensors: classifier/kernel from our_classifier'):
    convert.params_from_reference(tensors, config)
  # The dropped tensors may be absent or present.
  kept = {k: v for k, v in reference_tensors.items() if 'norm2' not in k or 'temporal' not in k}
  convert.params_from_reference(kept, config)
  assert len(kept) == len(reference_tensors) - 4


def test_every_reference_tensor_is_accounted_for(reference_tensors):
  layout = convert.reference_layout(small_model_config())
  used = {n for src in layout.values() for n in src.names}
  names = {k[len('module.'):] for k in reference_tensors}
  dropped = {n for n in names if convert._is_dropped(n)}
  assert used | dropped == names and not used & dropped
  heads = {f'{enc}.head.{wb}' for enc in ('image_encoder', 'audio_model') for wb in ('weight', 'bias')}
  norm2 = {n for n in names if 'norm2' in n and n.startswith('temporal_net')}
  assert dropped == heads | norm2 and len(norm2) == 4


@pytest.mark.slow
def test_init_from_ssl_equals_released_backbone(reference_small):
  config = small_model_config()
  released = flax.traverse_util.flatten_dict(convert.load_released_checkpoint(reference_small / 'model.pth', config))
  ssl = flax.traverse_util.flatten_dict(convert.init_from_ssl(
      config, reference_small / 'mae_face_pretrain_vit_base.pth', reference_small / 'audiomae_pretrained.pth',
      jax.random.key(0)))
  assert ssl.keys() == released.keys()
  frozen = [k for k in released if k[0] in ('vision_norm', 'audio_norm') or k[1] in ('vision_block', 'audio_block')
            or k[-2:] in (('patch_embed', 'kernel'), ('patch_embed', 'bias')) or k[-1] == 'cls_token' and k[0] != 'temporal']
  assert len(frozen) == 2 * (2 + 12 + 3)
  for k in frozen:
    np.testing.assert_array_equal(ssl[k], released[k], err_msg=str(k))
  for enc in ('vision', 'audio'):  # resized SSL rows equal; the 6 new prompt rows are fresh N(0,1) draws
    ours, ref = ssl[(enc, 'embed', 'pos_embed')], released[(enc, 'embed', 'pos_embed')]
    np.testing.assert_allclose(ours[:, :-6], ref[:, :-6], atol=1e-6)
    assert 0.5 < ours[0, -6:].std() < 1.5
  gates = ssl[('layers', 'fusion', 'vision_up', 'gate')]
  np.testing.assert_array_equal(gates, np.zeros(12))
  prompts = ssl[('vision', 'embed', 'prompts_init')]
  assert abs(prompts.std() - 96 ** -0.5) < 0.03


# F.interpolate(x, size, mode='bicubic', align_corners=False) computed by PyTorch 2.13 on
# x = arange(24, float64).reshape(1, 2, 3, 4) ** 1.5 / 7, shown channels-last.
TORCH_BICUBIC_2x3 = [[[0.209849286, 6.6345264534], [0.531855374, 7.7152528227], [1.034170642, 8.8554177562]],
                     [[2.8739268223, 12.1863364809], [3.7061281357, 13.5015382773], [4.6124904563, 14.8659291559]]]
TORCH_BICUBIC_5x7_ROW0 = [[-0.1209213159, 5.5567496946], [-0.0858651608, 5.8375091284], [-0.0142177863, 6.2989621396],
                          [0.1030173939, 6.7604417392], [0.2704997348, 7.2363730253], [0.465763356, 7.733379553],
                          [0.5911558997, 8.0401208165]]


def test_bicubic_matches_torch_values():
  x = (np.arange(24, dtype=np.float64).reshape(2, 3, 4) ** 1.5 / 7).transpose(1, 2, 0)
  np.testing.assert_allclose(convert.resize_bicubic(x, (2, 3)), TORCH_BICUBIC_2x3, atol=1e-8)
  np.testing.assert_allclose(convert.resize_bicubic(x, (5, 7))[0], TORCH_BICUBIC_5x7_ROW0, atol=1e-8)
  np.testing.assert_array_equal(convert.resize_bicubic(x, (3, 4)), x)


def test_bicubic_rows_sum_to_one_and_keep_constants():
  for n_in, n_out in ((14, 7), (64, 32), (8, 13)):
    np.testing.assert_allclose(convert._bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)
  const = np.full((6, 5, 2), 3.25)
  np.testing.assert_allclose(convert.resize_bicubic(const, (9, 4)), 3.25, atol=1e-12)


def test_orbax_round_trip(tmp_path, reference_small):
  from configs import dfew
  config = dfew.get_config()
  config.model = small_model_config()
  params = convert.load_released_checkpoint(reference_small / 'model.pth', config.model)
  checkpoint.save_params(tmp_path / 'ckpt', params, config)
  restored = checkpoint.load_params(tmp_path / 'ckpt')
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, restored)
  assert checkpoint.load_config(tmp_path / 'ckpt').model.width == 96
  with pytest.raises(FileExistsError):
    checkpoint.save_params(tmp_path / 'ckpt', params, config)
  with pytest.raises(checkpoint.CheckpointNotFoundError, match='no checkpoint'):
    checkpoint.load_params(tmp_path)


def _convert_cli(*args):
  import os
  import subprocess
  import sys
  from conftest import ROOT
  return subprocess.run([sys.executable, '-m', 'mma_dfer_jax.convert', *map(str, args)], cwd=ROOT, text=True,
                        capture_output=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)


@pytest.mark.slow
def test_command_line_writes_a_loadable_checkpoint_and_reports_errors_in_one_line(tmp_path, reference_small):
  sizes = ['--config.model.width=96', '--config.model.num_heads=3', '--config.model.mlp_dim=384']
  done = _convert_cli('released', '--src', reference_small / 'model.pth', '--out', tmp_path / 'out',
                      '--config', 'configs/dfew.py', *sizes)
  assert done.returncode == 0, done.stderr[-2000:]
  params = checkpoint.load_params(tmp_path / 'out')
  expected = convert.load_released_checkpoint(reference_small / 'model.pth', small_model_config())
  jax.tree_util.tree_map(np.testing.assert_array_equal, expected, params)
  failed = _convert_cli('released', '--src', reference_small / 'model.pth', '--out', tmp_path / 'bad',
                        '--config', 'configs/dfew.py')  # ViT-B sizes do not fit the small checkpoint
  assert failed.returncode == 2  # the contract of every command (cli.py)
  lines = failed.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'mis-shaped tensors' in lines[0], failed.stderr
  assert not (tmp_path / 'bad').exists()  # nothing written
  again = _convert_cli('released', '--src', reference_small / 'model.pth', '--out', tmp_path / 'out',
                       '--config', 'configs/dfew.py', *sizes)
  assert again.returncode == 2 and '--overwrite' in again.stderr  # a checkpoint is never replaced silently
