"""What the benchmark times, in JAX: the forward pass, the project's train step, convolutions.

The train step is `bokeh_jax.train`'s own (`make_train_step`, 100 * MAE, the project's Adam),
pmapped on one device as training runs it; rendering is `bokeh_jax.render.render_full_resolution`.
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections

from bokeh_jax import model as model_lib
from bokeh_jax import train
from bokeh_jax.training import optimizer as optimizer_lib

# Leaky ReLU slope of every conv (SPEC "Primitives"), for the per-shape profile.
SLOPE = 0.2


def forward_program(model: model_lib.PyNET, level: int) -> Callable:
    """jitted (params, x) -> image of `level` (side outputs of coarser levels are dropped)."""
    return jax.jit(lambda p, x: model.apply({'params': p}, x, level=level)[level])


@dataclasses.dataclass
class TrainProgram:
    """A train step in benchmarkable pieces.

    init(params) -> state; pack(state, x, target) -> the arguments of `jitted`; `jitted` is the
    pmapped step (state donated); unpack(outputs) -> (state, loss).
    """

    init: Callable[[Any], Any]
    pack: Callable[[Any, jax.Array, jax.Array], tuple]
    jitted: Any
    unpack: Callable[[Any], tuple[Any, jax.Array]]
    source: str


def train_program(
    config: ml_collections.ConfigDict, model: model_lib.PyNET, level: int
) -> TrainProgram:
    """The project's step (`train.make_train_step`, loss 100 * MAE, `optimizer.make_optimizer`)."""
    tx = optimizer_lib.make_optimizer(config, level)
    per_device = train.make_train_step(model, level, {'mae': 100.0}, tx)
    devices = jax.local_devices()[:1]

    def init(params):
        params = jax.tree.map(jnp.asarray, params)
        state = train.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
        )
        # Placed by pmap itself, so the state carries the sharding the step returns (no recompile).
        stacked = jax.tree.map(lambda a: a[None], state)
        return jax.pmap(lambda a: a, axis_name=train.AXIS, devices=devices)(stacked)

    return TrainProgram(
        init=init,
        pack=lambda state, x, target: (state, {'input': x[None], 'target': target[None]}, None),
        jitted=jax.pmap(per_device, axis_name=train.AXIS, devices=devices, donate_argnums=0),
        unpack=lambda out: (out[0], out[1]['loss']),
        source='bokeh_jax.train.make_train_step (100*MAE)',
    )


def conv_bias_act(x: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    """'SAME' conv NHWC x HWIO + bias + leaky ReLU (the conv peak's program)."""
    y = jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    ) + b
    return jnp.maximum(SLOPE * y, y)


def conv_from_params(params: dict) -> Callable:
    """conv (exactly as the model's jaxpr has it) + bias + leaky ReLU."""

    def fn(x, k, b):
        y = jax.lax.conv_general_dilated_p.bind(x, k, **params) + b
        return jnp.maximum(SLOPE * y, y)

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
