"""Where a train step's time goes: one step of JAX and of the TF peer split into the same parts.

Method: each framework's own profiler traces one warm train step (jax.profiler, and TF's
profiler in the peer's worker process); both write an XSpace (.xplane.pb), read here with
`jax.profiler.ProfileData`. Every op event (an XLA thunk, named after its HLO instruction; a TF
kernel, named 'op_name:OpType') is put into one of `PARTS`:
  - JAX: by the instruction's opcode, custom-call target (oneDNN's convolution directions) and the
    JAX name stack in its metadata (module path such as '.../level3/d4/k5a/norm/...', and
    'transpose(jvp(...))' for the backward pass). A fusion counts as the op at its root, so for
    example a bias add fused into an activation counts as activation.
  - TF: by op type (Conv2D, Conv2DBackpropInput / Filter, ResourceApplyAdam, ...) and the name
    scopes `tf_peer` puts around each part ('norm', 'act', 'up', 'concat', 'loss'). Grappler fuses
    bias add and activation into the forward convolution (_FusedConv2D), which then counts as conv.
Both sum op durations over all threads: ops running at the same time on different threads both
count, so the total can exceed the step's wall time, which is shown beside it. How much of the
step ran one op and how much two or more at once (`RUNNING`) says how well each framework keeps
the cores busy: an op may itself use several threads (oneDNN's convolutions in JAX do), so one op
running is not one core idle, but time with no op running is.
"""

import glob
import re
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

PARTS = (
    'conv forward',
    'conv input gradient',
    'conv kernel gradient',
    'conv backward (XLA convs)',
    'upsampling (transposed convs)',
    'instance norm',
    'bias + activation',
    'concatenation',
    'loss',
    'optimizer update',
    'rest',
)
# Time of the traced step with no op, one op, and two or more ops running at once.
RUNNING = ('no op running', 'one op running', 'two or more ops running')
_ONEDNN = {
    'DnnlConvForward': 'conv forward',
    'DnnlConvForwardBf16': 'conv forward',
    'DnnlConvBackwardData': 'conv input gradient',
    'DnnlConvBackwardWeights': 'conv kernel gradient',
}


# ----------------------------------------------------------------------------- traces


def _op_events(directory: str, skip_lines: tuple[str, ...] = ('python',)):
    """(name, start ns, seconds) of every event on the host CPU plane of the trace written to
    `directory`."""
    path = glob.glob(f'{directory}/**/*.xplane.pb', recursive=True)
    if not path:
        raise RuntimeError(f'no .xplane.pb trace in {directory}')
    for plane in ProfileData.from_file(path[0]).planes:
        if plane.name != '/host:CPU':
            continue
        for line in plane.lines:
            if line.name in skip_lines:
                continue
            for event in line.events:
                yield event.name, event.start_ns, event.duration_ns * 1e-9


def _add(parts: dict[str, float], part: str, seconds: float) -> None:
    parts[part] = parts.get(part, 0.0) + seconds


def running(spans: list[tuple[float, float]]) -> dict[str, float]:
    """{`RUNNING` entry: seconds} over the (start ns, seconds) spans of the counted ops, from the
    first op's start to the last op's end."""
    edges = sorted([(start, 1) for start, _ in spans]
                   + [(start + seconds * 1e9, -1) for start, seconds in spans])
    found = dict.fromkeys(RUNNING, 0.0)
    count, last = 0, edges[0][0] if edges else 0.0
    for time_ns, change in edges:
        found[RUNNING[min(count, 2)]] += (time_ns - last) * 1e-9
        count, last = count + change, time_ns
    return found


# ----------------------------------------------------------------------------- JAX


_INSTRUCTION = re.compile(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([\w\-]+)\(')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """{instruction name: (opcode, op_name metadata, custom-call target)} of HLO module text."""
    found = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        found[m.group(1)] = (m.group(2), op_name.group(1) if op_name else '',
                             target.group(1) if target else '')
    return found


def jax_part(opcode: str, op_name: str, target: str) -> str:
    """The part (`PARTS`) of one HLO instruction of a PyNET train step."""
    if target in _ONEDNN:
        return _ONEDNN[target]
    in_model = 'PyNET' in op_name
    backward = 'transpose(' in op_name
    last = op_name.rsplit('/', 1)[-1]
    if in_model and re.search(r'/up(_a|_b)?/', op_name):
        return 'upsampling (transposed convs)'
    if opcode == 'convolution' or last.startswith('conv_general_dilated'):
        return 'conv backward (XLA convs)' if backward else 'conv forward'
    if in_model and '/norm/' in op_name:
        return 'instance norm'
    if opcode == 'concatenate' or last == 'concatenate':
        return 'concatenation'
    if in_model and re.search(r'/k\d+[ab]/', op_name):
        return 'bias + activation'
    if not in_model and ('jvp(' in op_name or backward):
        return 'loss'
    if not in_model and op_name and 'jvp(' not in op_name:
        return 'optimizer update'
    return 'rest'


def jax_parts(hlo_text: str, call: Callable[[], Any]
              ) -> tuple[dict[str, float], float, dict[str, float]]:
    """({part: op seconds}, wall seconds, `running`) of one `call` of the compiled program
    `hlo_text`."""
    instructions = hlo_instructions(hlo_text)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
        parts: dict[str, float] = {}
        spans = []
        for name, start, seconds in _op_events(directory):
            if name in instructions:
                _add(parts, jax_part(*instructions[name]), seconds)
                spans.append((start, seconds))
    return parts, wall, running(spans)


# ----------------------------------------------------------------------------- TF


_TF_OP = re.compile(r'([^:]+):([\w]+)')


def tf_part(name: str, op_type: str) -> str:
    """The part (`PARTS`) of one TF kernel of the TF peer's train step."""
    scope = lambda s: re.search(rf'(^|/){s}(_\d+)?/', name)  # noqa: E731
    if op_type == 'ResourceApplyAdam' or scope('adam'):
        return 'optimizer update'
    if scope('up'):
        return 'upsampling (transposed convs)'
    if 'Conv2DBackpropFilter' in op_type:
        return 'conv kernel gradient'
    if 'Conv2DBackpropInput' in op_type:
        return 'conv input gradient'
    if 'Conv2D' in op_type:
        return 'conv forward'
    if scope('norm'):
        return 'instance norm'
    if scope('act') or op_type == 'BiasAddGrad' or op_type.startswith('BiasAdd'):
        return 'bias + activation'
    if scope('concat') or op_type == 'ConcatV2':
        return 'concatenation'
    if scope('loss'):
        return 'loss'
    return 'rest'


def tf_parts(call: Callable[[], Any]) -> tuple[dict[str, float], float, dict[str, float]]:
    """({part: op seconds}, wall seconds, `running`) of one `call` (a TF program, warm)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as directory:
        tf.profiler.experimental.start(directory)
        try:
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
        finally:
            tf.profiler.experimental.stop()
        parts: dict[str, float] = {}
        spans = []
        for name, start, seconds in _op_events(directory):
            m = _TF_OP.fullmatch(name)
            if m and '::' not in name:
                _add(parts, tf_part(m.group(1), m.group(2)), seconds)
                spans.append((start, seconds))
    return parts, wall, running(spans)


# ----------------------------------------------------------------------------- the benchmark


def run(bench: Any) -> None:
    """Breaks one train step (batch 1, `config.bench.patch`) per train level into `PARTS`, for
    JAX and the TF peer (when installed); appends to `bench.breakdown` and prints one table."""
    from bokeh_jax.bench import programs, report

    for level in bench.cfg.train_levels:
        name = f'train L{level} b1'
        x_np, t_np = bench.train_inputs(level, 1)
        x, target = jnp.asarray(x_np), jnp.asarray(t_np)
        program = programs.train_program(bench.config, bench.model, level)
        holder = {'state': program.init(bench.params_np)}
        compiled = program.jitted.lower(*program.pack(holder['state'], x, target)).compile()

        def call():
            out = compiled(*program.pack(holder['state'], x, target))
            holder['state'], loss = program.unpack(out)
            jax.block_until_ready(loss)

        call()  # warm
        parts, wall, busy = jax_parts(compiled.as_text(), call)
        bench.breakdown.append({'name': name, 'impl': 'jax', 'parts': parts, 'wall_s': wall,
                                'running': busy})
        holder.clear()
        if 'tf' in bench.peer_names:
            peer = bench.peer('tf')
            key = f'breakdown{level}'
            peer.prepare(key, 'train', level, {'x': x_np, 'target': t_np})
            peer.timed(key)()  # warm: TF traces its function on the first call
            parts, wall, busy = peer.breakdown(key)
            bench.breakdown.append({'name': name, 'impl': 'tf', 'parts': parts, 'wall_s': wall,
                                    'running': busy})
    print('[bench] train step by part (op time summed over threads, one call each):', flush=True)
    print(report.format_breakdown(bench.breakdown), flush=True)
