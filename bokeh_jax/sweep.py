"""The control sweep: does the blur follow the f-number, and does the focal plane stay sharp?

  python -m bokeh_jax.sweep --workdir=RUN --photos=PHOTO_OR_FOLDER [--depths=MAP_OR_FOLDER]
      [--renderer=model|classical] [--fnumbers=2,2.8,4,5.6,8,11,16] [--max_side=N]

Renders each photo at every f-number (default control.FULL_STOPS, f/2 to f/16) with a conditioned
model (WORKDIR's level-1 parameters, model.condition != 'none') or with the classical thin-lens
renderer at blur strength control.blur_strength(--strength, N) (the reference: the renderer the
synthetic pairs come from), and prints per photo a table of a blur measure - the mean gradient
magnitude of the luminance, which falls as blur grows - in two regions of the defocus map
|disparity - focus|:

- out of focus: the third of the pixels farthest from the focal plane;
- in focus: the tenth nearest to it;

with the photo's own measures in both regions and each render's ratio to them. A row `x0.5 x2`
shows the photo brought to PyNET's input resolution and back: the sharpness a model that only
upsamples what it sees would keep (PyNET reads the photo at half size). It ends with two
verdicts: the out-of-focus blur is monotone in N (the measure never falls as N grows), and the
in-focus measure stays within 10% of the photo's at every f-number.

Without --depths each photo gets a ramp (--ramp: disparity rising from the top to the bottom, a
ground plane, or from left to right). Focus: --focus=X,Y (a pixel of every photo) or, by default,
`classical.auto_focus`, the disparity at the centre. It is a program that prints figures; the
test only checks that it runs and what the classical reference gives.
"""

from collections.abc import Callable, Sequence
import dataclasses
import os
import sys

from absl import app, flags
import numpy as np

from bokeh_jax import checkpoint
from bokeh_jax import classical
from bokeh_jax import control
from bokeh_jax import image_io
from bokeh_jax import image_ops
from bokeh_jax import render
from bokeh_jax import workdir as workdir_lib
from bokeh_jax.errors import UserError

# The out-of-focus region: pixels whose |disparity - focus| is in the top third.
OUT_OF_FOCUS_QUANTILE = 2 / 3
# The in-focus region: pixels whose |disparity - focus| is in the bottom tenth.
IN_FOCUS_QUANTILE = 0.1
# How far the in-focus measure may drift from the photo's (the "stays sharp").
IN_FOCUS_TOLERANCE = 0.10
# Monotone up to this fraction of the photo's measure: renders whose blur is below a pixel differ
# from each other only by rounding (8-bit, sRGB round trips).
MONOTONE_TOLERANCE = 0.002
PHOTO_EXTENSIONS = ('.jpg', '.jpeg', '.png')
RAMPS = ('vertical', 'horizontal')

# A renderer: (photo uint8 [H, W, 3], depth uint8 [H // 2, W // 2] near = bright, f-number,
# focal disparity) -> float32 [H, W, 3] in [0, 1].
Renderer = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Measures.
# ----------------------------------------------------------------------------------------------


def ramp_disparity(height: int, width: int, direction: str) -> np.ndarray:
    """float32 [height, width]: disparity rising 0 -> 1 from the top to the bottom ('vertical')
    or from left to right ('horizontal')."""
    if direction not in RAMPS:
        raise UserError(f'--ramp must be one of {RAMPS}; got {direction!r}')
    if direction == 'vertical':
        return np.repeat(np.linspace(0, 1, height, dtype=np.float32)[:, None], width, axis=1)
    return np.repeat(np.linspace(0, 1, width, dtype=np.float32)[None, :], height, axis=0)


def regions(disparity: np.ndarray, focus: float) -> tuple[np.ndarray, np.ndarray]:
    """(in-focus mask, out-of-focus mask), bool [H, W], from the defocus |disparity - focus|."""
    defocus = np.abs(disparity - np.float32(focus))
    near_limit, far_limit = np.quantile(defocus, [IN_FOCUS_QUANTILE, OUT_OF_FOCUS_QUANTILE])
    in_focus, out_of_focus = defocus <= near_limit, defocus >= far_limit
    if not in_focus.any() or not out_of_focus.any() or far_limit <= near_limit:
        raise UserError('the depth map is flat around the focus: no out-of-focus region to measure')
    return in_focus, out_of_focus


def sharpness(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude of the luminance (per pixel, image in [0, 1]) over `mask`."""
    luma = np.asarray(image, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    rows, cols = np.gradient(luma)
    return float(np.sqrt(rows**2 + cols**2)[mask].mean())


@dataclasses.dataclass
class Sweep:
    """One photo's sweep: the photo's measures and each f-number's, in both regions."""

    name: str
    size: tuple[int, int]  # (H, W)
    depth: str  # where the disparity came from
    focus: float  # focal disparity
    input_out: float
    input_in: float
    # The photo through PyNET's resolution (x0.5, as the model sees it, then x2): what an output
    # that only upsamples its input would measure. Informative; the verdicts use the photo.
    resampled_out: float = 0.0
    resampled_in: float = 0.0
    fnumbers: list[float] = dataclasses.field(default_factory=list)
    out_of_focus: list[float] = dataclasses.field(default_factory=list)
    in_focus: list[float] = dataclasses.field(default_factory=list)

    def monotone(self) -> bool:
        """Blur grows as N falls: the out-of-focus measure never falls as N grows (by more than
        MONOTONE_TOLERANCE of the photo's)."""
        order = np.argsort(self.fnumbers)
        measures = np.asarray(self.out_of_focus)[order]
        return bool(np.all(np.diff(measures) >= -MONOTONE_TOLERANCE * self.input_out))

    def worst_in_focus(self) -> tuple[float, float]:
        """(f-number, ratio to the photo) of the in-focus measure farthest from 1."""
        ratios = np.asarray(self.in_focus) / self.input_in
        worst = int(np.argmax(np.abs(ratios - 1)))
        return self.fnumbers[worst], float(ratios[worst])

    def table(self) -> str:
        lines = [f'{self.name} ({self.size[1]}x{self.size[0]}, depth: {self.depth}, focal '
                 f'disparity {self.focus:.3f})',
                 f'  {"":8s} {"out of focus":>13s} {"/ input":>8s} {"in focus":>10s} {"/ input":>8s}',
                 f'  {"input":8s} {self.input_out:13.4f} {1:8.3f} {self.input_in:10.4f} {1:8.3f}',
                 f'  {"x0.5 x2":8s} {self.resampled_out:13.4f} '
                 f'{self.resampled_out / self.input_out:8.3f} {self.resampled_in:10.4f} '
                 f'{self.resampled_in / self.input_in:8.3f}   (the photo at the model\'s input '
                 'resolution, upsampled)']
        for n, out, inside in zip(self.fnumbers, self.out_of_focus, self.in_focus, strict=True):
            lines.append(f'  {"f/" + format(n, "g"):8s} {out:13.4f} {out / self.input_out:8.3f} '
                         f'{inside:10.4f} {inside / self.input_in:8.3f}')
        n, ratio = self.worst_in_focus()
        lines.append(f'  out-of-focus blur monotone in N: {"yes" if self.monotone() else "NO"}')
        within = abs(ratio - 1) <= IN_FOCUS_TOLERANCE
        lines.append(f'  in focus within {IN_FOCUS_TOLERANCE:.0%} of the input: '
                     f'{"yes" if within else "NO"} (farthest: {ratio:.3f} at f/{n:g})')
        return '\n'.join(lines)


def sweep_photo(renderer: Renderer, name: str, photo: np.ndarray, depth: np.ndarray,
                depth_source: str, fnumbers: Sequence[float],
                focus_point: tuple[float, float] | None = None) -> Sweep:
    """Renders `photo` (uint8 [H, W, 3]) at every f-number and measures it.

    depth: uint8 [H // 2, W // 2] near = bright (`image_ops.normalize_depth`); the measures use it
    at the photo's resolution. focus_point: (x, y), a pixel of the photo, or None = auto focus.
    """
    height, width = photo.shape[:2]
    disparity = classical.disparity_from_depth(depth, (height, width))
    if focus_point is not None:
        try:
            control.check_focus_point(focus_point, (height, width))
        except ValueError as e:
            raise UserError(f'{name}: {e}') from None
    focus = control.focal_disparity(
        disparity, None if focus_point is None else focus_point[::-1])
    in_focus, out_of_focus = regions(disparity, focus)
    original = image_ops.to_float(photo)
    resampled = np.clip(image_ops.resize(
        image_ops.resize(original, image_ops.half_size(height, width)), (height, width)), 0, 1)
    result = Sweep(name, (height, width), depth_source, focus,
                   sharpness(original, out_of_focus), sharpness(original, in_focus),
                   sharpness(resampled, out_of_focus), sharpness(resampled, in_focus))
    for fnumber in fnumbers:
        image = renderer(photo, depth, fnumber, focus)
        result.fnumbers.append(fnumber)
        result.out_of_focus.append(sharpness(image, out_of_focus))
        result.in_focus.append(sharpness(image, in_focus))
    return result


# ----------------------------------------------------------------------------------------------
# Renderers.
# ----------------------------------------------------------------------------------------------


def classical_renderer(strength_at_f2: float) -> Renderer:
    """The thin-lens renderer at blur strength control.blur_strength(strength_at_f2, N)."""

    def run(photo, depth, fnumber, focus):
        return classical.render_bokeh(image_ops.to_float(photo), depth, focus=focus,
                                      strength=float(control.blur_strength(strength_at_f2, fnumber)))

    return run


def model_renderer(workdir: str, max_tile: int = render.DEFAULT_MAX_TILE,
                   focus_detail: bool = True) -> Renderer:
    """WORKDIR's level-1 conditioned PyNET, the control maps appended before tiling; with
    focus_detail, control.focus_detail at the blur scale of its meta or workdir config."""
    try:
        params, meta = checkpoint.load_params(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if meta.get('level') != 1:
        raise UserError(f'{workdir}: the finest parameters are of level {meta.get("level")}; the '
                        'sweep needs level 1')
    condition = meta.get('condition', 'none')
    if condition == 'none':
        raise UserError(f'{workdir}: the model is unconditioned (one fixed look, whatever the '
                        'f-number); sweep a model trained with model.condition, or the classical '
                        'renderer (--renderer=classical)')
    channels, input_channels = int(meta['channels']), int(meta['input_channels'])
    residual = meta.get('residual', False)

    def run(photo, depth, fnumber, focus):
        x, out_hw = render.model_input(photo, depth if input_channels == 4 else None,
                                       input_channels=input_channels)
        x = control.append_condition(x[None], condition, fnumber, focus)[0]
        image = render.render_model_input(params, x, out_hw, channels=channels,
                                          max_tile=max_tile, residual=residual)
        return render.with_focus_detail(image, photo, x, scale)

    saved = workdir_lib.read_config(workdir)
    scale = (control.px_per_defocus(saved[0] if saved else {'model': {}, 'data': {'name': ''}},
                                    meta) if focus_detail and condition == 'aperture_focus'
             else None)

    return run


# ----------------------------------------------------------------------------------------------
# The program.
# ----------------------------------------------------------------------------------------------


def photo_paths(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if os.path.splitext(n)[1].lower() in PHOTO_EXTENSIONS)
        if not found:
            raise UserError(f'--photos={path}: no {"/".join(PHOTO_EXTENSIONS)} photos in it')
        return found
    if not os.path.isfile(path):
        raise UserError(f'--photos={path}: no such file or folder')
    return [path]


def load_pair(path: str, depths: str | None, ramp: str, max_side: int
              ) -> tuple[np.ndarray, np.ndarray, str]:
    """(photo uint8 [H, W, 3], depth uint8 [H // 2, W // 2] near = bright, where it came from);
    the photo shrunk to `max_side` on its longer side when larger (0: as it is)."""
    try:
        photo = image_io.read_photo(path)
    except image_io.ImageFileError as e:
        raise UserError(str(e)) from None
    original_hw = photo.shape[:2]
    if max_side and max(original_hw) > max_side:
        scale = max_side / max(original_hw)
        size = tuple(max(2, round(n * scale)) for n in original_hw)
        photo = np.round(np.clip(image_ops.resize(image_ops.to_float(photo), size), 0, 1) * 255
                         ).astype(np.uint8)
    if depths is None:
        return (photo, image_ops.normalize_depth(ramp_disparity(*photo.shape[:2], ramp),
                                                 photo.shape[:2]), f'ramp ({ramp})')
    depth_path = depths
    if os.path.isdir(depths):
        depth_path = os.path.join(depths, os.path.splitext(os.path.basename(path))[0] + '.png')
    try:
        depth = image_io.read_depth(depth_path)
        render.check_depth_aspect(depth.shape[:2], original_hw)
    except (image_io.ImageFileError, ValueError) as e:
        raise UserError(f'{depth_path} (depth of {path}): {e}') from None
    return photo, image_ops.normalize_depth(depth, photo.shape[:2]), depth_path


def parse_fnumbers(text: str) -> list[float]:
    try:
        values = [control.check_fnumber(v, '--fnumbers') for v in text.split(',')]
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(values) < 2:
        raise UserError(f'--fnumbers needs at least two f-numbers to sweep; got {text!r}')
    return sorted(values)


_WORKDIR = flags.DEFINE_string('workdir', None, 'model: a workdir with conditioned level-1 params.')
_PHOTOS = flags.DEFINE_string('photos', None, 'A photo or a folder of photos (jpg/png).')
_DEPTHS = flags.DEFINE_string('depths', None, 'A depth map (near = bright, any resolution) or a '
                              'folder of <name>.png per photo; default: a ramp (--ramp).')
_RAMP = flags.DEFINE_enum('ramp', 'vertical', RAMPS, 'Without --depths: disparity rising from '
                          'top to bottom (vertical) or from left to right (horizontal).')
_RENDERER = flags.DEFINE_enum('renderer', 'model', ('model', 'classical'),
                              'model: WORKDIR\'s conditioned PyNET; classical: the thin-lens '
                              'renderer (the reference).')
_FNUMBERS = flags.DEFINE_string('fnumbers', ','.join(f'{n:g}' for n in control.FULL_STOPS),
                                'Comma-separated f-numbers.')
_FOCUS = flags.DEFINE_string('focus', None, 'X,Y: a pixel to focus on (of the photo after '
                             '--max_side); default: the disparity at the centre.')
_STRENGTH = flags.DEFINE_float('strength', classical.DEFAULT_STRENGTH,
                               'classical: blur strength at f/2 (config.data.synthetic.strength).')
_MAX_SIDE = flags.DEFINE_integer('max_side', 0, 'Shrink photos to this longer side (0: as they are).')
_FOCUS_DETAIL = flags.DEFINE_bool('focus_detail', True, 'model: config.render.focus_detail (the '
                                  "photo's detail kept where the blur disc is under 1-2 px).")
_MAX_TILE = flags.DEFINE_integer('max_tile', render.DEFAULT_MAX_TILE,
                                 'model: config.render.max_tile (0 = untiled).')


def run() -> bool:
    """Prints every photo's table; returns whether every sweep passed both checks."""
    if not _PHOTOS.value:
        raise UserError('--photos=PHOTO_OR_FOLDER is required')
    fnumbers = parse_fnumbers(_FNUMBERS.value)
    try:
        focus = control.parse_focus(_FOCUS.value) if _FOCUS.value else None
    except ValueError as e:
        raise UserError(str(e)) from None
    if _DEPTHS.value and not os.path.exists(_DEPTHS.value):
        raise UserError(f'--depths={_DEPTHS.value}: no such file or folder')
    if _RENDERER.value == 'classical':
        renderer, what = classical_renderer(_STRENGTH.value), f'classical, strength {_STRENGTH.value:g} at f/2'
    else:
        if not _WORKDIR.value:
            raise UserError('--renderer=model needs --workdir=RUN (or --renderer=classical)')
        renderer, what = model_renderer(_WORKDIR.value, _MAX_TILE.value,
                                      _FOCUS_DETAIL.value), f'model {_WORKDIR.value}'
        what += ', focus detail' if _FOCUS_DETAIL.value else ', network output only'
    print(f'Control sweep ({what}): blur measure = mean luminance gradient; out of focus = top '
          f'third of |disparity - focus|, in focus = bottom tenth', flush=True)
    passed = True
    for path in photo_paths(_PHOTOS.value):
        photo, depth, source = load_pair(path, _DEPTHS.value, _RAMP.value, _MAX_SIDE.value)
        result = sweep_photo(renderer, path, photo, depth, source, fnumbers, focus)
        print(result.table(), flush=True)
        ratio = result.worst_in_focus()[1]
        passed &= result.monotone() and abs(ratio - 1) <= IN_FOCUS_TOLERANCE
    print(f'All sweeps monotone with a sharp focal plane: {"yes" if passed else "NO"}')
    return passed


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f'unexpected arguments: {list(argv[1:])}')
    run()


if __name__ == '__main__':
    try:
        app.run(main)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
