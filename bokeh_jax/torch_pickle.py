"""Reading PyTorch state dicts (`.pth`) without PyTorch, and without running arbitrary pickles.

A `.pth` file is a pickle whose tensors point at raw storages kept beside it. Two layouts exist:
  - legacy (PyTorch <= 1.5, or `_use_new_zipfile_serialization=False`): five pickles in a row
    (magic number, protocol version, system info, the object, the list of storage keys), then
    each storage as an int64 element count and its raw little-endian bytes, in the key order;
  - zip (PyTorch >= 1.6): `<dir>/data.pkl` holds the object, `<dir>/data/<key>` each storage.
Tensors are rebuilt by `torch._utils._rebuild_tensor` (PyTorch <= 0.3) or `_rebuild_tensor_v2`
from (storage, offset, size, stride); storages carry their type (`torch.FloatStorage`,
`torch.cuda.FloatStorage`, ...) and device, which is ignored: everything lands in numpy.

Unpickling calls whatever globals the file names, so `Unpickler.find_class` allows only those a
state dict needs and refuses anything else (e.g. `os.system`) with an error naming it, before it
is called. The result is a dict {key: numpy array}.
"""

from collections.abc import Callable
import collections
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np

# Magic number and protocol version at the start of a legacy file (torch/serialization.py).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# numpy dtype of each storage class (also under torch.cuda for storages saved on a GPU).
STORAGE_DTYPES = {
    'DoubleStorage': np.float64,
    'FloatStorage': np.float32,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that a state dict never needs (it could run code)."""


class TorchFileError(ValueError):
    """A file that is not a readable PyTorch state dict; the message names the file."""


class _StorageType:
    """Stand-in for a torch storage class: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    """torch._utils._rebuild_tensor(_v2): a strided view of a flat storage, copied out."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if 0 not in size and (offset < 0 or last >= storage.size):
        raise TorchFileError(f'tensor of size {size} stride {stride} at offset {offset} reaches '
                             f'past its storage of {storage.size} elements')
    flat = storage[offset:]
    view = np.lib.stride_tricks.as_strided(
        flat, size, tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)  # own, contiguous memory


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks, *unused):
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}
for _name in STORAGE_DTYPES:
    _ALLOWED[('torch', _name)] = _StorageType(_name)
    _ALLOWED[('torch.cuda', _name)] = _StorageType(_name)


class _Unpickler(pickle.Unpickler):
    """Allows only the globals of a state dict; storages come from `load_storage`."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[tuple], np.ndarray]):
        # latin1: byte strings of Python 2 pickles (PyTorch 0.2-0.3 era) decode losslessly.
        super().__init__(file, encoding='latin1')
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f'refusing to load global {module}.{name}: a state dict only needs '
                f'{sorted(f"{m}.{n}" for m, n in _ALLOWED if m != "torch.cuda")}'
            ) from None

    def persistent_load(self, saved_id: Any) -> np.ndarray:
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == 'storage'):
            raise pickle.UnpicklingError(f'unknown persistent id {saved_id!r:.80}')
        return self._load_storage(saved_id)


def _storage_id(saved_id: tuple) -> tuple[_StorageType, str, int, tuple | None]:
    """('storage', type, key, location, numel[, view_metadata]) -> (type, key, numel, view)."""
    if len(saved_id) not in (5, 6) or not isinstance(saved_id[1], _StorageType):
        raise pickle.UnpicklingError(f'unexpected storage reference {saved_id!r:.120}')
    view = saved_id[5] if len(saved_id) == 6 else None
    return saved_id[1], str(saved_id[2]), int(saved_id[4]), view


def _read_legacy(f: BinaryIO) -> dict:
    header = _Unpickler(f, _no_storage)
    if header.load() != LEGACY_MAGIC:
        raise TorchFileError('not a PyTorch file (wrong magic number)')
    protocol = _Unpickler(f, _no_storage).load()
    if protocol != LEGACY_PROTOCOL:
        raise TorchFileError(f'unsupported legacy protocol version {protocol!r}')
    sys_info = _Unpickler(f, _no_storage).load()
    if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
        raise TorchFileError('big-endian files are not supported')

    # Storages are filled in after the object is unpickled: its tensors keep views into them.
    storages: dict[str, np.ndarray] = {}

    def load_storage(saved_id: tuple) -> np.ndarray:
        storage_type, key, numel, view = _storage_id(saved_id)
        if key not in storages:
            storages[key] = np.empty(numel, storage_type.dtype)
        if view is None:
            return storages[key]
        view_key, offset, view_size = view
        return storages[key][int(offset):int(offset) + int(view_size)]

    # Tensors are rebuilt (copied) while unpickling, before the bytes are read, so unpickle
    # into lazy tensors first: record the rebuild calls and replay them once storages are full.
    lazy = _LazyUnpickler(f, load_storage)
    obj = lazy.load()
    keys = _Unpickler(f, _no_storage).load()
    for key in keys:
        count = np.frombuffer(_read_exactly(f, 8), '<i8')[0]
        storage = storages.get(str(key))
        if storage is None:
            raise TorchFileError(f'storage {key!r} is listed but no tensor uses it')
        if count != storage.size:
            raise TorchFileError(f'storage {key!r}: {count} elements on disk, expected '
                                 f'{storage.size}')
        data = _read_exactly(f, storage.size * storage.itemsize)
        storage[...] = np.frombuffer(data, storage.dtype.newbyteorder('<'))
    return _materialize(obj)


class _Lazy:
    """A tensor to rebuild once its storage holds data."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args


class _LazyUnpickler(_Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if found is _rebuild_tensor:
            return lambda *args: _Lazy(_rebuild_tensor, args)
        if found is _rebuild_parameter:
            return lambda *args: _Lazy(_rebuild_parameter, args)
        return found


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _Lazy):
        return obj.fn(*(_materialize(a) for a in obj.args))
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    return obj


def _no_storage(saved_id: tuple) -> np.ndarray:
    raise pickle.UnpicklingError('unexpected storage reference outside the object pickle')


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TorchFileError(f'file ends early (wanted {n} more bytes, got {len(data)})')
    return data


def _read_zip(archive: zipfile.ZipFile) -> dict:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
        raise TorchFileError(f'zip file without exactly one data.pkl (found {pickles})')
    prefix = pickles[0][: -len('data.pkl')]
    byteorder_name = prefix + 'byteorder'
    if byteorder_name in archive.namelist() and archive.read(byteorder_name).strip() != b'little':
        raise TorchFileError('big-endian files are not supported')
    storages: dict[str, np.ndarray] = {}

    def load_storage(saved_id: tuple) -> np.ndarray:
        storage_type, key, numel, _ = _storage_id(saved_id)
        if key not in storages:
            try:
                data = archive.read(f'{prefix}data/{key}')
            except KeyError:
                raise TorchFileError(f'storage {key!r} missing from the archive') from None
            if len(data) != numel * storage_type.dtype.itemsize:
                raise TorchFileError(f'storage {key!r} holds {len(data)} bytes, expected '
                                     f'{numel} x {storage_type.dtype}')
            storages[key] = np.frombuffer(data, storage_type.dtype.newbyteorder('<')).astype(
                storage_type.dtype)
        return storages[key]

    return _Unpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict file (legacy or zip) into {key: numpy array}, torch-free.

    Raises UnsafePickleError naming a global the file asks for that a state dict does not need,
    TorchFileError (naming `path`) for anything else unreadable, FileNotFoundError if missing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file')
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                obj = _read_zip(archive)
        else:
            with open(path, 'rb') as f:
                obj = _read_legacy(f)
    except UnsafePickleError as e:
        raise UnsafePickleError(f'{path}: {e}') from None
    except TorchFileError as e:
        raise TorchFileError(f'{path}: {e}') from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, zipfile.BadZipFile) as e:
        raise TorchFileError(
            f'{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})') from None
    if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        obj = obj['state_dict']  # a training checkpoint that wraps the state dict
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise TorchFileError(f'{path}: holds a {type(obj).__name__}, not a state dict of tensors')
    return dict(obj)
