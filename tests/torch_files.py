"""Writes PyTorch `.pth` state dicts without PyTorch, in both serializations, for the tests.

  - `write_legacy`: as PyTorch 0.2-0.3 saved the released MegaDepth weights: five pickles and
    raw storages, `torch._utils._rebuild_tensor`, `torch.cuda.FloatStorage` on 'cuda:0'.
  - `write_zip`: as PyTorch >= 1.6 saves: a zip of data.pkl and data/<key>, `_rebuild_tensor_v2`,
    cpu storages (optionally wrapped in `_rebuild_parameter`).
  - `write_malicious`: a file of either layout whose pickle calls os.system.
The pickles name torch's globals through stand-in classes that the Pickler writes as GLOBAL
opcodes, since torch is not importable here.
"""

import collections
import io
import pickle
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage',
                 np.dtype(np.float64): 'DoubleStorage'}


def stand_in(module: str, name: str) -> type:
    """A class the writer pickles as the global `module.name`."""
    return type(name, (), {'__module__': module, 'pickled_as': (module, name)})


class _Storage:
    def __init__(self, key: str, array: np.ndarray, module: str, location: str, view: bool):
        self.key, self.array, self.location, self.view = key, array, location, view
        self.type = stand_in(module, STORAGE_NAMES[array.dtype])


class _Call:
    """An object that unpickles as `function(*args)`."""

    def __init__(self, function: type, args: tuple):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class _Pickler(pickle._Pickler):  # the Python pickler: its save can be overridden
    def save(self, obj, save_persistent_id=True):
        # Stand-ins are caught before the dispatch table (which dill, once imported, patches).
        module_name = getattr(obj, 'pickled_as', None) if isinstance(obj, type) else None
        if module_name is None:
            return super().save(obj, save_persistent_id)
        if id(obj) in self.memo:
            self.write(self.get(self.memo[id(obj)][0]))
            return
        self.write(pickle.GLOBAL + '{}\n{}\n'.format(*module_name).encode('utf-8'))
        self.memoize(obj)

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        saved = ('storage', obj.type, obj.key, obj.location, obj.array.size)
        return saved + (None,) if obj.view else saved


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _tensors(state_dict, *, old_rebuild: bool, module: str, location: str, parameters: bool):
    rebuild = stand_in('torch._utils', '_rebuild_tensor' if old_rebuild else '_rebuild_tensor_v2')
    parameter = stand_in('torch._utils', '_rebuild_parameter')
    storages, out = [], collections.OrderedDict()
    for i, (key, value) in enumerate(state_dict.items()):
        value = np.ascontiguousarray(value)
        storage = _Storage(str(1000 + i) if old_rebuild else str(i), value.reshape(-1), module,
                           location, view=old_rebuild)
        storages.append(storage)
        stride = tuple(s // value.itemsize for s in value.strides)
        args = (storage, 0, value.shape, stride)
        if not old_rebuild:
            args += (False, collections.OrderedDict())
        tensor = _Call(rebuild, args)
        if parameters and value.dtype == np.float32:
            tensor = _Call(parameter, (tensor, True, collections.OrderedDict()))
        out[key] = tensor
    return out, storages


def write_legacy(path, state_dict: dict, *, old_rebuild: bool = True, cuda: bool = True) -> None:
    """The legacy serialization (PyTorch <= 1.5, and what the released weights use)."""
    obj, storages = _tensors(state_dict, old_rebuild=old_rebuild,
                             module='torch.cuda' if cuda else 'torch',
                             location='cuda:0' if cuda else 'cpu', parameters=False)
    with open(path, 'wb') as f:
        f.write(_dumps(LEGACY_MAGIC))
        f.write(_dumps(1001))
        f.write(_dumps({'protocol_version': 1001, 'little_endian': True,
                        'type_sizes': {'short': 2, 'int': 4, 'long': 8}}))
        f.write(_dumps(obj))
        f.write(_dumps([s.key for s in storages]))
        for s in storages:
            f.write(np.int64(s.array.size).tobytes())
            f.write(s.array.astype(s.array.dtype.newbyteorder('<')).tobytes())


def write_zip(path, state_dict: dict, *, parameters: bool = False) -> None:
    """The zip serialization of PyTorch >= 1.6."""
    obj, storages = _tensors(state_dict, old_rebuild=False, module='torch', location='cpu',
                             parameters=parameters)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
        archive.writestr('weights/data.pkl', _dumps(obj))
        archive.writestr('weights/byteorder', b'little')
        archive.writestr('weights/version', b'3\n')
        for s in storages:
            archive.writestr(f'weights/data/{s.key}', s.array.tobytes())


def write_malicious(path, layout: str, command: str) -> None:
    """A .pth whose object pickle runs os.system(command) when unpickled naively."""
    payload = collections.OrderedDict(x=_Call(stand_in('os', 'system'), (command,)))
    if layout == 'zip':
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr('weights/data.pkl', _dumps(payload))
            archive.writestr('weights/byteorder', b'little')
        return
    with open(path, 'wb') as f:
        for header in (LEGACY_MAGIC, 1001, {'little_endian': True}):
            f.write(_dumps(header))
        f.write(_dumps(payload))
        f.write(_dumps([]))
