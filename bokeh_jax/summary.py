"""`--mode=summary`: parameter counts per group and per output path, and forward FLOPs."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import model as model_lib


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def path_param_count(shapes: Any, level: int) -> int:
    """Parameters on the path to output `level` (what the paper trains at that level)."""
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    return sum(
        int(np.prod(leaf.shape))
        for path, leaf in leaves
        if model_lib.on_output_path([k.key for k in path], level)
    )


def xla_flops(program: Any) -> float | None:
    """XLA's cost-analysis FLOP count of a lowered or compiled program; None where there is none.

    Custom calls (conv_impl='onednn') count as zero: count a twin with XLA's convolutions.
    """
    try:
        cost = program.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have no cost model
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get('flops', -1)
    return float(flops) if flops > 0 else None


def forward_flops(model: model_lib.PyNET, input_shape: tuple[int, ...], level: int) -> float:
    """XLA's cost-analysis FLOPs of one forward pass up to `level` (compiled, weights abstract)."""
    shapes = model_lib.param_shapes(model.channels, input_shape[-1])
    fn = jax.jit(lambda p, x: model.apply({'params': p}, x, level=level))
    flops = xla_flops(fn.lower(shapes, jax.ShapeDtypeStruct(input_shape, jnp.float32)).compile())
    return float('nan') if flops is None else flops


def summarize(
    channels: int, input_channels: int, height: int, width: int, flops: bool = True
) -> str:
    """A text table: parameters per group, per output path, and forward GFLOPs per level."""
    model = model_lib.PyNET(channels)
    shapes = model_lib.param_shapes(channels, input_channels)
    lines = [
        f'PyNET(channels={channels}), input 1 x {height} x {width} x {input_channels}',
        '',
        f'{"group":<10}{"params":>14}{"tensors":>9}',
    ]
    for group, tree in shapes.items():
        lines.append(f'{group:<10}{_count(tree):>14,}{len(jax.tree.leaves(tree)):>9}')
    lines.append(f'{"total":<10}{_count(shapes):>14,}{len(jax.tree.leaves(shapes)):>9}')
    lines += [
        '',
        f'{"output":<8}{"size":>12}{"path params":>14}' + (f'{"GFLOP":>10}' if flops else ''),
    ]
    for level in model_lib.LEVELS:
        s = model_lib.level_output_scale(level)
        size = f'{int(height * s)}x{int(width * s)}'
        row = f'level {level:<2}{size:>12}{path_param_count(shapes, level):>14,}'
        if flops:
            row += f'{forward_flops(model, (1, height, width, input_channels), level) / 1e9:>10.1f}'
        lines.append(row)
    return '\n'.join(lines)
