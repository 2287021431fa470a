"""The benchmark's peers: PyNET in TensorFlow (`tf_peer`) and PyTorch (`torch_peer`), driven alike.

A peer runs *programs*: 'forward' (x -> image of a level), 'train' (x, target -> loss, one Adam
step), 'conv' (x, k, b -> one conv + bias + leaky ReLU; TF only). `InProcessPeer` imports the
framework into this process. `OutOfProcessPeer` (what the bench uses) runs an `InProcessPeer` in a
worker process of its own (`peer_worker`), so that the peer's thread pools, allocator and
framework cannot slow JAX down or be slowed by it: weights and inputs travel once, as .npz files
in a temporary folder; each timed call is one command over a pipe, timed inside the worker.
"""

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

PEERS = ('tf', 'torch')
FRAMEWORKS = {'tf': 'tensorflow', 'torch': 'torch'}
KINDS = ('forward', 'train', 'conv')


def installed(requested: tuple[str, ...]) -> tuple[str, ...]:
    """The requested peers whose framework is installed (found, not imported); others are named."""
    found = []
    for name in requested:
        if name not in PEERS:
            raise ValueError(f'config.bench.peers: unknown peer {name!r}; expected some of {PEERS}')
        if importlib.util.find_spec(FRAMEWORKS[name]) is None:
            print(f'[bench] peer {name!r} skipped: {FRAMEWORKS[name]} is not installed')
            continue
        found.append(name)
    return tuple(found)


def supports(name: str, dtype: str) -> bool:
    """Whether peer `name` runs the forward pass in `dtype` (TF: float32 only)."""
    return dtype == 'float32' or name == 'torch'


def flatten(params: Any) -> dict[str, np.ndarray]:
    """A parameter tree as {'a/b/c': float32 array} (what travels to a worker)."""
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep='/')
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


class InProcessPeer:
    """A peer module in this process: prepares programs by key, runs them, returns outputs."""

    def __init__(self, name: str, params: Any, dtype: str = 'float32'):
        if name not in PEERS:
            raise ValueError(f'unknown peer {name!r}; expected one of {PEERS}')
        self.name, self.dtype = name, dtype
        self.module = importlib.import_module(f'bokeh_jax.bench.{name}_peer')
        if name == 'tf':
            self.impl = self.module.TFPyNET(params)
        else:
            self.impl = self.module.TorchPyNET(params, dtype=dtype)
        self._programs: dict[str, tuple[Callable, tuple]] = {}

    def version(self) -> str:
        return self.module.version()

    def _input(self, x: np.ndarray) -> Any:
        return self.module.to_tensor(x) if self.name == 'tf' else self.impl.to_input(x)

    def prepare(self, key: str, kind: str, level: int, inputs: dict[str, np.ndarray]) -> None:
        """Builds program `kind` at `level`; inputs {'x'}, {'x', 'target'} or {'x', 'k', 'b'}."""
        if kind == 'forward':
            fn, args = self.impl.forward_fn(level), (self._input(inputs['x']),)
        elif kind == 'train':
            fn = self.impl.train_step_fn(level)
            args = (self._input(inputs['x']), self._input(inputs['target']))
        elif kind == 'conv' and self.name == 'tf':
            fn = self.module.conv_fn()
            args = tuple(self.module.to_tensor(inputs[n]) for n in ('x', 'k', 'b'))
        else:
            raise ValueError(f'peer {self.name!r} has no program {kind!r}; expected one of {KINDS}')
        self._programs[key] = (fn, args)

    def call(self, key: str) -> Any:
        """Runs program `key` once and waits for its result."""
        fn, args = self._programs[key]
        result = fn(*args)
        if self.name == 'tf':
            self.module.sync(result)
        else:
            self.impl.sync(result)
        return result

    def timed(self, key: str) -> Callable[[], None]:
        def run() -> None:
            self.call(key)

        return run

    def output(self, key: str) -> np.ndarray:
        """One call's result as numpy: NHWC image (forward, conv) or the loss (train)."""
        result = self.call(key)
        if self.name == 'torch':
            result = result.detach().float().cpu()
            return result.permute(0, 2, 3, 1).numpy() if result.ndim == 4 else result.numpy()
        return np.asarray(result)

    def breakdown(self, key: str) -> tuple[dict[str, float], float, dict[str, float]]:
        """({part: seconds}, wall seconds, {ops running at once: seconds}) of one call of
        program `key` (TF's profiler)."""
        from bokeh_jax.bench import breakdown

        if self.name != 'tf':
            raise ValueError(f'the per-part breakdown reads TF traces; peer {self.name!r} has none')
        return breakdown.tf_parts(lambda: self.call(key))

    def close(self) -> None:
        self._programs.clear()


class OutOfProcessPeer:
    """The calls of `InProcessPeer`, answered by a worker process (bokeh_jax.bench.peer_worker).

    Timed calls return the seconds measured inside the worker (the call and its wait for the
    result), not the pipe's round trip.
    """

    def __init__(self, name: str, params: Any, dtype: str = 'float32'):
        self.name, self.dtype = name, dtype
        self._dir = tempfile.mkdtemp(prefix=f'bench_{name}_')
        weights = os.path.join(self._dir, 'params.npz')
        np.savez(weights, **flatten(params))
        self._process = subprocess.Popen(
            [sys.executable, '-m', 'bokeh_jax.bench.peer_worker', name, dtype, weights],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._count = 0

    def _ask(self, **command: Any) -> dict:
        if self._process.poll() is not None:
            raise RuntimeError(f'peer worker {self.name!r} exited ({self._process.returncode})')
        self._process.stdin.write(json.dumps(command) + '\n')
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f'peer worker {self.name!r} died during {command["op"]!r} '
                               f'(exit {self._process.wait()}); its stderr is above')
        reply = json.loads(line)
        if 'error' in reply:
            raise RuntimeError(f'peer worker {self.name!r}: {reply["error"]}')
        return reply

    def version(self) -> str:
        return self._ask(op='version')['version']

    def prepare(self, key: str, kind: str, level: int, inputs: dict[str, np.ndarray]) -> None:
        self._count += 1
        path = os.path.join(self._dir, f'inputs{self._count}.npz')
        np.savez(path, **{k: np.asarray(v, np.float32) for k, v in inputs.items()})
        self._ask(op='prepare', key=key, kind=kind, level=level, inputs=path)
        os.remove(path)  # the worker holds them now

    def timed(self, key: str) -> Callable[[], float]:
        return lambda: float(self._ask(op='time', key=key)['seconds'])

    def output(self, key: str) -> np.ndarray:
        path = os.path.join(self._dir, 'output.npy')
        self._ask(op='output', key=key, path=path)
        out = np.load(path)
        os.remove(path)
        return out

    def breakdown(self, key: str) -> tuple[dict[str, float], float, dict[str, float]]:
        """As InProcessPeer.breakdown, measured in the worker."""
        reply = self._ask(op='breakdown', key=key)
        return reply['parts'], reply['wall_s'], reply['running']

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._ask(op='quit')
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


def make_peer(name: str, params: Any, dtype: str, out_of_process: bool = True) -> Any:
    """An OutOfProcessPeer (default) or InProcessPeer of `name` on `params`."""
    return (OutOfProcessPeer if out_of_process else InProcessPeer)(name, params, dtype)
