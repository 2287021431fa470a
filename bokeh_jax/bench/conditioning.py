"""What conditioning (model.condition) adds to the forward pass: a program that prints figures.

  python -m bokeh_jax.bench.conditioning --channels=32 --size=512x768 --repeats=3

Times the level-1 forward of the unconditioned PyNET and of each condition_method (random
parameters, condition 'aperture_focus': both control maps) in one process, calls alternating
(timing.time_interleaved), and prints each method's time and its ratio to the unconditioned
model's (median of adjacent calls' ratios), and the ratios of XLA's counts of floating-point
operations and bytes accessed, which no other process's load disturbs (with conv_impl 'xla':
oneDNN's custom calls are not counted). `control` is the `:control` model (method 'input' with
residual heads), `control+gain` the same with model.residual_gain. The #22 goal is at most 1.03.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import conditioning, control
from bokeh_jax import model as model_lib
from bokeh_jax.bench import timing

_CHANNELS = flags.DEFINE_integer('channels', 32, 'base width (32: the paper)')
_SIZE = flags.DEFINE_string('size', '512x768', 'model input HxW (the output is twice that)')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed calls per model')
_CONDITION = flags.DEFINE_enum('condition', 'aperture_focus', control.CONDITIONS[1:],
                               'condition of the conditioned models')
_CONV_IMPL = flags.DEFINE_string('conv_impl', 'xla', 'PyNET.conv_impl')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'PyNET.dtype')


def main(argv):
    del argv
    h, w = (int(v) for v in _SIZE.value.split('x'))
    rng = np.random.default_rng(0)
    photo = rng.random((1, h, w, 4), np.float32)
    x = control.append_condition(photo, _CONDITION.value, 2.8, 0.5)
    calls, costs = {}, {}
    # name: (condition_method, PyNET.residual); 'none' is the paper's model.
    variants = {'none': (None, False), **{m: (m, False) for m in conditioning.METHODS},
                'control': ('input', True), 'control+gain': ('input', 'aperture')}
    for method, (condition_method, residual) in variants.items():
        condition = 'none' if method == 'none' else _CONDITION.value
        model = model_lib.PyNET(_CHANNELS.value, dtype=jnp.dtype(_DTYPE.value),
                                conv_impl=_CONV_IMPL.value, condition=condition,
                                condition_method=condition_method or 'input', residual=residual)
        params = jax.device_put(model_lib.init_params(model, jax.random.key(0), 4, scheme='he'))
        forward = jax.jit(lambda p, x, model=model: model.apply({'params': p}, x, level=1)[1])
        inputs = jax.device_put(photo if method == 'none' else x)
        cost = forward.lower(params, inputs).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        costs[method] = (cost.get('flops', np.nan), cost.get('bytes accessed', np.nan))
        forward(params, inputs).block_until_ready()  # compile
        calls[method] = lambda f=forward, p=params, x=inputs: f(p, x).block_until_ready()
    times = timing.time_interleaved(calls, _REPEATS.value, warmup=1)
    print(f'level-1 forward, PyNET(channels={_CHANNELS.value}), input {h}x{w}, '
          f'{_DTYPE.value}, conv_impl={_CONV_IMPL.value}, condition={_CONDITION.value}, '
          f'{jax.devices()[0].device_kind}; load average {timing.load_average()[0]:.1f}')
    for method, seconds in times.items():
        ratio = timing.paired_ratio(seconds, times['none'])
        flops, moved = (a / b for a, b in zip(costs[method], costs['none']))
        print(f'  {method:12s} median {np.median(seconds):7.3f} s  vs none {ratio:.3f}  '
              f'({", ".join(f"{t:.3f}" for t in seconds)}); XLA flops x{flops:.4f}, '
              f'bytes accessed x{moved:.4f}')


if __name__ == '__main__':
    app.run(main)
