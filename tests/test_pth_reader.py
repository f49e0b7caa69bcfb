"""The torch-free .pth reader on crafted files: tensors that do not fit their storage, damaged and foreign files.

The files are written here with zipfile and a hand-assembled pickle laid out as torch.save lays it out (protocol 2,
`torch._utils._rebuild_tensor_v2` over a persistent id ('storage', torch.<Type>Storage, key, 'cpu', numel)), so
no torch is needed.
"""
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import ROOT

from mma_dfer_jax import pth_reader


# ---------------------------------------------------------------------------------------------------------------
# A tiny pickle assembler for torch's layout.

def _int(value):
  if -2 ** 31 <= value < 2 ** 31:
    return b'J' + struct.pack('<i', value)  # BININT
  raw = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(raw)]) + raw  # LONG1


def _str(text):
  raw = text.encode()
  return b'X' + struct.pack('<I', len(raw)) + raw  # BINUNICODE


def _tuple(items):
  return b'(' + b''.join(items) + b't'  # MARK ... TUPLE


def _global(module, name):
  return b'c' + f'{module}\n{name}\n'.encode()


def _tensor(key, numel, offset, size, stride, storage_type='FloatStorage'):
  """The pickle ops torch writes for one tensor: _rebuild_tensor_v2(storage, offset, size, stride, False, {})."""
  pid = _tuple([_str('storage'), _global('torch', storage_type), _str(key), _str('cpu'), _int(numel)])
  args = _tuple([pid + b'Q', _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)), b'\x89',
                 _global('collections', 'OrderedDict') + b')R'])
  return _global('torch._utils', '_rebuild_tensor_v2') + args + b'R'


def _pickle(tensors):
  """A protocol-2 pickle of {'state_dict': {name: tensor ops}}."""
  items = b''.join(_str(name) + ops for name, ops in tensors.items())
  return b'\x80\x02}' + _str('state_dict') + b'}(' + items + b'us.'


def _write_pth(path, tensors, storages, byteorder='little', root='archive'):
  """A zip .pth like torch's: members stored uncompressed."""
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{root}/data.pkl', _pickle(tensors))
    archive.writestr(f'{root}/byteorder', byteorder)
    for key, data in storages.items():
      archive.writestr(f'{root}/data/{key}', data)
  return path


STORAGE = np.arange(12, dtype=np.float32)


def _single_tensor_pth(path, offset, size, stride, numel=12):
  return _write_pth(path, {'w': _tensor('0', numel, offset, size, stride)}, {'0': STORAGE.tobytes()})


def _valid_pth(path):
  return _single_tensor_pth(path, 1, (2, 3), (1, 4))


# ---------------------------------------------------------------------------------------------------------------
# Files that are right.

def test_crafted_tensors_read_as_torch_lays_them_out(tmp_path):
  tensors = {
      'transposed': _tensor('0', 12, 1, (2, 3), (1, 4)),
      'scalar': _tensor('0', 12, 11, (), ()),
      'empty': _tensor('0', 12, 12, (0, 5), (5, 1)),
      'expanded': _tensor('0', 12, 2, (3, 4), (0, 1)),
      'ints': _tensor('1', 3, 0, (3,), (1,), 'LongStorage'),
  }
  ints = np.array([-1, 2 ** 40, 7], '>i8').tobytes()
  path = _write_pth(tmp_path / 'ok.pth', tensors, {'0': STORAGE.astype('>f4').tobytes(), '1': ints}, 'big')
  obj = pth_reader.load_pth(path)['state_dict']
  sd = pth_reader.state_dict(obj)
  np.testing.assert_array_equal(sd['transposed'], [[1, 5, 9], [2, 6, 10]])
  assert obj['scalar'] == 11 and isinstance(obj['scalar'], np.float32)  # a numpy scalar (state_dict skips it)
  assert sd['empty'].shape == (0, 5)
  np.testing.assert_array_equal(sd['expanded'], np.tile(np.arange(2, 6), (3, 1)))
  np.testing.assert_array_equal(sd['ints'], [-1, 2 ** 40, 7])
  assert sd['ints'].dtype == np.int64 and sd['transposed'].dtype == np.float32


# ---------------------------------------------------------------------------------------------------------------
# Tensors that do not fit their storage.

@pytest.mark.parametrize('offset, size, stride, message', [
    (0, (4, 4), (4, 1), r'size \(4, 4\), stride \(4, 1\) and storage offset 0 reach element 15, beyond its '
                        r'storage of 12 elements'),
    (0, (3,), (10 ** 6,), 'reach element 2000000, beyond'),
    (0, (2 ** 40, 2 ** 40), (2 ** 40, 1), 'beyond its storage of 12 elements'),  # would overflow int64 bytes
    (12, (1,), (1,), 'storage offset 12 reach element 12, beyond'),
    (12, (), (), 'reach element 12, beyond'),  # a scalar one past the end
    (2 ** 62, (2,), (1,), 'beyond its storage of 12 elements'),
    (13, (0,), (1,), 'storage offset 13 is beyond its storage of 12 elements'),  # even an empty tensor
    (0, (3,), (-1,), r'stride \(-1,\) holds a negative'),
    (0, (-2, 3), (3, 1), r'size \(-2, 3\) or stride .* holds a negative'),
    (-1, (2,), (1,), 'storage offset -1 is not a non-negative integer'),
    (0, (2, 3), (1,), 'not two sequences of one length'),
    (0, (2 ** 30, 2 ** 30), (0, 0), 'elements over a storage of 12 .overlapping views are limited'),
])
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, message):
  path = _single_tensor_pth(tmp_path / 'crafted.pth', offset, size, stride)
  with pytest.raises(pth_reader.PthFormatError, match=message) as error:
    pth_reader.load_pth(path)
  text = str(error.value)
  assert text.startswith(f'{path}: tensor ') and 'damaged or was crafted' in text and '\n' not in text


def test_storage_shorter_than_its_recorded_element_count_is_refused(tmp_path):
  path = _single_tensor_pth(tmp_path / 'short.pth', 0, (2,), (1,), numel=100)
  with pytest.raises(pth_reader.PthFormatError, match='storage data/0 holds 12 elements, the checkpoint says 100'):
    pth_reader.load_pth(path)


def test_storage_record_missing_from_the_archive(tmp_path):
  path = _write_pth(tmp_path / 'nodata.pth', {'w': _tensor('0', 12, 0, (2,), (1,))}, {})
  with pytest.raises(pth_reader.PthFormatError, match='the archive has no archive/data/0'):
    pth_reader.load_pth(path)


def test_crafted_files_do_not_crash_the_process(tmp_path):
  """Out-of-storage views once reached as_strided unchecked (a segfault, or heap memory copied out): run them in a
  child so that a crash is a failure here, not a dead test run."""
  cases = [((0, (10 ** 7,), (10 ** 7,)), 'beyond'), ((10 ** 9, (), ()), 'beyond'), ((0, (4,), (-10 ** 6,)), 'negative')]
  paths = [str(_single_tensor_pth(tmp_path / f'{k}.pth', *spec)) for k, (spec, _) in enumerate(cases)]
  script = ('import sys\nfrom mma_dfer_jax import pth_reader\nfor path in sys.argv[1:]:\n  try:\n'
            '    pth_reader.load_pth(path)\n    print("READ", path)\n  except pth_reader.PthFormatError as e:\n'
            '    print(e)\n')
  done = subprocess.run([sys.executable, '-c', script, *paths], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert len(lines) == len(cases)
  for line, path, (_, expected) in zip(lines, paths, cases):
    assert line.startswith(f'{path}: tensor ') and expected in line


# ---------------------------------------------------------------------------------------------------------------
# Damaged and foreign files: each diagnosed as what it is.

def test_empty_file(tmp_path):
  path = tmp_path / 'empty.pth'
  path.write_bytes(b'')
  with pytest.raises(pth_reader.PthFormatError, match=r'empty.pth: the file is empty \(0 bytes\); fetch or copy'):
    pth_reader.load_pth(path)


@pytest.mark.parametrize('keep', [0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, keep):
  data = _valid_pth(tmp_path / 'whole.pth').read_bytes()
  path = tmp_path / 'cut.pth'
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(pth_reader.PthFormatError, match='cut.pth: a zip archive cut short or damaged') as error:
    pth_reader.load_pth(path)
  assert 'legacy' not in str(error.value)


@pytest.mark.parametrize('member', ['archive/data/0', 'archive/data.pkl'])
def test_member_with_a_bad_crc(tmp_path, member):
  path = _valid_pth(tmp_path / 'crc.pth')
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(member)
  data = bytearray(path.read_bytes())
  start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the stored bytes
  data[start + info.file_size // 2] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(pth_reader.PthFormatError, match=f'crc.pth: {member} is damaged .BadZipFile: Bad CRC-32'):
    pth_reader.load_pth(path)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
  path = tmp_path / 'noise.pth'
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes().replace(b'\x80', b'0'))
  with pytest.raises(pth_reader.PthFormatError, match='noise.pth: not a PyTorch checkpoint .neither a zip') as error:
    pth_reader.load_pth(path)
  assert 'legacy' not in str(error.value)


def test_legacy_torch_pickle_is_named_as_such(tmp_path):
  # torch.save(_use_new_zipfile_serialization=False) and torch < 1.6 begin with this magic number, pickled.
  path = tmp_path / 'old.pth'
  path.write_bytes(b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.' + b'\x80\x02}q\x00.')
  with pytest.raises(pth_reader.PthFormatError, match=r'old.pth: a legacy \(pre-1.6\) PyTorch checkpoint.*'
                                                      r'torch.save\(obj, path\) from PyTorch >= 1.6'):
    pth_reader.load_pth(path)


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / 'other.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/readme.txt', 'hello')
  with pytest.raises(pth_reader.PthFormatError, match='other.pth: a zip archive but not a PyTorch checkpoint: '
                                                      'expected one <root>/data.pkl, found none'):
    pth_reader.load_pth(path)


def test_mutated_pickles_raise_only_format_errors(tmp_path):
  """Random byte changes in data.pkl (re-zipped, so the CRC holds) either read or raise PthFormatError."""
  pickled = _pickle({'a': _tensor('0', 12, 1, (2, 3), (1, 4)), 'b': _tensor('0', 12, 0, (), ())})
  rng = np.random.default_rng(0)
  outcomes = {'read': 0, 'refused': 0}
  for trial in range(300):
    mutated = bytearray(pickled)
    for position in rng.integers(2, len(mutated), rng.integers(1, 4)):
      mutated[position] = rng.integers(0, 256)
    path = tmp_path / f'm{trial}.pth'
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', bytes(mutated))
      archive.writestr('archive/data/0', STORAGE.tobytes())
    try:
      pth_reader.load_pth(path)
      outcomes['read'] += 1
    except pth_reader.PthFormatError as e:
      assert str(e).startswith(f'{path}: ') and '\n' not in str(e)
      outcomes['refused'] += 1
  assert outcomes['refused'] > 100
