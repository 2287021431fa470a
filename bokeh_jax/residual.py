"""The residual image heads of PyNET.residual (config.model.residual, a deviation from the paper).

The paper's level k outputs image_head(z) = tanh(z)*0.58 + 0.5 of its logits z. A residual model
outputs the model input's RGB resized to the level's size (its *base*) plus tanh(z)*0.58, so that
zero logits reproduce the input and the network learns only the change. Its parameters are those
of the paper's model.

RESIDUALS lists PyNET.residual's values: False (the paper), True (the residual heads) and
'aperture' (config.model.residual_gain, conditioned models only): the change is also scaled by
the aperture s = 2/N of the control maps (control.aperture_scale), a gain on the residual branch
as in EBokehNet. A blur disc is proportional to s, and so, for small discs, is what blurring
changes; the heads then learn a change per unit of aperture, and near f/16 (s = 1/8) their
errors shrink with the change they make (docs/control.md: without the gain the trained heads lost
2 dB to the zero change at f/16).
"""

from typing import Any

import jax
import jax.numpy as jnp

RESIDUALS = (False, True, 'aperture')


def check_residual(residual: Any, condition: str) -> None:
    """Raises ValueError unless `residual` is one of RESIDUALS and fits `condition`."""
    if not (isinstance(residual, bool) or residual == 'aperture'):
        raise ValueError(f'PyNET.residual must be one of {RESIDUALS}; got {residual!r}')
    if residual == 'aperture' and condition == 'none':
        raise ValueError("residual 'aperture' (model.residual_gain) scales the change by the "
                         "aperture: it needs a conditioned model (model.condition 'aperture' or "
                         "'aperture_focus')")


def from_config(model: Any) -> Any:
    """PyNET.residual for config.model (residual, residual_gain, condition), checked; the value
    that checkpoints' meta records as `residual`."""
    if model.residual_gain and not model.residual:
        raise ValueError('config.model.residual_gain=True needs config.model.residual=True (it '
                         'scales the residual heads\' change by the aperture)')
    residual = 'aperture' if model.residual_gain else bool(model.residual)
    try:
        check_residual(residual, model.condition)
    except ValueError as e:
        raise ValueError(f'config.model.residual_gain: {e}') from None
    return residual


def image_head(z: jax.Array) -> jax.Array:
    """Maps logits to an image: tanh(z)*0.58 + 0.5, range about -0.08..1.08 (unclipped)."""
    return jnp.tanh(z) * 0.58 + 0.5


def residual_head(z: jax.Array, base: jax.Array | None, gain: jax.Array | None = None
                  ) -> jax.Array:
    """A level's float32 image from its logits: `image_head(z)`, or with `base` (the model
    input's RGB at the level's size) base + gain * tanh(z)*0.58, the image head less its 0.5: zero
    logits give the input back. gain: None (1), or float32 [N, 1, 1, 1] (residual 'aperture': s)."""
    if base is None:
        return image_head(z).astype(jnp.float32)
    change = (jnp.tanh(z) * 0.58).astype(jnp.float32)
    return base + (change if gain is None else gain * change)


def aperture_gain(residual: Any, maps: jax.Array | None) -> jax.Array | None:
    """The gain `residual_head` applies: s [N, 1, 1, 1] from channel 0 of the control maps (s at
    every pixel, space-to-depth'ed or not) for residual 'aperture', else None."""
    if residual != 'aperture':
        return None
    return maps[:, :1, :1, :1].astype(jnp.float32)


def area_downscale(x: jax.Array, factor: int) -> jax.Array:
    """[N, H, W, C] -> [N, H/factor, W/factor, C]: the mean of each factor x factor block (the
    antialiased resize by an integer factor)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upscale2x(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, 2H, 2W, C], bicubic (Keys, a = -0.5), level 1's residual base.

    Bicubic rather than linear: the model input is the photo downscaled x0.5 with an antialiased
    bicubic (image_ops.make_model_input), and a bicubic upscale of it is the sharper estimate of
    the photo that level 1 reproduces where nothing is blurred (against the photos of
    tests/data/photos, 0.8-0.9 dB closer than a linear upscale). Each output reads inputs within
    two pixels, far inside the tiles' halo (render.py).
    """
    n, h, w, c = x.shape
    return jax.image.resize(x, (n, 2 * h, 2 * w, c), 'cubic')


def residual_base(rgb: jax.Array, level: int) -> jax.Array:
    """The base image of `level` from the model input's RGB [N, H, W, 3]: the RGB resized to the
    level's output size (model.level_output_scale), by area averaging for levels 3..7 and
    `upscale2x` for level 1."""
    if level == 1:
        return upscale2x(rgb)
    return rgb if level == 2 else area_downscale(rgb, 2 ** (level - 2))
