"""Read PyTorch `.pth` files without torch, and without ever executing code from the file.

Why by hand: `torch.load(weights_only=True)` needs torch (which TPU VMs and our users need not have), and the
well-kept torch-free readers we know of (safetensors, numpy) do not read the zip+pickle format. The format is small:
a zip archive `<root>/data.pkl` (a pickle of the object tree) plus `<root>/data/<key>` files (raw storages, byte
order in `<root>/byteorder`). Our unpickler resolves only the handful of globals a tensor needs, to functions of
ours; every other global (the released checkpoints pickle a `RecorderMeter` from the training script's `__main__`,
numpy arrays and optimizer internals) becomes an inert placeholder, so nothing named in the file is ever imported
or called.

The file is untrusted input: every tensor's storage offset, sizes and strides are checked against its storage's
element count before a view is made (a crafted file could otherwise read process memory through `as_strided`),
and every way a file can be damaged (empty, cut short, a bad CRC, not a zip, a pre-1.6 torch pickle, a zip
without `data.pkl`) ends in one PthFormatError line that names the file, what is wrong and what to do.
"""
import collections
import io
import os
import pickle
import pickletools
import zipfile
import zlib

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
# A view whose elements overlap (a stride of 0, as an expanded tensor has) can hold more elements than its storage;
# beyond this many, such a tensor is refused rather than allocated (a 1-element storage could claim 2^60).
MAX_OVERLAPPING_ELEMENTS = 1 << 24
_MAX_DIMS = 32  # numpy's limit is 64; no weight has more than a handful

# What the first bytes of a file that is not a zip say about it.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]  # torch.save before 1.6 starts so
_PICKLE_PROTOCOL_BYTE = b'\x80'
_ZIP_LOCAL_HEADER = b'PK\x03\x04'
_RESAVE = 'load it with torch and torch.save(obj, path) from PyTorch >= 1.6, or fetch the file again'
_REFETCH = 'fetch or copy the file again'


class PthFormatError(ValueError):
  """The file is not a PyTorch zip checkpoint we can read; the message names the file and what to do."""


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


class _RecordError(Exception):
  """A tensor or storage record that is not what torch writes (raised while unpickling; load_pth adds the file)."""


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_view(numel: int, storage_offset, size, stride):
  """Raises _RecordError unless a strided view (offset, size, stride) of a storage of numel elements stays
  inside it: non-negative integers, as many strides as sizes, every element index below numel."""
  if not (_is_int(storage_offset) and storage_offset >= 0):
    raise _RecordError(f'tensor storage offset {storage_offset!r} is not a non-negative integer')
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)):
    raise _RecordError(f'tensor size {size!r} and stride {stride!r} are not two sequences of one length')
  if len(size) > _MAX_DIMS:
    raise _RecordError(f'tensor with {len(size)} dimensions (at most {_MAX_DIMS})')
  if not all(_is_int(v) and v >= 0 for v in (*size, *stride)):
    raise _RecordError(f'tensor size {tuple(size)} or stride {tuple(stride)} holds a negative or non-integer value')
  elements = 1
  for n in size:
    elements *= n  # Python integers: no overflow however large the file's numbers are
  if elements == 0:
    if storage_offset > numel:
      raise _RecordError(f'tensor storage offset {storage_offset} is beyond its storage of {numel} elements')
    return
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= numel:
    raise _RecordError(f'tensor size {tuple(size)}, stride {tuple(stride)} and storage offset {storage_offset} '
                       f'reach element {last}, beyond its storage of {numel} elements')
  if elements > numel and elements > MAX_OVERLAPPING_ELEMENTS:
    raise _RecordError(f'tensor size {tuple(size)} has {elements} elements over a storage of {numel} '
                       f'(overlapping views are limited to {MAX_OVERLAPPING_ELEMENTS})')


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: a strided view into a flat storage, checked, then copied out as an array."""
  if not isinstance(storage, np.ndarray):
    raise _RecordError(f'tensor storage is {storage!r}, not a storage record of the archive')
  check_view(storage.shape[0], storage_offset, size, stride)
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

  def __init__(self, file, read_record, byteorder):
    super().__init__(file)
    self._read_record, self._byteorder = read_record, byteorder
    self._storages = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    return _placeholder_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == 'storage'):
      raise _RecordError(f'unexpected persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise _RecordError(f'unsupported storage type {getattr(storage_type, "qualified_name", storage_type)!r}')
    if key not in self._storages:
      self._storages[key] = self._storage(storage_type.dtype, key, pid[4] if len(pid) > 4 else None)
    return self._storages[key]

  def _storage(self, dtype, key, numel):
    raw = self._read_record(f'data/{key}')
    if len(raw) % dtype.itemsize:
      raise _RecordError(f'storage data/{key} holds {len(raw)} bytes, not a whole number of {dtype} elements')
    if numel is not None:  # the element count torch recorded; a shorter record is cut short
      if not (_is_int(numel) and 0 <= numel * dtype.itemsize <= len(raw)):
        raise _RecordError(f'storage data/{key} holds {len(raw) // dtype.itemsize} elements, '
                           f'the checkpoint says {numel!r}')
      raw = memoryview(raw)[:numel * dtype.itemsize]  # no copy
    stored = dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
    return np.frombuffer(raw, dtype=stored).astype(dtype, copy=False)


def _not_a_zip_reason(path: str) -> str:
  """What a file that is not a readable zip is, from its size and first bytes."""
  with open(path, 'rb') as f:
    head = f.read(512)
  if not head:
    return f'{path}: the file is empty (0 bytes); {_REFETCH}'
  if head.startswith(_ZIP_LOCAL_HEADER):
    return (f'{path}: a zip archive cut short or damaged (its central directory at the end is missing, '
            f'{os.path.getsize(path)} bytes); {_REFETCH}')
  if head.startswith(_LEGACY_TORCH_MAGIC):
    return (f'{path}: a legacy (pre-1.6) PyTorch checkpoint, which this reader does not read; {_RESAVE}')
  if len(head) > 262 and head[257:262] == b'ustar':
    return f'{path}: a tar archive (the legacy PyTorch tar format?), not a zip checkpoint; {_RESAVE}'
  if head.startswith(_PICKLE_PROTOCOL_BYTE):
    return (f'{path}: a plain pickle, not a zip-format PyTorch checkpoint (a legacy pre-1.6 torch.save, or not '
            f'from torch at all); {_RESAVE}')
  return (f'{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with {head[:8]!r}); '
          f'give the path of a .pth file saved by torch.save')


def _describe(error: BaseException) -> str:
  return f'{type(error).__name__}: {error}' if str(error) else type(error).__name__


def _reader_of(archive: zipfile.ZipFile, path: str, root: str):
  """read(name): the bytes of `<root>/<name>`, CRC-checked, or a PthFormatError naming the member."""
  def read(name):
    member = f'{root}/{name}'
    try:
      return archive.read(member)
    except KeyError as e:
      raise PthFormatError(f'{path}: the archive has no {member} (an incomplete or altered checkpoint); '
                           f'{_REFETCH}') from e
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as e:
      raise PthFormatError(f'{path}: {member} is damaged ({_describe(e)}); {_REFETCH}') from e
  return read


def _pickle_root(archive: zipfile.ZipFile, path: str) -> str:
  pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    found = 'none' if not pickles else ', '.join(pickles)
    raise PthFormatError(f'{path}: a zip archive but not a PyTorch checkpoint: expected one <root>/data.pkl, '
                         f'found {found}; give the path of a .pth file saved by torch.save')
  return pickles[0].split('/')[0]


# What unpickling damaged or hostile bytes can raise, besides our own errors.
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                  UnicodeDecodeError, RecursionError)


def _check_opcodes(data: bytes):
  """A first pass over the pickle's opcodes (pickletools reads, it builds nothing): every length must fit the
  bytes that remain and every memo index the pickle's size. The C unpickler allocates first: a damaged length
  or memo index (say 2^31) would cost gigabytes before it noticed."""
  for opcode, arg, _ in pickletools.genops(data):
    if opcode.name in ('PUT', 'BINPUT', 'LONG_BINPUT') and not 0 <= int(arg) < len(data):
      raise ValueError(f'memo index {arg} in a pickle of {len(data)} bytes')


def _load_remote(url: str):
  """A gs:// (or other etils.epath) .pth: copied to a temporary local file first (the zip reader seeks), read, and
  the copy removed; errors name the URL."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  remote = epath.Path(url)
  if not remote.is_file():
    raise FileNotFoundError(f'{url}: no such file')
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, remote.name)
    remote.copy(local)
    try:
      return load_pth(local)
    except PthFormatError as e:
      raise PthFormatError(str(e).replace(local, url)) from None


def load_pth(path):
  """The object tree of a `.pth` file, with tensors as numpy arrays and other objects as inert placeholders.

  Raises FileNotFoundError for a missing file and PthFormatError (one line: the file, what is wrong, what to do)
  for an empty, truncated, corrupt, legacy or foreign file, or a tensor that does not fit its storage.
  """
  path = os.fspath(path)
  if '://' in path:
    return _load_remote(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise PthFormatError(_not_a_zip_reason(path)) from e
  except (ValueError, EOFError, NotImplementedError, RuntimeError) as e:  # impossible offsets, sizes or versions
    raise PthFormatError(f'{path}: a damaged zip archive ({_describe(e)}); {_REFETCH}') from e
  with archive:
    root = _pickle_root(archive, path)
    read = _reader_of(archive, path, root)
    byteorder = 'little'
    if f'{root}/byteorder' in archive.namelist():
      byteorder = read('byteorder').decode(errors='replace').strip()
      if byteorder not in ('little', 'big'):
        raise PthFormatError(f'{path}: {root}/byteorder says {byteorder!r}, not little or big; {_REFETCH}')
    data = read('data.pkl')  # read whole, so that its CRC is checked before anything is built from it
    try:
      _check_opcodes(data)
      return _SafeUnpickler(io.BytesIO(data), read, byteorder).load()
    except _RecordError as e:
      raise PthFormatError(f'{path}: {e}; the file is damaged or was crafted, {_REFETCH}') from e
    except _PICKLE_ERRORS as e:
      if isinstance(e, PthFormatError):
        raise
      raise PthFormatError(f'{path}: {root}/data.pkl is not a readable pickle ({_describe(e)}); '
                           f'{_REFETCH}') from e


def state_dict(obj, path='checkpoint'):
  """The flat {name: array} of a loaded checkpoint: `state_dict`, `model` or the object itself."""
  for key in ('state_dict', 'model'):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise PthFormatError(f'{path}: no state dict found (expected a dict, or one under "state_dict" or "model")')
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
