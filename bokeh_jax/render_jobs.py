"""`launch.py --mode=render`: rendering a photo or a folder of photos to files.

`plan_jobs` checks the paths of a run and pairs every photo with its depth map and output before
anything is rendered; `render_paths` loads the finest parameters of a workdir and renders each job
with render.py (tiled full-resolution inference), reading and writing through image_io.py. Every
problem a user can fix is a RenderError whose message names the file or flag.
"""

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from bokeh_jax import checkpoint
from bokeh_jax import control
from bokeh_jax import image_io
from bokeh_jax import output_paths
from bokeh_jax import render

# Photos picked up from a folder (case-insensitive).
PHOTO_EXTENSIONS = ('.jpg', '.jpeg', '.png')


class RenderError(Exception):
    """A problem with the user's files or arguments; the message names the file or flag."""


@dataclasses.dataclass(frozen=True)
class Control:
    """What a conditioned model is told besides the photo (control.py): the f-number, and the
    pixel (x, y) of the photo to focus on (None: `classical.auto_focus`)."""

    condition: str = 'none'
    fnumber: float = control.REFERENCE_FNUMBER
    focus: tuple[float, float] | None = None


def check_control(meta: dict, workdir: str, fnumber: str | None, focus: str | None,
                  folder: bool) -> Control:
    """The control of a render run from --fnumber and --focus (None: not given) and the
    parameters' meta; raises RenderError naming the flag.

    Without the flags a conditioned model renders at f/2 (control.REFERENCE_FNUMBER, the blur of
    the demo's fixed look) focused by `classical.auto_focus`.
    """
    condition = meta.get('condition', 'none')
    given = [f'--{name}' for name, value in (('fnumber', fnumber), ('focus', focus)) if value]
    if condition == 'none':
        if given:
            raise RenderError(
                f'{" and ".join(given)}: the model in {workdir} is unconditioned (trained without '
                f'aperture control): it renders one fixed look, the EBB! f/1.8-like blur focused '
                f'on the subject. The classical thin-lens renderer takes an aperture and a focus '
                f'point: --mode=serve (its blur slider and focus click), or train a controlled '
                f'model with --config=configs/default.py:control')
        return Control()
    try:
        value = control.check_fnumber(fnumber or control.REFERENCE_FNUMBER, '--fnumber')
        point = control.parse_focus(focus) if focus else None
    except ValueError as e:
        raise RenderError(str(e)) from None
    if point is not None and condition != 'aperture_focus':
        raise RenderError(
            f'--focus={focus}: the model in {workdir} controls the aperture only (condition '
            f'{condition!r}); its focus is where it was trained to put it. Leave out --focus')
    if point is not None and folder:
        raise RenderError(
            f'--focus={focus} is a pixel of one photo, but --input is a folder: render the photos '
            f'one by one to focus each, or leave out --focus to focus each on its centre')
    return Control(condition, value, point)


@dataclasses.dataclass(frozen=True)
class Job:
    """One photo to render: its path, its depth map's path (None: RGB-only) and the output path."""

    photo: str
    depth: str | None
    output: str


def _split_folder(folder: str) -> tuple[list[str], list[str]]:
    """(photos, other files) in a folder, sorted by name; sub-folders are not entered."""
    photos, others = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not name.startswith('.'):
            is_photo = os.path.splitext(name)[1].lower() in PHOTO_EXTENSIONS
            (photos if is_photo else others).append(path)
    return photos, others


def _depth_for(photo: str, depth_folder: str) -> str:
    return os.path.join(depth_folder, os.path.splitext(os.path.basename(photo))[0] + '.png')


def plan_jobs(
    input_path: str,
    depth_path: str | None,
    output_path: str,
    *,
    input_channels: int,
    overwrite: bool = False,
    estimates_depth: bool = False,
    protected: Sequence[str] = (),
) -> list[Job]:
    """Checks the paths of a render run and pairs every photo with its depth map and output.

    `input_path` is a photo or a folder of photos (*.jpg, *.jpeg, *.png). For a folder,
    `output_path` is a folder (each output keeps its photo's name) and `depth_path` a folder
    holding <stem>.png for each photo <stem>.<ext>; a missing map fails that photo only, when it is
    rendered. For a single photo, `output_path` is a file (format from the extension) or an
    existing folder, and `depth_path` a file, or a folder to look <stem>.png up in. Raises
    RenderError, before anything is rendered, for: a missing input; depth given to an RGB-only
    model or missing for an RGB + depth model; an unknown output extension; an output that exists
    (unless `overwrite`) or that is the input itself. `estimates_depth`: maps missing for an
    RGB + depth model come from a depth estimator (`render_paths`'s depth_fn). No output may be
    an input (photo, depth map), lie in `protected` (the workdir's parameters, ...) or below a
    file (output_paths.py).
    """
    if input_channels == 4 and not depth_path and not estimates_depth:
        raise RenderError(render.NEEDS_DEPTH)
    if input_channels == 3 and depth_path:
        raise RenderError(
            f'--depth={depth_path}: this model is RGB-only (3 input channels, trained without '
            f'depth) and takes no depth map; leave out --depth or use an RGB + depth model'
        )
    if depth_path and not os.path.exists(depth_path):
        raise RenderError(f'--depth={depth_path}: no such file or folder')
    if os.path.isdir(input_path):
        photos, others = _split_folder(input_path)
        if others:
            logging.warning(
                'Not rendering %d file(s) of %s without a %s extension: %s',
                len(others),
                input_path,
                '/'.join(PHOTO_EXTENSIONS),
                ', '.join(others[:10]),
            )
        if not photos:
            extensions = '/'.join(PHOTO_EXTENSIONS)
            raise RenderError(f'--input={input_path}: no {extensions} photos in it')
        if depth_path and not os.path.isdir(depth_path):
            raise RenderError(
                f'--depth={depth_path} is a file; with a folder of photos, --depth must be a '
                f'folder holding <name>.png for each photo <name>.jpg/.png'
            )
        if os.path.exists(output_path) and not os.path.isdir(output_path):
            raise RenderError(
                f'--output={output_path} is a file; with a folder of photos it must be a folder'
            )
        jobs = [
            Job(
                photo,
                _depth_for(photo, depth_path) if depth_path else None,
                os.path.join(output_path, os.path.basename(photo)),
            )
            for photo in photos
        ]
    elif os.path.isfile(input_path):
        depth = depth_path or None
        if depth and os.path.isdir(depth):
            depth = _depth_for(input_path, depth)
            if not os.path.isfile(depth):
                raise RenderError(f'--depth={depth_path}: no depth map {depth} for {input_path}')
        output = output_path
        if os.path.isdir(output):
            output = os.path.join(output, os.path.basename(input_path))
        jobs = [Job(input_path, depth, output)]
    else:
        raise RenderError(f'--input={input_path}: no such file or folder')

    for job in jobs:
        try:
            image_io.output_format(job.output)
        except image_io.ImageFileError as e:
            raise RenderError(str(e)) from None
        if os.path.exists(job.output) and os.path.samefile(job.output, job.photo):
            raise RenderError(
                f'{job.output}: the output would replace the input photo; choose another --output'
            )
        problem = output_paths.output_problem(job.output, inputs=(job.depth,),
                                              protected=protected)
        if problem:
            raise RenderError(f'--output={output_path}: {problem}')
    existing = [job.output for job in jobs if os.path.exists(job.output)]
    if existing and not overwrite:
        raise RenderError(
            f'{len(existing)} output file(s) already exist ({", ".join(existing[:5])}'
            f'{", ..." if len(existing) > 5 else ""}); pass --overwrite to replace them'
        )
    return jobs


def _render_job(
    params: Any, meta: dict, job: Job, config: ml_collections.ConfigDict,
    depth_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    settings: Control = Control(),
) -> tuple[np.ndarray, float, str]:
    """Renders and writes one job; returns (photo, seconds spent rendering, a note on the
    control used: '' for an unconditioned model).

    Raises RenderError naming the file.
    """
    cfg = config.render
    try:
        photo = image_io.read_photo(job.photo)
    except image_io.ImageFileError as e:
        raise RenderError(str(e)) from None
    depth = None
    if job.depth is not None:
        if not os.path.isfile(job.depth):
            raise RenderError(f'{job.photo}: its depth map {job.depth} does not exist')
        try:
            depth = image_io.read_depth(job.depth)
        except image_io.ImageFileError as e:
            raise RenderError(str(e)) from None
        try:
            render.check_depth_aspect(depth.shape, photo.shape[:2])
        except ValueError as e:
            raise RenderError(f'{job.depth} (depth of {job.photo}): {e}') from None
    elif depth_fn is not None and meta['input_channels'] == 4:
        depth = depth_fn(photo)  # bokeh_jax/depth_maps.py
    start = time.perf_counter()
    try:
        x, out_hw = render.model_input(
            photo,
            depth,
            input_channels=meta['input_channels'],
            pad_mode=cfg.pad_mode,
            depth_far_is_bright=cfg.depth_far_is_bright,
        )
        x, focus_disparity = render.control_input(
            x, photo.shape[:2], condition=settings.condition, fnumber=settings.fnumber,
            focus=settings.focus)
    except ValueError as e:  # photo too small for the pad mode, focus outside the photo, ...
        raise RenderError(f'{job.photo}: {e}') from None
    note = ''
    if settings.condition != 'none':
        note = f', f/{settings.fnumber:g}'
        if focus_disparity is not None:
            where = 'auto' if settings.focus is None else '{:g},{:g}'.format(*settings.focus)
            note += f', focus {where} (disparity {focus_disparity:.3f})'
    image = render.render_model_input(
        params, x, out_hw, channels=meta['channels'], max_tile=cfg.max_tile,
        dtype=config.model.dtype, conv_impl=config.model.conv_impl,
        residual=meta.get('residual', False)
    )
    if settings.condition == 'aperture_focus' and cfg.focus_detail:
        image = render.with_focus_detail(image, photo, x, control.px_per_defocus(config, meta))
    seconds = time.perf_counter() - start
    try:
        image_io.save_image(job.output, image, jpeg_quality=cfg.jpeg_quality)
    except image_io.ImageFileError as e:
        raise RenderError(str(e)) from None
    except OSError as e:
        raise RenderError(f'{job.output}: cannot write the output ({e})') from None
    return photo, seconds, note


def render_paths(
    config: ml_collections.ConfigDict,
    workdir: str,
    input_path: str,
    depth_path: str | None,
    output_path: str,
    *,
    overwrite: bool = False,
    depth_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    fnumber: str | None = None,
    focus: str | None = None,
) -> None:
    """`--mode=render`: renders a photo or a folder with the finest parameters in `workdir`.

    `depth_fn`: photo uint8 [H, W, 3] -> depth map, for an RGB + depth model run without
    `depth_path` (e.g. `depth_maps.load_estimator`). `fnumber`, `focus`: --fnumber and --focus
    ('X,Y', a pixel of the photo) for a conditioned model (`check_control`); a folder of photos
    is rendered at one f-number, each photo focused by `classical.auto_focus`.

    Prints the time per photo (a folder also gets a progress bar). Raises RenderError before
    rendering for bad arguments (`plan_jobs`), and after rendering everything else when some photos
    failed, listing them.
    """
    cfg = config.render
    try:
        render.check_settings(cfg.max_tile, cfg.pad_mode)
    except ValueError as e:
        raise RenderError(str(e)) from None
    try:
        params, meta = checkpoint.load_params(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise RenderError(str(e)) from None
    if meta.get('level') != 1:
        raise RenderError(
            f'{checkpoint.params_dir(workdir, meta.get("level"))}: the finest parameters saved in '
            f'{workdir} are of level {meta.get("level")}; rendering needs level 1 (finish '
            f'training, or --mode=convert the released model)'
        )
    settings = check_control(meta, workdir, fnumber, focus, os.path.isdir(input_path))
    jobs = plan_jobs(
        input_path,
        depth_path,
        output_path,
        input_channels=meta['input_channels'],
        overwrite=overwrite,
        estimates_depth=depth_fn is not None,
        protected=output_paths.workdir_inputs(workdir),
    )
    for directory in {os.path.dirname(os.path.abspath(job.output)) for job in jobs}:
        os.makedirs(directory, exist_ok=True)
    params = jax.device_put(params)
    failures, compiled = [], set()
    for job in tqdm.tqdm(jobs, desc='render', unit='photo', disable=len(jobs) == 1):
        try:
            photo, seconds, note = _render_job(params, meta, job, config, depth_fn, settings)
        except RenderError as e:
            failures.append(str(e))
            tqdm.tqdm.write(f'FAILED {e}', file=sys.stderr)
            continue
        # Same size, same shapes: only the first photo of a size compiles.
        height, width = photo.shape[:2]
        first = '' if (height, width) in compiled else ' (first of this size: includes compiling)'
        compiled.add((height, width))
        tqdm.tqdm.write(f'{job.photo} ({width}x{height}{note}) -> {job.output}: {seconds:.1f} s'
                        f'{first}')
    if failures:
        raise RenderError(
            f'{len(failures)} of {len(jobs)} photo(s) failed (the others were written):\n  '
            + '\n  '.join(failures)
        )
