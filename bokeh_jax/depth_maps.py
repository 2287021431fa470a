"""Depth maps in EBB!'s convention from photos, with MegaDepth (`launch.py --mode=depth`).

EBB!'s maps (tfds_ebb/README.md): 8-bit grayscale PNG at half the photo's size
(`image_ops.half_size`), near = bright, each map stretched to 0..255. As the MegaDepth demo made
them: the photo, RGB in [0, 1], is resized bilinearly (no antialiasing, like the demo's
`skimage.transform.resize(order=1)` of its time) to the working size, the network gives log
depth, inverse depth exp(-log depth) is near = bright; `image_ops.normalize_depth` resizes it to
half the photo's size (antialiased bicubic) and stretches it to 0..255.

The working size (config.depth.working_size, default 384x512 = H x W, the demo's) is turned to
the photo's orientation: portrait photos run at 512x384. The network is fully convolutional, so a
portrait photo squeezed into a landscape input would have its shapes stretched 1.8x sideways, far
from what it saw in training; the turned size keeps the aspect close and the cost the same.
Photos of one orientation share one input shape, so a folder runs in batches of
config.depth.batch_size whatever the photos' sizes; results do not depend on the batching.
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from bokeh_jax import image_io  # its photo reader: EXIF orientation, grayscale, alpha, 16 bit
from bokeh_jax import image_ops
from bokeh_jax import megadepth
from bokeh_jax import output_paths
from bokeh_jax.errors import UserError

# Models config.depth.model may name (room for a second one).
MODELS = ('megadepth',)
PHOTO_EXTENSIONS = ('.jpg', '.jpeg', '.png')


class DepthError(UserError):
    """A problem with the user's files, flags or config; the message names it."""


def parse_size(text: str, field: str = 'config.depth.working_size') -> tuple[int, int]:
    """'384x512' -> (384, 512); sides must be positive multiples of 16."""
    try:
        h, w = (int(v) for v in str(text).lower().split('x'))
    except ValueError:
        raise DepthError(f'{field} must look like 384x512 (height x width); got {text!r}') from None
    m = megadepth.SIZE_MULTIPLE
    if min(h, w) <= 0 or h % m or w % m:
        raise DepthError(f'{field}={text!r}: both sides must be positive multiples of {m}')
    return h, w


def working_size(photo_hw: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The network's input size for a photo: `size` turned to the photo's orientation."""
    short, long = sorted(size)
    return (long, short) if photo_hw[0] > photo_hw[1] else (short, long)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [H, W, C] -> [h, w, C], bilinear with half-pixel centres, edges clamped, no
    antialiasing (what skimage's resize(order=1) did before it antialiased)."""

    def taps(n_in, n_out):
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    r0, r1, fr = taps(image.shape[0], size[0])
    c0, c1, fc = taps(image.shape[1], size[1])
    rows = image[r0] * (1 - fr)[:, None, None] + image[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def network_input(photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [*working_size, 3] RGB in [0, 1]."""
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f'photo must be uint8 [H, W, 3]; got {photo.dtype} {photo.shape}')
    return resize_bilinear(image_ops.to_float(photo), working_size(photo.shape[:2], size))


def to_map(log_depth: np.ndarray, photo_hw: tuple[int, int]) -> np.ndarray:
    """Log depth [h, w] or [h, w, 1] -> uint8 [H // 2, W // 2], near = bright, 0..255."""
    return image_ops.normalize_depth(np.exp(-np.asarray(log_depth, np.float64)), photo_hw)


@jax.jit
def _log_depth(folded_params: dict, x: jax.Array) -> jax.Array:
    """float32 [N, h, w, 3] -> [N, h, w]; one compilation per shape for the whole process."""
    return megadepth.MegaDepth(folded=True).apply({'params': folded_params}, x)[..., 0]


class Estimator:
    """MegaDepth with parameters on the device: photos -> depth maps (uint8, half size)."""

    def __init__(self, params: dict, size: tuple[int, int], batch_size: int = 1):
        self.size, self.batch_size = size, max(1, int(batch_size))
        self._params = jax.device_put(megadepth.fold_batch_norm(params))

    def log_depth(self, inputs: np.ndarray) -> np.ndarray:
        """float32 [N, h, w, 3] (one working size) -> [N, h, w]; padded to a whole batch so that
        each shape compiles once."""
        n = len(inputs)
        pad = -n % self.batch_size
        if pad:
            inputs = np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), inputs.dtype)])
        outs = [np.asarray(_log_depth(self._params, jnp.asarray(inputs[i:i + self.batch_size])))
                for i in range(0, len(inputs), self.batch_size)]
        return np.concatenate(outs)[:n]

    def __call__(self, photo: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [H // 2, W // 2] depth map, near = bright."""
        x = network_input(photo, self.size)
        return to_map(self.log_depth(x[None])[0], photo.shape[:2])


def check_config(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Validates config.depth; returns the working size."""
    cfg = config.depth
    if cfg.model not in MODELS:
        raise DepthError(f'config.depth.model must be one of {MODELS}; got {cfg.model!r}')
    if int(cfg.batch_size) < 1:
        raise DepthError(f'config.depth.batch_size must be >= 1; got {cfg.batch_size}')
    return parse_size(cfg.working_size)


def load_estimator(config: ml_collections.ConfigDict, workdir: str) -> Estimator:
    """The estimator of config.depth with the weights imported into `workdir`.

    Raises DepthError saying which command imports the weights when there are none.
    """
    size = check_config(config)
    try:
        params, _ = megadepth.load_params(workdir)
    except (FileNotFoundError, megadepth.WeightsError) as e:
        raise DepthError(str(e)) from None
    return Estimator(params, size, config.depth.batch_size)


# ----------------------------------------------------------------------------------------------
# Files and folders.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    photo: str
    output: str


def save_map(path: str, depth: np.ndarray) -> None:
    """Writes uint8 [h, w] as an 8-bit grayscale PNG, through a hidden temporary file and a
    rename: an interrupted run never leaves a half-written map under the final name."""
    directory, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(directory, f'.{name}.partial')
    try:
        Image.fromarray(depth, mode='L').save(partial, format='PNG')
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def plan_jobs(input_path: str, output_path: str, *, overwrite: bool = False,
              protected: Sequence[str] = ()) -> tuple[list[Job], list[str]]:
    """(jobs to run, outputs skipped because they exist) for a photo or a folder.

    A folder gives <output folder>/<stem>.png per photo; existing maps are skipped (a stopped
    run resumes) unless `overwrite`. A single photo's existing output is an error without
    `overwrite`. An output that is one of the inputs, lies in `protected` (the workdir's
    weights, ...) or below a file is always an error (output_paths.py).
    """
    if os.path.isdir(input_path):
        photos = sorted(
            os.path.join(input_path, n) for n in os.listdir(input_path)
            if not n.startswith('.') and os.path.splitext(n)[1].lower() in PHOTO_EXTENSIONS
            and os.path.isfile(os.path.join(input_path, n)))
        if not photos:
            raise DepthError(f'--input={input_path}: no {"/".join(PHOTO_EXTENSIONS)} photos in it')
        if os.path.exists(output_path) and not os.path.isdir(output_path):
            raise DepthError(f'--output={output_path} is a file; with a folder of photos it must '
                             f'be a folder')
        jobs = [Job(p, os.path.join(output_path, os.path.splitext(os.path.basename(p))[0] + '.png'))
                for p in photos]
    elif os.path.isfile(input_path):
        output = output_path
        if os.path.isdir(output):
            output = os.path.join(output, os.path.splitext(os.path.basename(input_path))[0] + '.png')
        elif os.path.splitext(output)[1].lower() != '.png':
            raise DepthError(f'--output={output_path}: depth maps are written as PNG; use a .png '
                             f'file name or a folder')
        if os.path.exists(output) and not overwrite:
            raise DepthError(f'{output} already exists; pass --overwrite to replace it')
        jobs = [Job(input_path, output)]
    else:
        raise DepthError(f'--input={input_path}: no such file or folder')
    inputs = {os.path.realpath(job.photo) for job in jobs}
    for job in jobs:
        if os.path.realpath(job.output) in inputs:
            raise DepthError(f'{job.output}: the depth map would replace an input photo; choose '
                             f'another --output')
        problem = output_paths.output_problem(job.output, protected=protected)
        if problem:
            raise DepthError(f'--output={output_path}: {problem}')
    if overwrite:
        return jobs, []
    skipped = [job.output for job in jobs if os.path.exists(job.output)]
    return [job for job in jobs if not os.path.exists(job.output)], skipped


def _batches(jobs: list[Job], estimator: Estimator, failures: list[str]
             ) -> Iterator[tuple[list[Job], list[np.ndarray], np.ndarray]]:
    """Reads photos in order and yields (jobs, photos, network inputs) of one working size, up
    to batch_size at a time; unreadable photos go to `failures`."""
    pending: dict[tuple[int, int], list] = {}
    for job in jobs:
        try:
            photo = image_io.read_photo(job.photo)
            x = network_input(photo, estimator.size)
        except image_io.ImageFileError as e:  # names the file
            failures.append(str(e))
            tqdm.tqdm.write(f'FAILED {failures[-1]}', file=sys.stderr)
            continue
        except ValueError as e:
            failures.append(f'{job.photo}: {e}')
            tqdm.tqdm.write(f'FAILED {failures[-1]}', file=sys.stderr)
            continue
        group = pending.setdefault(x.shape[:2], [])
        group.append((job, photo, x))
        if len(group) == estimator.batch_size:
            yield _unzip(pending.pop(x.shape[:2]))
    for group in pending.values():
        yield _unzip(group)


def _unzip(group: list) -> tuple[list[Job], list[np.ndarray], np.ndarray]:
    jobs, photos, inputs = zip(*group)
    return list(jobs), list(photos), np.stack(inputs)


def make_depth_maps(
    config: ml_collections.ConfigDict,
    workdir: str,
    input_path: str,
    output_path: str,
    *,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
) -> int:
    """`--mode=depth`: depth maps for a photo or a folder; returns how many were written.

    Skips maps already present (unless `overwrite`), so a stopped run continues where it
    stopped. Photos that fail are listed and the others go on; DepthError at the end lists them.
    """
    estimator = load_estimator(config, workdir)
    jobs, skipped = plan_jobs(input_path, output_path, overwrite=overwrite,
                              protected=output_paths.workdir_inputs(workdir))
    if skipped:
        log(f'{len(skipped)} depth map(s) already exist in {os.path.dirname(skipped[0])}; '
            f'skipping them (--overwrite makes them again)')
    for directory in {os.path.dirname(os.path.abspath(job.output)) for job in jobs}:
        os.makedirs(directory, exist_ok=True)
    failures: list[str] = []
    written = 0
    with tqdm.tqdm(total=len(jobs), desc='depth', unit='photo', disable=len(jobs) <= 1) as bar:
        for batch_jobs, photos, inputs in _batches(jobs, estimator, failures):
            log_depths = estimator.log_depth(inputs)
            for job, photo, log_depth in zip(batch_jobs, photos, log_depths):
                try:
                    save_map(job.output, to_map(log_depth, photo.shape[:2]))
                    written += 1
                except OSError as e:
                    failures.append(f'{job.output}: cannot write the depth map ({e})')
                    tqdm.tqdm.write(f'FAILED {failures[-1]}', file=sys.stderr)
            bar.update(len(batch_jobs))
        bar.update(len(jobs) - bar.n)
    log(f'Wrote {written} depth map(s) to {output_path}'
        + (f' ({len(skipped)} already there)' if skipped else ''))
    if failures:
        raise DepthError(f'{len(failures)} of {len(jobs)} photo(s) failed (the others were '
                         f'written):\n  ' + '\n  '.join(failures))
    return written


def read_weights(weights_path: str) -> dict:
    """The MegaDepth parameter tree of best_generalization_net_G.pth (or any state dict of that
    layout), read without PyTorch (restricted unpickling); DepthError names the file."""
    from bokeh_jax import torch_pickle

    try:
        state_dict = torch_pickle.load_state_dict(weights_path)
        return megadepth.params_from_state_dict(state_dict, weights_path)
    except (FileNotFoundError, torch_pickle.UnsafePickleError, torch_pickle.TorchFileError,
            megadepth.WeightsError) as e:
        raise DepthError(str(e)) from None


def import_weights(weights_path: str, workdir: str) -> tuple[str, int]:
    """`--mode=import_depth`: reads best_generalization_net_G.pth (read_weights) and stores the
    tree in WORKDIR/depth/megadepth/. Returns (directory, #params)."""
    import hashlib

    params = read_weights(weights_path)
    with open(weights_path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    count = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    directory = megadepth.save_params(
        workdir, params, {'source': os.path.abspath(weights_path), 'sha256': digest,
                          'parameters': count})
    return directory, count
