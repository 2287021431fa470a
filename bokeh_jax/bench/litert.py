"""LiteRT against JAX on this CPU: the level-1 forward of the exported .tflite files (XNNPACK)
beside JAX's jitted forward (conv_impl 'xla' and 'onednn'), calls alternating, plus file sizes.

  python -m bokeh_jax.bench.litert [--workdir=RUN] [--size=512x768] [--threads=2] [--repeats=5]

Without --workdir the parameters are random (He init; the speed does not depend on the values)
at --channels (32, the paper). Exports into --output (a temporary folder by default) with
export.export, which also reports each file's PSNR against JAX. A program, not a test: heavy
(~minutes, several GB); run it alone.
"""

import datetime
import json
import os
import tempfile

from absl import app, flags
import jax
import numpy as np

from bokeh_jax import checkpoint, export
from bokeh_jax import model as model_lib
from bokeh_jax.bench import harness

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run whose params/level_1 to export; random if unset.')
_CHANNELS = flags.DEFINE_integer('channels', 32, 'Base width of random parameters.')
_SIZE = flags.DEFINE_string('size', '512x768', 'Model input HxW (half the photo).')
_FORMATS = flags.DEFINE_string('formats', 'tflite,tflite_fp16,tflite_int8', 'TFLite variants.')
_JAX_IMPLS = flags.DEFINE_list('jax_impls', ['xla', 'onednn'], 'conv_impl values of JAX rows.')
_THREADS = flags.DEFINE_integer('threads', 2, 'LiteRT interpreter threads (XNNPACK).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls of each (after one warm-up).')
_OUTPUT = flags.DEFINE_string('output', None, 'Export folder (replaced); a temporary one if unset.')
_REUSE = flags.DEFINE_bool('reuse', False, 'Time the files already in --output (its export.json).')
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')


def main(argv) -> None:
    del argv
    h, w = harness.parse_size(_SIZE.value, 'size')
    if _WORKDIR.value:
        params, meta = checkpoint.load_params(_WORKDIR.value, 1)
    else:
        meta = {'channels': _CHANNELS.value, 'input_channels': 4, 'source': 'random (he)'}
        params = model_lib.init_params(model_lib.PyNET(_CHANNELS.value), jax.random.key(0), 4,
                                       scheme='he')
    output = _OUTPUT.value or os.path.join(tempfile.mkdtemp(), 'export')
    start = datetime.datetime.now()
    if _REUSE.value and _OUTPUT.value:
        with open(os.path.join(output, export.MANIFEST)) as f:
            manifest = json.load(f)
    else:
        manifest = export.export(params, meta, output, formats=_FORMATS.value, size=(h, w),
                                 overwrite=True)
    export_s = (datetime.datetime.now() - start).total_seconds()
    x = export.check_input(int(meta['input_channels']), (h, w))

    fns = {}
    for impl in _JAX_IMPLS.value:
        net = model_lib.PyNET(int(meta['channels']), conv_impl=impl)
        forward = jax.jit(lambda p, x, net=net: net.apply({'params': p}, x, level=1)[1])
        device_params = jax.device_put(params)
        fns[f'jax_{impl}'] = lambda f=forward, p=device_params: f(p, x).block_until_ready()
    for name in manifest['formats']:
        interpreter = export.tflite_interpreter(os.path.join(output, export.FILES[name]),
                                                num_threads=_THREADS.value)
        fns[name] = lambda i=interpreter: export.run_tflite(i, x)
    load_before = open('/proc/loadavg').read().split()[:3]
    times = harness.time_interleaved(fns, _REPEATS.value, warmup=1)
    load_after = open('/proc/loadavg').read().split()[:3]

    base = 'jax_xla' if 'jax_xla' in times else next(iter(times))
    rows = []
    print(f'\nLevel-1 forward, model input 1x{h}x{w}x{meta["input_channels"]}, width '
          f'{meta["channels"]}, LiteRT {_THREADS.value} threads; {jax.devices()[0].device_kind}')
    print(f'{"what":14s} {"median s":>9s} {"min s":>7s} {"vs " + base:>11s} {"MiB":>7s} '
          f'{"dB vs JAX":>9s}')
    for name, t in times.items():
        entry = manifest['formats'].get(name, {})
        row = {'name': name, 'median_s': float(np.median(t)), 'min_s': float(np.min(t)),
               'ratio': harness.paired_ratio(t, times[base]),
               'mib': entry.get('bytes', 0) / 2**20, 'psnr_db': entry.get('psnr_vs_jax_db'),
               'times_s': [float(v) for v in t]}
        rows.append(row)
        psnr = '' if row['psnr_db'] is None else f'{row["psnr_db"]:.1f}'
        mib = f'{row["mib"]:.1f}' if row['mib'] else ''
        print(f'{name:14s} {row["median_s"]:9.3f} {row["min_s"]:7.3f} {row["ratio"]:10.2f}x '
              f'{mib:>7s} {psnr:>9s}')
    print(f'export took {export_s:.0f} s; load average {" ".join(load_before)} before, '
          f'{" ".join(load_after)} after; {start:%Y-%m-%d %H:%M}')
    if _JSON.value:
        with open(_JSON.value, 'w') as f:
            json.dump({'date': f'{start:%Y-%m-%d %H:%M}', 'size': [h, w], 'meta': meta,
                       'threads': _THREADS.value, 'loadavg': [load_before, load_after],
                       'export_s': export_s, 'rows': rows}, f, indent=2, default=str)


if __name__ == '__main__':
    app.run(main)
