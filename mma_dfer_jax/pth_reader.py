"""Read PyTorch `.pth` files without torch, and without ever executing code from the file.

Why by hand: `torch.load(weights_only=True)` needs torch (which TPU VMs and our users need not have), and the
well-kept torch-free readers we know of (safetensors, numpy) do not read the zip+pickle format. The format is small:
a zip archive `<root>/data.pkl` (a pickle of the object tree) plus `<root>/data/<key>` files (raw storages, byte
order in `<root>/byteorder`). Our unpickler resolves only the handful of globals a tensor needs, to functions of
ours; every other global (the released checkpoints pickle a `RecorderMeter` from the training script's `__main__`,
numpy arrays and optimizer internals) becomes an inert placeholder, so nothing named in the file is ever imported
or called.
"""
import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class PthFormatError(ValueError):
  """The file is not a PyTorch zip checkpoint we can read."""


class Placeholder:
  """Stands in for any pickled object that is not a tensor or a container; accepts and ignores everything."""
  qualified_name = '?'

  def __init__(self, *args, **kwargs):
    self.args = args

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f'<placeholder for {self.qualified_name}>'


def _placeholder_class(module: str, name: str):
  return type(name, (Placeholder,), {'qualified_name': f'{module}.{name}'})


class _StorageType:
  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: a strided view into a flat storage, copied out as a numpy array."""
  if not size:
    return storage[storage_offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _SafeUnpickler(pickle.Unpickler):

  def __init__(self, file, archive, root, byteorder):
    super().__init__(file)
    self._archive, self._root, self._byteorder = archive, root, byteorder
    self._storages = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    return _placeholder_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise PthFormatError(f'unexpected persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise PthFormatError(f'unsupported storage type {storage_type!r}')
    if key not in self._storages:
      raw = self._archive.read(f'{self._root}/data/{key}')
      dtype = storage_type.dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
      self._storages[key] = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype, copy=False)
    return self._storages[key]


def load_pth(path):
  """The object tree of a `.pth` file, with tensors as numpy arrays and other objects as inert placeholders."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if not zipfile.is_zipfile(path):
    raise PthFormatError(f'{path}: not a zip-format PyTorch checkpoint (legacy pre-1.6 format?). Re-save it with '
                         'torch.save(obj, path) from PyTorch >= 1.6 and convert again.')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise PthFormatError(f'{path}: expected one <root>/data.pkl in the archive, found {len(pickles)}')
    root = pickles[0].split('/')[0]
    byteorder = 'little'
    if f'{root}/byteorder' in archive.namelist():
      byteorder = archive.read(f'{root}/byteorder').decode().strip()
    with archive.open(pickles[0]) as f:
      try:
        return _SafeUnpickler(f, archive, root, byteorder).load()
      except (pickle.UnpicklingError, EOFError) as e:
        raise PthFormatError(f'{path}: corrupt pickle ({e})') from e


def state_dict(obj, path='checkpoint'):
  """The flat {name: array} of a loaded checkpoint: `state_dict`, `model` or the object itself."""
  for key in ('state_dict', 'model'):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise PthFormatError(f'{path}: no state dict found (expected a dict, or one under "state_dict" or "model")')
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
