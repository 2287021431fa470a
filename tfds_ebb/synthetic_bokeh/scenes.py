"""Procedural scenes for `synthetic_bokeh`: textured shapes at several depths, with highlights.

A scene is linear radiance (highlights well above 1) plus a disparity map (near = 1). It is
built back to front: a far background (a flat wall, or a wall above a ground plane that comes
closer towards the bottom), small bright highlights on it, objects of varied shapes, textures
and colours at intermediate depths, and a subject in the centre that the camera focuses on.
By default the subject is the nearest thing in the scene, so the focus is at the brightest value
of every depth map and the blur of a pixel follows from its depth alone. With `foreground`,
objects may also stand in front of the subject (off centre) and the ground may come nearer than
it: the depth in focus then varies from scene to scene (after the map's stretch to 0..255), and a
model must find the subject to know it. `choose_focus` picks the focal plane of a pair: the
subject, or (focus 'random') in half the scenes the depth under a random pixel, as a click on the
photo would (background, ground or any object). `render_pair` turns a scene into what the
dataset stores: the sharp photo, the bokeh photo rendered by the thin-lens renderer of
`bokeh_jax.classical`, and the 8-bit half-resolution depth map.

Everything is a pure function of the numpy Generator passed in, so a scene is fixed by its seed.
"""

import dataclasses

import numpy as np

from bokeh_jax import classical
from bokeh_jax import control
from bokeh_jax import image_ops

# Blur disc diameter for |disparity - focus| = 1 as a fraction of the height, at f/2 (other
# f-numbers: control.blur_strength): the renderer's default, so that classical.render_bokeh with
# its defaults is the matching classical baseline of a pair at f/2 focused on the subject.
STRENGTH = classical.DEFAULT_STRENGTH
# Where the camera focuses: always on the subject, or on the subject in half the scenes and on a
# random pixel's depth in the others.
FOCUS_MODES = ('subject', 'random')


@dataclasses.dataclass(frozen=True)
class Scene:
    """radiance: float32 [H, W, 3] linear, >= 0; disparity: float32 [H, W] in [0, 1], near = 1;
    focus: the subject's disparity."""
    radiance: np.ndarray
    disparity: np.ndarray
    focus: float


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random sRGB colour [3] in [0, 1], from hue/saturation/value."""
    hue, sat, val = rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)


def _noise(rng: np.random.Generator, height: int, width: int, cells: float) -> np.ndarray:
    """Smooth value noise [H, W] in about [0, 1] with `cells` features across the height."""
    gh = max(2, int(cells))
    gw = max(2, int(cells * width / height))
    return image_ops.resize(rng.random((gh, gw)).astype(np.float32), (height, width))


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random sRGB texture [H, W, 3] in [0, 1]: noise, stripes, checks or a gradient."""
    a, b = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # two-octave value noise
        t = 0.7 * _noise(rng, height, width, rng.uniform(3, 12))
        t += 0.3 * _noise(rng, height, width, rng.uniform(20, 50))
    elif kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
        t = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 2:  # checkerboard
        period = rng.uniform(4, 20)
        t = ((xx // period + yy // period) % 2).astype(np.float32)
    else:  # linear gradient with fine grain
        angle = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(angle) + yy * np.sin(angle)) / max(height, width) + 0.5
        t += 0.15 * _noise(rng, height, width, 40)
    t = np.clip(t, 0, 1)[..., None]
    return (a * (1 - t) + b * t).astype(np.float32)


def _shape_coverage(rng: np.random.Generator, box: tuple[slice, slice], center, radius: float
                    ) -> np.ndarray:
    """Antialiased coverage in [0, 1] of a random shape (ellipse, polygon or star), on `box`."""
    yy, xx = np.mgrid[box].astype(np.float32)
    cy, cx = center
    angle = rng.uniform(0, 2 * np.pi)
    y = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
    x = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    kind = rng.integers(3)
    if kind == 0:  # ellipse; distance approximated by the scaled radial distance
        ry, rx = radius, radius * rng.uniform(0.6, 1.0)
        sdf = (np.sqrt((y / ry) ** 2 + (x / rx) ** 2) - 1) * min(ry, rx)
    else:  # convex regular polygon, or a star as the union of two triangles
        sides = 3 if kind == 2 else int(rng.integers(4, 9))
        apothem = radius * np.cos(np.pi / sides)

        def polygon(offset):
            normals = offset + 2 * np.pi * np.arange(sides) / sides
            return np.max([x * np.cos(t) + y * np.sin(t) for t in normals], axis=0) - apothem
        sdf = polygon(0.0) if kind == 1 else np.minimum(polygon(0.0), polygon(np.pi / 3))
    return np.clip(0.5 - sdf, 0, 1).astype(np.float32)


def _box(center, radius: float, height: int, width: int) -> tuple[slice, slice]:
    """Pixels within `radius` (+2) of `center`, clipped to the image (may be empty)."""
    cy, cx = center
    r = radius + 2
    return (slice(int(np.clip(cy - r, 0, height)), int(np.clip(cy + r + 1, 0, height))),
            slice(int(np.clip(cx - r, 0, width)), int(np.clip(cx + r + 1, 0, width))))


def _covers(box, coverage: np.ndarray, window) -> float:
    """Smallest coverage of the shape (drawn on `box`) over `window` (0 where off the box)."""
    inside = all(b.start <= w.start and w.stop <= b.stop for b, w in zip(box, window))
    if not inside:
        return 0.0
    return float(coverage[window[0].start - box[0].start:window[0].stop - box[0].start,
                          window[1].start - box[1].start:window[1].stop - box[1].start].min())


def _touches(box, coverage: np.ndarray, window) -> bool:
    """Whether the shape drawn on `box` covers any pixel of `window`."""
    rows = slice(max(box[0].start, window[0].start), min(box[0].stop, window[0].stop))
    cols = slice(max(box[1].start, window[1].start), min(box[1].stop, window[1].stop))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return False
    return bool(coverage[rows.start - box[0].start:rows.stop - box[0].start,
                         cols.start - box[1].start:cols.stop - box[1].start].max() > 0)


# Nearest disparity of the ground without `foreground`: below any subject's (0.5 and up).
GROUND_LIMIT = 0.45


def make_scene(rng: np.random.Generator, height: int, width: int, foreground: bool = False
               ) -> Scene:
    """A random scene of height x width pixels (see the module docstring)."""
    # Background: a wall, or a wall above a ground plane approaching towards the bottom.
    radiance = classical.srgb_to_linear(_texture(rng, height, width))
    wall = rng.uniform(0.0, 0.1)
    disparity = np.full((height, width), wall, np.float32)
    if rng.random() < 0.5:
        horizon = int(rng.uniform(0.4, 0.8) * height)
        ground = np.linspace(0, 1, height - horizon, dtype=np.float32)[:, None]
        disparity[horizon:] = wall + rng.uniform(0.2, 0.5) * ground
        if not foreground:
            np.minimum(disparity[horizon:], GROUND_LIMIT, out=disparity[horizon:])
        radiance[horizon:] = classical.srgb_to_linear(_texture(rng, height - horizon, width))
    radiance *= rng.uniform(0.5, 1.0)  # overall exposure

    # Highlights: small lights far brighter than white, so that they bloom into discs.
    for _ in range(int(rng.integers(4, 30))):
        center = (rng.uniform(0, height), rng.uniform(0, width))
        r = rng.uniform(0.7, 2.5)
        box = _box(center, r, height, width)
        yy, xx = np.mgrid[box]
        spot = np.clip(r + 0.5 - np.hypot(yy - center[0], xx - center[1]), 0, 1)[..., None]
        light = classical.srgb_to_linear(0.6 + 0.4 * _colour(rng)) * rng.uniform(3, 20)
        radiance[box] = radiance[box] * (1 - spot) + light * spot

    # The subject: large, centred, covering the auto-focus window completely.
    size = min(height, width)
    subject_disparity = rng.uniform(0.5, 0.85)
    objects = []  # (disparity, box, coverage on the box)
    window = classical.focus_window(height, width)
    center = (height / 2 + rng.uniform(-0.04, 0.04) * size,
              width / 2 + rng.uniform(-0.04, 0.04) * size)
    radius = rng.uniform(0.28, 0.4) * size
    shape_seed = rng.integers(2**31)
    while True:  # grow until it covers the window (a triangle may not)
        box = _box(center, radius, height, width)
        coverage = _shape_coverage(np.random.default_rng(shape_seed), box, center, radius)
        if _covers(box, coverage, window) >= 1:
            break
        radius *= 1.2
    objects.append((subject_disparity, box, coverage))

    # Other objects: behind the subject; with `foreground` a quarter of them in front, kept out of
    # the focus window.
    for _ in range(int(rng.integers(2, 7))):
        in_front = rng.random() < 0.25 and foreground
        r = rng.uniform(0.06, 0.25) * size
        if in_front:
            d = rng.uniform(subject_disparity + 0.05, 1.0)
            side = rng.choice([-1, 1])
            center = (rng.uniform(0, height), width / 2 + side * rng.uniform(0.35, 0.5) * width)
        else:
            d = rng.uniform(wall + 0.1, subject_disparity - 0.1)
            center = (rng.uniform(0, height), rng.uniform(0, width))
        box = _box(center, r, height, width)
        if box[0].start >= box[0].stop or box[1].start >= box[1].stop:
            continue
        coverage = _shape_coverage(rng, box, center, r)
        if in_front and _touches(box, coverage, window):
            continue  # it would hide the subject where the camera focuses
        objects.append((d, box, coverage))

    for d, box, coverage in sorted(objects, key=lambda o: o[0]):  # painter's order
        h, w = coverage.shape
        lit = classical.srgb_to_linear(_texture(rng, h, w)) * rng.uniform(0.6, 1.1)
        c = coverage[..., None]
        radiance[box] = radiance[box] * (1 - c) + lit * c
        disparity[box] = np.where(coverage > 0.5, np.float32(d), disparity[box])

    lo, hi = float(disparity.min()), float(disparity.max())
    disparity = ((disparity - lo) / (hi - lo)).astype(np.float32)
    return Scene(radiance.astype(np.float32), disparity, classical.auto_focus(disparity))


def choose_focus(rng: np.random.Generator, scene: Scene, mode: str) -> float:
    """The focal disparity of a pair in [0, 1] (scene.disparity's scale), for focus `mode`.

    'subject': scene.focus, drawing nothing from rng. 'random': scene.focus with probability 1/2,
    else control.focus_disparity_at a uniformly drawn pixel (the median around it, like a click).
    """
    if mode not in FOCUS_MODES:
        raise ValueError(f'synthetic_bokeh: focus must be one of {FOCUS_MODES}, got {mode!r}')
    if mode == 'subject' or rng.random() < 0.5:
        return scene.focus
    height, width = scene.disparity.shape
    return control.focus_disparity_at(scene.disparity, rng.uniform(0, height),
                                      rng.uniform(0, width))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def render_pair(scene: Scene, strength: float = STRENGTH, focus: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sharp photo uint8 [H, W, 3], bokeh photo uint8 [H, W, 3], depth uint8 [H/2, W/2, 1].

    strength: blur disc diameter / height per unit of |disparity - focus|; focus: the focal
    disparity (None = scene.focus, the subject)."""
    height, width = scene.disparity.shape
    focus = scene.focus if focus is None else focus
    bokeh = classical.defocus(scene.radiance, scene.disparity, focus, strength * height)
    sharp = classical.linear_to_srgb(np.clip(scene.radiance, 0, 1))
    bokeh = classical.linear_to_srgb(np.clip(bokeh, 0, 1))
    depth = image_ops.normalize_depth(scene.disparity, (height, width))
    return _to_uint8(sharp), _to_uint8(bokeh), depth[..., None]
