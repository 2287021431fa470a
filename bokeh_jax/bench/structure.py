"""PyNET's wiring (SPEC "Structure") once, for the peers of other frameworks.

A peer supplies the primitives (`Ops`); `pynet_logits` strings them together exactly as the paper's
graph does. Layers are addressed by their bokeh_jax parameter path, e.g. ('level6', 'd3'), so a
peer reads its weights straight from a bokeh_jax parameter tree.
"""

from typing import Any, Protocol, Sequence

Path = tuple[str, ...]


class Ops(Protocol):
    """The primitives of SPEC "Primitives" in one framework, in its own tensor layout."""

    def space_to_depth(self, x: Any) -> Any: ...

    def max_pool(self, x: Any) -> Any: ...

    def concat(self, xs: Sequence[Any]) -> Any: ...

    def multi_block(self, x: Any, path: Path, kmax: int, instance_norm: bool) -> Any: ...

    def up(self, x: Any, path: Path) -> Any: ...

    def conv3x3(self, x: Any, path: Path) -> Any:
        """3x3 conv to RGB logits with bias, no activation (heads and level 2's logits)."""
        ...


def pynet_logits(ops: Ops, x: Any, level: int) -> dict[int, Any]:
    """Pre-tanh RGB logits of every level from 7 down to `level` (1 = finest)."""
    cat = ops.concat

    def mb(x, group, name, kmax, instance_norm=True):
        return ops.multi_block(x, (group, name), kmax, instance_norm)

    e1 = mb(ops.space_to_depth(x), 'encoder', 'e1', 3, instance_norm=False)
    e2 = mb(ops.max_pool(e1), 'encoder', 'e2', 3)
    e3 = mb(ops.max_pool(e2), 'encoder', 'e3', 3)
    e4 = mb(ops.max_pool(e3), 'encoder', 'e4', 3)
    out = {}

    g = 'level7'
    d1 = mb(ops.max_pool(e4), g, 'd1', 3)
    d2 = mb(d1, g, 'd2', 3) + d1
    d3 = mb(d2, g, 'd3', 3) + d2
    f = mb(d3, g, 'f', 3)
    out[7] = ops.conv3x3(f, (g, 'head'))
    if level == 7:
        return out
    ua, ub = ops.up(f, (g, 'up_a')), ops.up(f, (g, 'up_b'))

    g = 'level6'
    d3 = mb(cat([e4, ua]), g, 'd3', 3)
    d4 = mb(d3, g, 'd4', 3) + d3
    d5 = mb(d4, g, 'd5', 3) + d4
    d6 = cat([mb(d5, g, 'd6', 3), ub])
    f = mb(d6, g, 'f', 3)
    out[6] = ops.conv3x3(f, (g, 'head'))
    if level == 6:
        return out
    ua, ub = ops.up(f, (g, 'up_a')), ops.up(f, (g, 'up_b'))

    g = 'level5'
    a = cat([e3, ua])
    d3 = mb(a, g, 'd3', 5) + a
    d4 = mb(d3, g, 'd4', 5) + d3
    d5 = mb(d4, g, 'd5', 5) + d4
    d7 = cat([mb(d5, g, 'd6', 5), e3, ub])
    f = mb(d7, g, 'f', 3)
    out[5] = ops.conv3x3(f, (g, 'head'))
    if level == 5:
        return out
    ua, ub = ops.up(f, (g, 'up_a')), ops.up(f, (g, 'up_b'))

    g = 'level4'
    d3 = cat([mb(cat([e2, ua]), g, 'd3', 5), e2])
    d4 = mb(d3, g, 'd4', 7) + d3
    d5 = mb(d4, g, 'd5', 7) + d4
    d6 = mb(d5, g, 'd6', 7) + d5
    d7 = cat([mb(d6, g, 'd7', 7), e2])
    d8 = cat([mb(d7, g, 'd8', 5), ub])
    f = mb(d8, g, 'f', 3)
    out[4] = ops.conv3x3(f, (g, 'head'))
    if level == 4:
        return out
    ua, ub = ops.up(f, (g, 'up_a')), ops.up(f, (g, 'up_b'))

    g = 'level3'  # no instance norm anywhere in this level

    def mb3(x, name, kmax):
        return mb(x, g, name, kmax, instance_norm=False)

    d3 = cat([mb3(cat([e1, ua]), 'd3', 5), e1])
    d4 = mb3(d3, 'd4', 7)
    d5 = mb3(d4, 'd5', 9)
    d6 = mb3(d5, 'd6', 9) + d5
    d7 = mb3(d6, 'd7', 9) + d6
    d8 = mb3(d7, 'd8', 9) + d7
    d9 = cat([mb3(d8, 'd9', 7), e1])
    d11 = cat([mb3(d9, 'd10', 5), ub, e1])
    f = mb3(d11, 'f', 3)
    out[3] = ops.conv3x3(f, (g, 'head'))
    if level == 3:
        return out

    # Level 2's logits z2 (not its image) feed level 1 (SPEC "Easy to get wrong" 1).
    z2 = ops.conv3x3(ops.up(f, ('level2', 'up')), ('level2', 'logits'))
    out[2] = z2
    if level == 2:
        return out
    out[1] = ops.conv3x3(ops.up(z2, ('level1', 'up')), ('level1', 'head'))
    return out
