"""`launch.py --mode=bench`: how fast PyNET runs, against the same network in other frameworks.

One run measures, on whatever backend JAX has (CPU, GPU, TPU):
  - a convolution peak: one large level-3 shaped conv (9x9, 4c -> c channels at H/2 x W/2 for
    base width c), whose best GFLOP/s is the yardstick every other row is a fraction of;
  - the full-resolution forward pass (`config.bench.forward_size`, output twice that size), per
    computation dtype;
  - the train step (value_and_grad of 100 * MAE at level k + Adam over the level's output path,
    jitted, buffers donated) for each level in `train_levels` and batch in `train_batches`, on the
    paper's patch (`patch`);
  - rendering a large photo with `bokeh_jax.render.render_full_resolution`, when that module exists;
  - per level, the time the forward pass spends in that level (`per_level`);
  - optionally (`profile`), every distinct convolution shape of the forward pass with its
    GFLOP/s and total time, slowest first.
Each row gives the median and spread over `repeats` timed calls after `warmup`, images/s, XLA's
FLOP count, achieved GFLOP/s and its fraction of the peak, compile time and peak memory.

Peers (`config.bench.peers`) are the same network in TensorFlow (`tf_peer`) and PyTorch
(`torch_peer`), each imported only when installed. Peer and JAX calls alternate within one loop
so that load from other processes hits both alike; the ratio column is the median over those
adjacent pairs of t_jax / t_peer (< 1: JAX is faster).
"""

import dataclasses
import datetime
import importlib
import importlib.util
import inspect
import json
import os
import platform
import resource
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from bokeh_jax import model as model_lib

PEERS = ('tf', 'torch')
# Leaky ReLU slope of every conv (SPEC "Primitives"), for the per-shape profile.
_SLOPE = 0.2


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Row:
    """One benchmark figure: a function timed on one implementation."""

    name: str  # e.g. 'forward 512x768 float32', 'train L3 b1'
    impl: str  # 'jax', 'tf', 'torch'
    batch: int
    times: list[float]  # seconds per call
    flops: float | None = None  # XLA's count for the JAX program (same function for peers)
    compile_s: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = ''  # 'rss' (host, whole process) or 'device'
    xla_memory_mb: float | None = None  # arguments + outputs + temporaries, from the compiler
    vs: dict[str, float] = dataclasses.field(default_factory=dict)  # peer -> t_jax / t_peer
    note: str = ''

    @property
    def median_s(self) -> float:
        return float(np.median(self.times))

    def to_json(self, peak_gflops: float | None) -> dict:
        t = np.asarray(self.times)
        med = float(np.median(t))
        gflops = self.flops / med / 1e9 if self.flops else None
        return {
            'name': self.name,
            'impl': self.impl,
            'batch': self.batch,
            'median_s': med,
            'min_s': float(t.min()),
            'max_s': float(t.max()),
            # Interquartile range relative to the median: how noisy the figure is.
            'spread': float((np.percentile(t, 75) - np.percentile(t, 25)) / med),
            'repeats': len(t),
            'images_per_s': self.batch / med,
            'gflop': self.flops / 1e9 if self.flops else None,
            'gflop_per_s': gflops,
            'peak_fraction': gflops / peak_gflops if gflops and peak_gflops else None,
            'compile_s': self.compile_s,
            'peak_memory_mb': self.peak_memory_mb,
            'memory_kind': self.memory_kind,
            'xla_memory_mb': self.xla_memory_mb,
            'vs': self.vs,
            'note': self.note,
            'times_s': [float(v) for v in t],
        }


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each fn (which must block until its result is ready).

    Calls alternate between the fns (A B, B A, A B, ...), so that load from other processes and
    clock changes affect all of them alike.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of a[i] / b[i] over calls made next to each other."""
    return float(np.median(np.asarray(a) / np.asarray(b)))


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak


class MemoryProbe:
    """Peak memory of what runs between `start()` and `peak_mb()`.

    On CPU: the process's peak resident set (reset at start where Linux allows, so it holds the
    whole process at its fullest, not only the benchmark's share). On accelerators: the device
    allocator's peak bytes in use, which cannot be reset (the largest benchmark so far wins).
    """

    def __init__(self, device: jax.Device):
        self.device = device
        self.kind = 'rss' if device.platform == 'cpu' else 'device'

    def start(self) -> None:
        if self.kind == 'rss':
            _reset_peak_rss()

    def peak_mb(self) -> float | None:
        if self.kind == 'rss':
            return _peak_rss_mb()
        stats = self.device.memory_stats() or {}
        peak = stats.get('peak_bytes_in_use')
        return peak / 2**20 if peak is not None else None


@dataclasses.dataclass
class Compiled:
    fn: Callable
    compile_s: float
    flops: float | None
    memory_mb: float | None


def compile_jax(jitted: Any, *args: Any, flops_twin: Any = None) -> Compiled:
    """Lowers and compiles a jitted/pmapped function for `args`; reads XLA's cost and memory.

    flops_twin: the same function with XLA's own convolutions (jitted), whose FLOP count is
    reported instead, for programs with custom calls (conv_impl='onednn'), which XLA counts as
    zero FLOPs. It is only lowered, not compiled: its count is that before XLA's optimizations,
    a few % off the compiled program's.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = None
    try:
        cost = (compiled if flops_twin is None else flops_twin.lower(*args)).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost['flops']) if cost and cost.get('flops', -1) > 0 else None
    except Exception:  # noqa: BLE001 - some backends have no cost model; the row says n/a
        pass
    memory_mb = None
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        memory_mb = total / 2**20
    except Exception:  # noqa: BLE001 - likewise
        pass
    return Compiled(compiled, compile_s, flops, memory_mb)


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


# ----------------------------------------------------------------------------- peers


def available_peers(requested: Sequence[str]) -> dict[str, Any]:
    """{name: module} of the requested peers whose framework is installed; others are reported."""
    peers = {}
    for name in requested:
        if name not in PEERS:
            raise ValueError(f'config.bench.peers: unknown peer {name!r}; expected some of {PEERS}')
        framework = {'tf': 'tensorflow', 'torch': 'torch'}[name]
        if importlib.util.find_spec(framework) is None:
            print(f'[bench] peer {name!r} skipped: {framework} is not installed')
            continue
        peers[name] = importlib.import_module(f'bokeh_jax.bench.{name}_peer')
    return peers


class _Peer:
    """Uniform calls into a peer module: build once per dtype, make fns, feed inputs, sync."""

    def __init__(self, name: str, module: Any, params: Any, dtype: str):
        self.name, self.module, self.dtype = name, module, dtype
        if name == 'tf':
            self.impl = module.TFPyNET(params)
        else:
            self.impl = module.TorchPyNET(params, dtype=dtype)

    @staticmethod
    def supports(name: str, dtype: str) -> bool:
        return dtype == 'float32' or name == 'torch'

    def input(self, x: np.ndarray) -> Any:
        if self.name == 'tf':
            return self.module.to_tensor(x)
        return self.impl.to_input(x)

    def sync(self, y: Any) -> None:
        if self.name == 'tf':
            self.module.sync(y)
        else:
            self.impl.sync(y)

    def forward(self, level: int, x: np.ndarray) -> Callable[[], None]:
        fn, xin = self.impl.forward_fn(level), self.input(x)
        return lambda: self.sync(fn(xin))

    def train_step(self, level: int, x: np.ndarray, target: np.ndarray) -> Callable[[], None]:
        fn, xin, tin = self.impl.train_step_fn(level), self.input(x), self.input(target)
        return lambda: self.sync(fn(xin, tin))


# ----------------------------------------------------------------------------- programs


def parse_size(text: str, field: str) -> tuple[int, int]:
    """'512x768' -> (512, 768); both multiples of 32 (the model's input constraint)."""
    try:
        h, w = (int(v) for v in str(text).lower().split('x'))
    except ValueError:
        raise ValueError(f'{field} must look like 512x768, got {text!r}') from None
    if h <= 0 or w <= 0 or h % model_lib.SIZE_MULTIPLE or w % model_lib.SIZE_MULTIPLE:
        raise ValueError(
            f'{field} must be positive multiples of {model_lib.SIZE_MULTIPLE}, got {text!r}'
        )
    return h, w


def forward_program(model: model_lib.PyNET, level: int) -> Callable:
    """jitted (params, x) -> image of `level` (side outputs of coarser levels are dropped)."""
    return jax.jit(lambda p, x: model.apply({'params': p}, x, level=level)[level])


def split_trainable(params: Any, level: int) -> tuple[dict, dict]:
    """(on the path to output `level`, the rest): flat {'a/b/c': leaf} dicts."""
    flat = traverse_util.flatten_dict(params, sep='/')
    on = {k: v for k, v in flat.items() if model_lib.on_output_path(k.split('/'), level)}
    return on, {k: v for k, v in flat.items() if k not in on}


@dataclasses.dataclass
class TrainProgram:
    """A train step in benchmarkable pieces.

    init(params) -> state; pack(state, x, target) -> the arguments of `jitted`; `jitted` is the
    jitted/pmapped step (state donated); unpack(outputs) -> (state, loss).
    """

    init: Callable[[Any], Any]
    pack: Callable[[Any, jax.Array, jax.Array], tuple]
    jitted: Any
    unpack: Callable[[Any], tuple[Any, jax.Array]]
    source: str


def self_contained_train_step(
    model: model_lib.PyNET, level: int, learning_rate: float = 5e-5
) -> TrainProgram:
    """value_and_grad of 100 * MAE at `level` + Adam over the path to output `level`."""
    tx = optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)

    def loss_fn(trainable, frozen, x, target):
        params = traverse_util.unflatten_dict({**trainable, **frozen}, sep='/')
        image = model.apply({'params': params}, x, level=level)[level]
        return 100.0 * jnp.mean(jnp.abs(image - target))

    def init(params):
        trainable, frozen = split_trainable(jax.tree.map(jnp.asarray, params), level)
        return {'trainable': trainable, 'frozen': frozen, 'opt': tx.init(trainable)}

    def step(state, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(state['trainable'], state['frozen'], x, target)
        updates, opt = tx.update(grads, state['opt'], state['trainable'])
        trainable = optax.apply_updates(state['trainable'], updates)
        return {'trainable': trainable, 'frozen': state['frozen'], 'opt': opt}, loss

    return TrainProgram(
        init=init,
        pack=lambda state, x, target: (state, x, target),
        jitted=jax.jit(step, donate_argnums=0),
        unpack=lambda out: out,
        source='self-contained (100*MAE + optax.adam on the path)',
    )


def project_train_step(
    config: ml_collections.ConfigDict, model: model_lib.PyNET, level: int
) -> TrainProgram:
    """The project's own step (`bokeh_jax.train.make_train_step`, 100 * MAE) pmapped on 1 device."""
    from bokeh_jax import train

    tx = train.make_optimizer(config, level)
    per_device = train.make_train_step(model, level, {'mae': 100.0}, tx)
    devices = jax.local_devices()[:1]

    def init(params):
        params = jax.tree.map(jnp.asarray, params)
        state = train.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
        )
        # Placed by pmap itself, so the state carries the sharding the step returns (no recompile).
        stacked = jax.tree.map(lambda a: a[None], state)
        return jax.pmap(lambda a: a, devices=devices)(stacked)

    return TrainProgram(
        init=init,
        pack=lambda state, x, target: (state, {'input': x[None], 'target': target[None]}, None),
        jitted=jax.pmap(per_device, axis_name=train.AXIS, devices=devices, donate_argnums=0),
        unpack=lambda out: (out[0], out[1]['loss']),
        source='bokeh_jax.train.make_train_step (100*MAE)',
    )


def has_project_train_step() -> bool:
    if importlib.util.find_spec('bokeh_jax.train') is None:
        return False
    train = importlib.import_module('bokeh_jax.train')
    return all(hasattr(train, n) for n in ('make_train_step', 'make_optimizer', 'TrainState'))


# ----------------------------------------------------------------------------- the benchmarks


class Bench:
    """Runs the benchmarks of `config.bench` and collects `Row`s."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.cfg = config.bench
        self.device = jax.devices()[0]
        self.memory = MemoryProbe(self.device)
        self.rows: list[Row] = []
        self.per_level: list[dict] = []
        self.profile: list[dict] = []
        self.peak_gflops: float | None = None
        self.input_channels = 3 if config.data.builder_config == 'rgb' else 4
        self.rng = np.random.default_rng(config.seed)
        # What actually runs ('auto' resolved), so the printout and JSON name it.
        self.conv_impl = model_lib.resolve_conv_impl(config.model.conv_impl)
        self.model = model_lib.PyNET(config.model.channels, conv_impl=self.conv_impl)
        print(f'[bench] initializing PyNET(channels={config.model.channels}) parameters; '
              f'convolutions: {self.conv_impl}')
        self.params_np = model_lib.init_params(
            self.model, jax.random.key(config.seed), self.input_channels
        )
        self.params = jax.device_put(self.params_np)
        self.peers = available_peers(tuple(self.cfg.peers))
        self._peer_cache: dict[tuple[str, str], _Peer] = {}

    def _peer(self, name: str, dtype: str) -> _Peer:
        if (name, dtype) not in self._peer_cache:
            self._peer_cache[name, dtype] = _Peer(name, self.peers[name], self.params_np, dtype)
        return self._peer_cache[name, dtype]

    def _xla_twin(self, program: Callable[[model_lib.PyNET], Any], dtype: str = 'float32') -> Any:
        """program(PyNET with XLA's convolutions) when conv_impl is not 'xla' (its FLOP count
        stands in for the custom calls'), else None."""
        if self.conv_impl == 'xla':
            return None
        return program(model_lib.PyNET(self.config.model.channels, dtype=jnp.dtype(dtype)))

    def _input(self, batch: int, h: int, w: int, channels: int) -> np.ndarray:
        return self.rng.random((batch, h, w, channels), dtype=np.float32)

    def _run(
        self,
        name: str,
        batch: int,
        jax_fn: Callable[[], Any],
        compiled: Compiled | None,
        peer_fns: Mapping[str, Callable[[], None]],
        memory_mb: float | None,
    ) -> None:
        cfg = self.cfg
        times = time_interleaved({'jax': jax_fn, **peer_fns}, cfg.repeats, cfg.warmup)
        flops = compiled.flops if compiled else None
        row = Row(
            name,
            'jax',
            batch,
            times['jax'],
            flops=flops,
            compile_s=compiled.compile_s if compiled else None,
            peak_memory_mb=memory_mb,
            memory_kind=self.memory.kind,
            xla_memory_mb=compiled.memory_mb if compiled else None,
        )
        for peer in peer_fns:
            row.vs[peer] = paired_ratio(times['jax'], times[peer])
            self.rows.append(Row(name, peer, batch, times[peer], flops=flops))
        self.rows.insert(len(self.rows) - len(peer_fns), row)
        self._print_row(row)

    def _print_row(self, row: Row) -> None:
        vs = ' '.join(f'{k} x{v:.3f}' for k, v in row.vs.items())
        print(f'[bench] {row.name:<28} jax {row.median_s * 1e3:9.1f} ms  {vs}', flush=True)

    # ---- conv peak ----
    def conv_peak(self) -> None:
        """Best GFLOP/s of the largest level-3 conv: [1, H/2, W/2, 4c] -> c, 9x9, + bias + act.

        Called at the start and the end of a run; the peak is the best call of all, so that a
        burst of load from other processes during one of them does not set the yardstick.
        """
        h, w = parse_size(self.cfg.forward_size, 'config.bench.forward_size')
        c = self.config.model.channels
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.random((1, h // 2, w // 2, 4 * c), dtype=np.float32))
        k = jnp.asarray(rng.standard_normal((9, 9, 4 * c, c), dtype=np.float32) / 30)
        b = jnp.zeros((c,), jnp.float32)
        compiled = compile_jax(jax.jit(_conv_bias_act), x, k, b)
        times = time_interleaved(
            {'jax': lambda: _block(compiled.fn(x, k, b))}, max(5, self.cfg.repeats), 1
        )['jax']
        name = f'conv peak 9x9 {4 * c}->{c}'
        previous = [r for r in self.rows if r.name == name]
        if previous:
            previous[0].times += times
            times = previous[0].times
        else:
            row = Row(name, 'jax', 1, times, flops=compiled.flops, compile_s=compiled.compile_s)
            row.note = 'peak = best call'
            self.rows.append(row)
        self.peak_gflops = compiled.flops / min(times) / 1e9 if compiled.flops else None
        peak = f'{self.peak_gflops:.0f}' if self.peak_gflops else 'n/a'
        print(f'[bench] conv peak: {peak} GFLOP/s', flush=True)

    # ---- full-resolution forward ----
    def forward(self, dtype: str) -> None:
        h, w = parse_size(self.cfg.forward_size, 'config.bench.forward_size')
        model = model_lib.PyNET(
            self.config.model.channels, dtype=jnp.dtype(dtype), conv_impl=self.conv_impl
        )
        x_np = self._input(1, h, w, self.input_channels)
        x = jnp.asarray(x_np)
        twin = self._xla_twin(lambda m: forward_program(m, 1), dtype)
        self.memory.start()
        compiled = compile_jax(forward_program(model, 1), self.params, x, flops_twin=twin)
        _block(compiled.fn(self.params, x))
        memory = self.memory.peak_mb()
        peer_fns = {
            name: self._peer(name, dtype).forward(1, x_np)
            for name in self.peers
            if _Peer.supports(name, dtype)
        }
        self._run(
            f'forward {h}x{w} {dtype}',
            1,
            lambda: _block(compiled.fn(self.params, x)),
            compiled,
            peer_fns,
            memory,
        )

    # ---- per-level breakdown ----
    def levels(self) -> None:
        """Forward pass up to each level; its difference to the next coarser one is that level's.

        All (implementation, level) pairs run in one interleaved loop, and each level's share is
        the median over repeats of the difference of two calls made one after the other.
        """
        h, w = parse_size(self.cfg.forward_size, 'config.bench.forward_size')
        x_np = self._input(1, h, w, self.input_channels)
        x = jnp.asarray(x_np)
        fns, gflop = {}, {}
        for level in model_lib.LEVELS:
            twin = self._xla_twin(lambda m, level=level: forward_program(m, level))
            compiled = compile_jax(
                forward_program(self.model, level), self.params, x, flops_twin=twin
            )
            gflop[level] = (compiled.flops or 0) / 1e9
            fns['jax', level] = lambda c=compiled: _block(c.fn(self.params, x))
            for name in self.peers:
                fns[name, level] = self._peer(name, 'float32').forward(level, x_np)
        times = {k: np.asarray(v) for k, v in
                 time_interleaved(fns, self.cfg.repeats, self.cfg.warmup).items()}
        for level in model_lib.LEVELS:
            entry = {'level': level, 'gflop': gflop[level] - gflop.get(level + 1, 0.0)}
            for name in ('jax', *self.peers):
                t = times[name, level]
                coarser = times.get((name, level + 1), np.zeros_like(t))
                entry[f'{name}_s'] = float(np.median(t - coarser))
                entry[f'{name}_cumulative_s'] = float(np.median(t))
            self.per_level.append(entry)
        print(format_levels(self.per_level, tuple(self.peers)), flush=True)

    # ---- train steps ----
    def train(self, level: int, batch: int) -> None:
        patch = int(self.cfg.patch)
        size = int(patch * model_lib.level_output_scale(level))
        x_np = self._input(batch, patch, patch, self.input_channels)
        t_np = self._input(batch, size, size, 3)
        x, target = jnp.asarray(x_np), jnp.asarray(t_np)
        source = self.cfg.train_step
        if source == 'auto':
            source = 'project' if has_project_train_step() else 'self'

        def make(model):
            if source == 'project':
                return project_train_step(self.config, model, level)
            return self_contained_train_step(model, level)

        program = make(self.model)
        twin = self._xla_twin(lambda m: make(m).jitted)
        self.memory.start()
        state = program.init(self.params_np)
        compiled = compile_jax(program.jitted, *program.pack(state, x, target), flops_twin=twin)
        holder = {'state': state}

        def run_jax():
            out = compiled.fn(*program.pack(holder['state'], x, target))
            holder['state'], loss = program.unpack(out)
            _block(loss)

        run_jax()
        memory = self.memory.peak_mb()
        peer_fns = {
            name: self._peer(name, 'float32').train_step(level, x_np, t_np) for name in self.peers
        }
        self._run(f'train L{level} b{batch} {patch}px', batch, run_jax, compiled, peer_fns, memory)
        self.rows[-1 - len(peer_fns)].note = program.source
        holder.clear()

    # ---- rendering ----
    def render(self) -> None:
        if importlib.util.find_spec('bokeh_jax.render') is None:
            print('[bench] render skipped: bokeh_jax/render.py is not there yet')
            return
        render = importlib.import_module('bokeh_jax.render')
        if not hasattr(render, 'render_full_resolution'):
            print('[bench] render skipped: bokeh_jax.render has no render_full_resolution')
            return
        h, w = parse_size(self.cfg.render_size, 'config.bench.render_size')
        photo = (self._input(1, h, w, 3)[0] * 255).astype(np.uint8)
        depth = (self._input(1, h // 2, w // 2, 1)[0, ..., 0] * 255).astype(np.uint8)
        # The render settings of the config, for those keywords render_full_resolution takes.
        accepted = inspect.signature(render.render_full_resolution).parameters
        kwargs = {k: v for k, v in self.config.render.items() if k in accepted}
        kwargs['conv_impl'] = self.conv_impl
        call = lambda: _block(render.render_full_resolution(self.params, photo, depth, **kwargs))
        self.memory.start()
        start = time.perf_counter()
        call()  # the first call compiles
        first = time.perf_counter() - start
        memory = self.memory.peak_mb()
        times = time_interleaved({'jax': call}, self.cfg.repeats, 0)['jax']
        row = Row(f'render {h}x{w} photo', 'jax', 1, times, compile_s=first - np.median(times),
                  peak_memory_mb=memory, memory_kind=self.memory.kind)
        row.note = 'compile_s = first call - median'
        self.rows.append(row)
        self._print_row(row)

    # ---- per-shape conv profile ----
    def conv_profile(self) -> None:
        h, w = parse_size(self.cfg.forward_size, 'config.bench.forward_size')
        # XLA's convolutions, whatever conv_impl is: custom calls hide the shapes from the jaxpr.
        xla_model = model_lib.PyNET(self.config.model.channels)
        shapes = conv_shapes(xla_model, self.params, (1, h, w, self.input_channels))
        tf_conv = None
        if 'tf' in self.peers:
            tf_conv = self.peers['tf'].conv_fn()
        for entry in shapes:
            lhs = jnp.asarray(self.rng.random(entry['lhs'], dtype=np.float32))
            rhs = jnp.asarray(self.rng.standard_normal(entry['rhs'], dtype=np.float32) * 0.01)
            bias = jnp.zeros((entry['out'][-1],), jnp.float32)
            fn = _conv_from_params(entry['params'])
            compiled = compile_jax(jax.jit(fn), lhs, rhs, bias)
            fns = {'jax': lambda c=compiled: _block(c.fn(lhs, rhs, bias))}
            if tf_conv is not None and entry['plain']:
                args = [self.peers['tf'].to_tensor(a) for a in (lhs, rhs, bias)]
                fns['tf'] = lambda a=args: self.peers['tf'].sync(tf_conv(*a))
            times = time_interleaved(fns, max(3, self.cfg.repeats), 1)
            entry['gflop'] = (compiled.flops or 0) / 1e9
            for name, t in times.items():
                entry[f'{name}_s'] = float(np.median(t))
                entry[f'{name}_total_s'] = entry[f'{name}_s'] * entry['count']
                entry[f'{name}_gflop_per_s'] = entry['gflop'] / entry[f'{name}_s']
            del entry['params']
        shapes.sort(key=lambda e: -e['jax_total_s'])
        self.profile = shapes
        print(format_profile(shapes, int(self.cfg.profile_top)), flush=True)


def _conv_bias_act(x: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    ) + b
    return jnp.maximum(_SLOPE * y, y)


def _conv_from_params(params: dict) -> Callable:
    """conv (exactly as the model's jaxpr has it) + bias + leaky ReLU."""

    def fn(x, k, b):
        y = jax.lax.conv_general_dilated_p.bind(x, k, **params) + b
        return jnp.maximum(_SLOPE * y, y)

    return fn


def _sub_jaxprs(params: dict) -> list:
    subs = []
    for value in params.values():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                subs.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                subs.append(v)
    return subs


def conv_shapes(model: model_lib.PyNET, params: Any, input_shape: Sequence[int]) -> list[dict]:
    """Distinct convolutions of the full forward pass: shapes, parameters, how often each runs."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x, level=1))(params, x)
    found: dict[tuple, dict] = {}

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == 'conv_general_dilated':
                lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars)
                key = (lhs, rhs, tuple(sorted((k, str(v)) for k, v in eqn.params.items())))
                if key not in found:
                    p = eqn.params
                    transposed = tuple(p['lhs_dilation']) != (1, 1)
                    plain = (
                        not transposed
                        and tuple(p['window_strides']) == (1, 1)
                        and tuple(p['rhs_dilation']) == (1, 1)
                        and p['feature_group_count'] == 1
                    )
                    found[key] = {
                        'lhs': lhs,
                        'rhs': rhs,
                        'out': tuple(eqn.outvars[0].aval.shape),
                        'transposed': transposed,
                        'plain': plain,
                        'params': dict(p),
                        'count': 0,
                    }
                found[key]['count'] += 1
            for sub in _sub_jaxprs(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return list(found.values())


# ----------------------------------------------------------------------------- reporting


def _fmt(value: Any, spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def format_table(rows: Sequence[dict], peers: Sequence[str]) -> str:
    """The main results as a markdown table (pasteable into the README)."""
    vs_cols = [f'JAX/{p}' for p in peers]
    head = ['benchmark', 'impl', 'median ms', 'spread', 'img/s', 'GFLOP', 'GFLOP/s', '% peak',
            'compile s', 'peak MB', *vs_cols]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [
            r['name'],
            r['impl'],
            _fmt(r['median_s'] * 1e3, '.1f'),
            _fmt(r['spread'] * 100, '.0f') + '%',
            _fmt(r['images_per_s'], '.3g'),
            _fmt(r['gflop'], '.1f'),
            _fmt(r['gflop_per_s'], '.0f'),
            _fmt(r['peak_fraction'] and r['peak_fraction'] * 100, '.0f'),
            _fmt(r['compile_s'], '.1f'),
            _fmt(r['peak_memory_mb'], '.0f') + (f" {r['memory_kind']}" if r['memory_kind'] else ''),
            *[_fmt(r['vs'].get(p), '.3f') for p in peers],
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_levels(entries: Sequence[dict], peers: Sequence[str]) -> str:
    """Per-level share of the forward pass, coarsest level first, as a markdown table."""
    head = ['level', 'GFLOP', 'JAX ms', 'JAX GFLOP/s']
    for p in peers:
        head += [f'{p} ms', f'{p} GFLOP/s', f'JAX - {p} ms']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for e in entries:
        rate = lambda s: e['gflop'] / s if s > 0 else None  # noqa: E731
        cells = [str(e['level']), f"{e['gflop']:.1f}", f"{e['jax_s'] * 1e3:.1f}",
                 _fmt(rate(e['jax_s']), '.0f')]
        for p in peers:
            cells += [f"{e[f'{p}_s'] * 1e3:.1f}", _fmt(rate(e[f'{p}_s']), '.0f'),
                      f"{(e['jax_s'] - e[f'{p}_s']) * 1e3:+.1f}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_profile(entries: Sequence[dict], top: int) -> str:
    """The convolution shapes taking the most total time, as a markdown table."""
    has_tf = any('tf_s' in e for e in entries)
    head = ['input', 'kernel', 'kind', 'count', 'GFLOP each', 'JAX GFLOP/s', 'JAX total ms']
    if has_tf:
        head += ['TF GFLOP/s', 'TF total ms']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for e in entries[:top]:
        cells = ['x'.join(map(str, e['lhs'])), 'x'.join(map(str, e['rhs'])),
                 'transposed' if e['transposed'] else 'conv', str(e['count']),
                 f"{e['gflop']:.2f}", f"{e['jax_gflop_per_s']:.0f}",
                 f"{e['jax_total_s'] * 1e3:.1f}"]
        if has_tf:
            cells += ([f"{e['tf_gflop_per_s']:.0f}", f"{e['tf_total_s'] * 1e3:.1f}"]
                      if 'tf_s' in e else ['-', '-'])
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def environment(peers: Mapping[str, Any]) -> dict:
    """What produced the figures: date, machine, device, versions, flags."""
    import flax

    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'cpu': cpu,
        'cpu_count': os.cpu_count(),
        'backend': jax.default_backend(),
        'device': device.device_kind,
        'device_count': jax.device_count(),
        'versions': {
            'python': platform.python_version(),
            'jax': jax.__version__,
            'jaxlib': importlib.import_module('jaxlib').__version__,
            'flax': flax.__version__,
            'optax': optax.__version__,
            **{name: module.version() for name, module in peers.items()},
        },
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
    }


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Rejects a bench config that cannot run, naming the field."""
    parse_size(cfg.forward_size, 'config.bench.forward_size')
    parse_size(cfg.render_size, 'config.bench.render_size')
    for dtype in cfg.forward_dtypes:
        if dtype not in ('float32', 'bfloat16'):
            raise ValueError(
                f"config.bench.forward_dtypes: expected 'float32' and/or 'bfloat16', got {dtype!r}"
            )
    for level in cfg.train_levels:
        if level not in model_lib.LEVELS:
            raise ValueError(
                f'config.bench.train_levels: {level!r} is not a level {model_lib.LEVELS}'
            )
    for batch in cfg.train_batches:
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f'config.bench.train_batches: {batch!r} is not a positive integer')
    patch = cfg.patch
    if not isinstance(patch, int) or patch <= 0 or patch % model_lib.SIZE_MULTIPLE:
        raise ValueError(
            f'config.bench.patch must be a positive multiple of {model_lib.SIZE_MULTIPLE}, '
            f'got {patch!r}'
        )
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ValueError(
            f'config.bench.repeats must be >= 1 and warmup >= 0, got {cfg.repeats}, {cfg.warmup}'
        )
    for name in cfg.peers:
        if name not in PEERS:
            raise ValueError(f'config.bench.peers: unknown peer {name!r}; expected some of {PEERS}')
    if cfg.train_step not in ('auto', 'project', 'self'):
        raise ValueError(
            f"config.bench.train_step must be 'auto', 'project' or 'self', got {cfg.train_step!r}"
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every benchmark `config.bench` asks for; prints tables, writes WORKDIR/<output>."""
    cfg = config.bench
    validate(cfg)
    load_before = os.getloadavg()
    bench = Bench(config)
    env = environment(bench.peers)
    print(f"[bench] {env['backend']} ({env['device']}, {env['cpu']}), load {load_before}, "
          f"conv_impl {bench.conv_impl}", flush=True)
    bench.conv_peak()
    for dtype in cfg.forward_dtypes:
        bench.forward(dtype)
    for level in cfg.train_levels:
        for batch in cfg.train_batches:
            bench.train(level, batch)
    if cfg.render:
        bench.render()
    if cfg.per_level:
        bench.levels()
    if cfg.profile:
        bench.conv_profile()
    bench.conv_peak()  # again: the peak is the best call of both
    env['load_average'] = {'before': load_before, 'after': os.getloadavg()}
    rows = [row.to_json(bench.peak_gflops) for row in bench.rows]
    results = {
        'environment': env,
        'config': json.loads(cfg.to_json()),
        'channels': config.model.channels,
        'conv_impl': bench.conv_impl,
        'conv_peak_gflop_per_s': bench.peak_gflops,
        'rows': rows,
        'per_level': bench.per_level,
        'conv_profile': bench.profile,
    }
    table = format_table(rows, tuple(bench.peers))
    print('\n' + table, flush=True)
    print(f"[bench] conv_impl {bench.conv_impl}; load average before {load_before}, after "
          f"{env['load_average']['after']}")
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, cfg.output)
        with open(path, 'w') as f:
            json.dump(results, f, indent=1)
        print(f'[bench] wrote {path}')
    return results
