"""The benchmarks of `config.bench`, each a method of `Bench` that times JAX against the peers.

Every method builds its JAX program (`programs`), the same program in each peer (`peers`, in worker
processes by default), times them alternating (`timing`) and appends `timing.Row`s.
"""

import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bokeh_jax import image_ops
from bokeh_jax import model as model_lib
from bokeh_jax import render as render_lib
from bokeh_jax.bench import peers as peers_lib
from bokeh_jax.bench import programs, report
from bokeh_jax.bench.timing import MemoryProbe, Row, block, compile_jax, paired_ratio
from bokeh_jax.bench.timing import time_interleaved


def size(cfg: ml_collections.ConfigDict, field: str) -> tuple[int, int]:
    """config.bench.<field> ('512x768') as (H, W), multiples of the model's SIZE_MULTIPLE."""
    return image_ops.parse_size(cfg[field], f'config.bench.{field}', model_lib.SIZE_MULTIPLE)


class Bench:
    """Runs the benchmarks of `config.bench` and collects `Row`s; `close()` ends the peers."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.cfg = config.bench
        self.device = jax.devices()[0]
        self.memory = MemoryProbe(self.device)
        self.rows: list[Row] = []
        self.per_level: list[dict] = []
        self.profile: list[dict] = []
        self.breakdown: list[dict] = []
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
        self.peer_names = peers_lib.installed(tuple(self.cfg.peers))
        self._peers: dict[tuple[str, str], Any] = {}
        self._keys = 0

    def peer(self, name: str, dtype: str = 'float32') -> Any:
        if (name, dtype) not in self._peers:
            self._peers[name, dtype] = peers_lib.make_peer(
                name, self.params_np, dtype, out_of_process=self.cfg.peer_process
            )
        return self._peers[name, dtype]

    def versions(self) -> dict[str, str]:
        return {name: self.peer(name).version() for name in self.peer_names}

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()

    def peer_program(self, name: str, kind: str, level: int, dtype: str = 'float32',
                     **inputs: np.ndarray) -> Callable[[], Any]:
        """Prepares program `kind` in peer `name`; returns its timed call."""
        self._keys += 1
        key = f'{kind}{self._keys}'
        peer = self.peer(name, dtype)
        peer.prepare(key, kind, level, inputs)
        return peer.timed(key)

    def xla_twin(self, program: Callable[[model_lib.PyNET], Any], dtype: str = 'float32') -> Any:
        """program(PyNET with XLA's convolutions) when conv_impl is not 'xla' (its FLOP count
        stands in for the custom calls'), else None."""
        if self.conv_impl == 'xla':
            return None
        return program(model_lib.PyNET(self.config.model.channels, dtype=jnp.dtype(dtype)))

    def input(self, batch: int, h: int, w: int, channels: int) -> np.ndarray:
        return self.rng.random((batch, h, w, channels), dtype=np.float32)

    def _run(
        self,
        name: str,
        batch: int,
        jax_fn: Callable[[], Any],
        compiled: Any,
        peer_fns: Mapping[str, Callable[[], Any]],
        memory_mb: float | None,
    ) -> Row:
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
        self.rows.append(row)
        for peer in peer_fns:
            row.vs[peer] = paired_ratio(times['jax'], times[peer])
            self.rows.append(Row(name, peer, batch, times[peer], flops=flops))
        print(report.format_row(row, self.rows[-len(peer_fns):] if peer_fns else []), flush=True)
        return row

    # ---- conv peak ----
    def conv_peak(self) -> None:
        """Best GFLOP/s of the largest level-3 conv: [1, H/2, W/2, 4c] -> c, 9x9, + bias + act.

        Called at the start and the end of a run; the peak is the best call of all, so that a
        burst of load from other processes during one of them does not set the yardstick.
        """
        h, w = size(self.cfg, 'forward_size')
        c = self.config.model.channels
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.random((1, h // 2, w // 2, 4 * c), dtype=np.float32))
        k = jnp.asarray(rng.standard_normal((9, 9, 4 * c, c), dtype=np.float32) / 30)
        b = jnp.zeros((c,), jnp.float32)
        compiled = compile_jax(jax.jit(programs.conv_bias_act), x, k, b)
        times = time_interleaved(
            {'jax': lambda: block(compiled.fn(x, k, b))}, max(5, self.cfg.repeats), 1
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
        """The full forward pass in computation `dtype` (bfloat16 on CPU with oneDNN: bf16 convs
        with float32 sums, `model.compute_plan`) against the peers' float32 one."""
        h, w = size(self.cfg, 'forward_size')
        model = model_lib.PyNET(
            self.config.model.channels, dtype=jnp.dtype(dtype), conv_impl=self.conv_impl
        )
        x_np = self.input(1, h, w, self.input_channels)
        x = jnp.asarray(x_np)
        twin = self.xla_twin(lambda m: programs.forward_program(m, 1), dtype)
        self.memory.start()
        compiled = compile_jax(programs.forward_program(model, 1), self.params, x, flops_twin=twin)
        block(compiled.fn(self.params, x))
        memory = self.memory.peak_mb()
        # A peer without this dtype runs float32: the bar JAX's bfloat16 is held to.
        peer_fns = {
            name: self.peer_program(name, 'forward', 1, dtype if peers_lib.supports(name, dtype)
                                    else 'float32', x=x_np)
            for name in self.peer_names
        }
        row = self._run(f'forward {h}x{w} {dtype}', 1, lambda: block(compiled.fn(self.params, x)),
                        compiled, peer_fns, memory)
        row.note = ', '.join(f'{n} {dtype if peers_lib.supports(n, dtype) else "float32"}'
                             for n in peer_fns)

    # ---- per-level breakdown ----
    def levels(self) -> None:
        """Forward pass up to each level; its difference to the next coarser one is that level's.

        All (implementation, level) pairs run in one interleaved loop, and each level's share is
        the median over repeats of the difference of two calls made one after the other.
        """
        h, w = size(self.cfg, 'forward_size')
        x_np = self.input(1, h, w, self.input_channels)
        x = jnp.asarray(x_np)
        fns, gflop = {}, {}
        for level in model_lib.LEVELS:
            twin = self.xla_twin(lambda m, level=level: programs.forward_program(m, level))
            compiled = compile_jax(
                programs.forward_program(self.model, level), self.params, x, flops_twin=twin
            )
            gflop[level] = (compiled.flops or 0) / 1e9
            fns['jax', level] = lambda c=compiled: block(c.fn(self.params, x))
            for name in self.peer_names:
                fns[name, level] = self.peer_program(name, 'forward', level, x=x_np)
        times = {k: np.asarray(v) for k, v in
                 time_interleaved(fns, self.cfg.repeats, self.cfg.warmup).items()}
        for level in model_lib.LEVELS:
            entry = {'level': level, 'gflop': gflop[level] - gflop.get(level + 1, 0.0)}
            for name in ('jax', *self.peer_names):
                t = times[name, level]
                coarser = times.get((name, level + 1), np.zeros_like(t))
                entry[f'{name}_s'] = float(np.median(t - coarser))
                entry[f'{name}_cumulative_s'] = float(np.median(t))
            self.per_level.append(entry)
        print(report.format_levels(self.per_level, self.peer_names), flush=True)

    # ---- train steps ----
    def train_inputs(self, level: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        patch = int(self.cfg.patch)
        out = int(patch * model_lib.level_output_scale(level))
        return (self.input(batch, patch, patch, self.input_channels),
                self.input(batch, out, out, 3))

    def train(self, level: int, batch: int) -> None:
        x_np, t_np = self.train_inputs(level, batch)
        x, target = jnp.asarray(x_np), jnp.asarray(t_np)
        program = programs.train_program(self.config, self.model, level)
        twin = self.xla_twin(lambda m: programs.train_program(self.config, m, level).jitted)
        self.memory.start()
        state = program.init(self.params_np)
        compiled = compile_jax(program.jitted, *program.pack(state, x, target), flops_twin=twin)
        holder = {'state': state}

        def run_jax():
            out = compiled.fn(*program.pack(holder['state'], x, target))
            holder['state'], loss = program.unpack(out)
            block(loss)

        run_jax()
        memory = self.memory.peak_mb()
        peer_fns = {name: self.peer_program(name, 'train', level, x=x_np, target=t_np)
                    for name in self.peer_names}
        row = self._run(f'train L{level} b{batch} {self.cfg.patch}px', batch, run_jax, compiled,
                        peer_fns, memory)
        row.note = program.source
        holder.clear()

    # ---- rendering ----
    def render(self) -> None:
        h, w = size(self.cfg, 'render_size')
        photo = (self.input(1, h, w, 3)[0] * 255).astype(np.uint8)
        depth = (self.input(1, h // 2, w // 2, 1)[0, ..., 0] * 255).astype(np.uint8)
        kwargs = {k: self.config.render[k] for k in ('max_tile', 'pad_mode', 'depth_far_is_bright')}
        dtype = self.config.model.dtype  # bfloat16: see model.compute_plan

        def call():
            block(render_lib.render_full_resolution(
                self.params, photo, depth, dtype=dtype, conv_impl=self.conv_impl, **kwargs))

        self.memory.start()
        start = time.perf_counter()
        call()  # the first call compiles
        first = time.perf_counter() - start
        memory = self.memory.peak_mb()
        times = time_interleaved({'jax': call}, self.cfg.repeats, 0)['jax']
        row = Row(f'render {h}x{w} photo {dtype}', 'jax', 1, times,
                  compile_s=first - float(np.median(times)), peak_memory_mb=memory,
                  memory_kind=self.memory.kind)
        row.note = 'compile_s = first call - median'
        self.rows.append(row)
        print(report.format_row(row, []), flush=True)

    # ---- per-shape conv profile ----
    def conv_profile(self) -> None:
        h, w = size(self.cfg, 'forward_size')
        # XLA's convolutions, whatever conv_impl is: custom calls hide the shapes from the jaxpr.
        xla_model = model_lib.PyNET(self.config.model.channels)
        shapes = programs.conv_shapes(xla_model, self.params, (1, h, w, self.input_channels))
        for entry in shapes:
            lhs = self.rng.random(entry['lhs'], dtype=np.float32)
            rhs = self.rng.standard_normal(entry['rhs'], dtype=np.float32) * 0.01
            bias = np.zeros((entry['out'][-1],), np.float32)
            args = [jnp.asarray(a) for a in (lhs, rhs, bias)]
            compiled = compile_jax(jax.jit(programs.conv_from_params(entry['params'])), *args)
            fns = {'jax': lambda c=compiled, a=args: block(c.fn(*a))}
            if 'tf' in self.peer_names and entry['plain']:
                fns['tf'] = self.peer_program('tf', 'conv', 1, x=lhs, k=rhs, b=bias)
            times = time_interleaved(fns, max(3, self.cfg.repeats), 1)
            entry['gflop'] = (compiled.flops or 0) / 1e9
            for name, t in times.items():
                entry[f'{name}_s'] = float(np.median(t))
                entry[f'{name}_total_s'] = entry[f'{name}_s'] * entry['count']
                entry[f'{name}_gflop_per_s'] = entry['gflop'] / entry[f'{name}_s']
            del entry['params']
        shapes.sort(key=lambda e: -e['jax_total_s'])
        self.profile = shapes
        print(report.format_profile(shapes, int(self.cfg.profile_top)), flush=True)
