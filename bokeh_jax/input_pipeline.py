"""Input pipeline: the prepared TFDS dataset (array_record) read with grain, without TensorFlow.

Reading goes through dataset.py (random access to the array_record files of a prepared split,
examples parsed by TFDS's numpy parser) and grain (`MapDataset`, worker processes via
`mp_prefetch`); images are decoded with PIL. Nothing here imports TensorFlow, so training runs on
accelerator images without it, nor the builders (tfds_ebb): train and eval build the data set
first (tfds_ebb.prepare).

Each function takes the part of the config it reads: `config.data` (+ `config.seed` for
training) and explicit batch sizes.

Training batches follow the paper's sampling (SPEC "Training recipe"): a random crop_size x
crop_size crop of the half-resolution input (photo downscaled x0.5 by image_ops.resize, stacked
with the depth map, / 255), the matching 2c x 2c crop of the full-resolution bokeh photo resized
to the level's output size (image_ops.level_output_size), and one joint rot90 / vertical flip.

Conditioned models (config.model.condition != 'none', passed as `condition`): the input of train
and eval batches is followed by the control maps (control.append_condition) of each record's
`fnumber` and `focus_disparity`, at the input's (half) resolution. Records without a focal plane
(ebb, realbokeh) focus where classical.auto_focus puts it on the whole image's depth channel; a
data set without f-numbers (ebb) cannot condition. Eval batches carry each image's `fnumber`
whenever the records have one (per-f-number metrics), conditioned or not.

Determinism: example j of the global batch at step s is record `perm_e[(s * B + j) mod N]`, with
the epoch permutation perm_e and the crop/augmentation drawn from seeded generators keyed by
(config.seed, level, ...). It depends neither on process_count, num_workers nor the decoded-record
cache (config.data.cache_mb), so a resumed run (start_step = s) sees exactly the batches of an
uninterrupted one, and process p of P simply takes rows [p * B / P, (p + 1) * B / P) of the same
global batch. Its speed: `python -m bokeh_jax.bench.pipeline`.
"""

import collections
from collections.abc import Iterator, Sequence
import dataclasses
import functools
import io
import threading
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np
from PIL import Image

from bokeh_jax import classical
from bokeh_jax import control
from bokeh_jax import dataset
from bokeh_jax.errors import UserError
from bokeh_jax import image_io
from bokeh_jax import image_ops

# Elements of the (unbounded) training sequence that a MapDataset may address.
_MAX_TRAIN_STEPS = 2**31


# ----------------------------------------------------------------------------- training

def _check_seed(seed: int) -> int:
    if seed < 0:
        raise ValueError(f'config.seed must be >= 0, got {seed}')
    return int(seed)


def _check_condition(data: ml_collections.ConfigDict, condition: str) -> str:
    """`condition` (config.model.condition), checked against what the records of `data` hold."""
    control.check_condition(condition)
    if condition != 'none' and 'fnumber' not in dataset.feature_names(data):
        raise UserError(
            f'config.model.condition={condition!r} needs records with an f-number, but '
            f'{data.name}/{data.builder_config} has none (it renders one fixed look); train a '
            "conditioned model on synthetic_bokeh or realbokeh, or set config.model.condition='none'")
    return condition


def _record_focus(record: dict[str, Any], disparity: np.ndarray | None) -> float | None:
    """The record's focal disparity: stored, else classical.auto_focus of `disparity` (the whole
    image's depth channel [h, w]); None without either."""
    if 'focus_disparity' in record:
        return float(record['focus_disparity'])
    return None if disparity is None else classical.auto_focus(disparity)


def _with_controls(model_input: np.ndarray, condition: str, fnumber: float | None,
                   focus: float | None) -> np.ndarray:
    """model_input float32 [h, w, C] followed by its control maps [h, w, k] (k = 0 for 'none')."""
    if condition == 'none':
        return model_input
    return control.append_condition(model_input[None], condition, fnumber, focus)[0]


class _TrainExample:
    """Global example index -> one (input, target) training pair; see the module docstring.

    With `cache_bytes` > 0, each process (each grain worker) keeps the prepared form of the
    records it has read (the whole half-resolution input and the decoded bokeh photo, see
    _Prepared) in a least-recently-used cache of at most that many bytes, so that a record is
    decoded and resized once instead of at every visit. A crop of the cached form is bit-identical
    to the crop made from the encoded record, so the batches do not depend on the cache.
    """

    def __init__(self, source: dataset.Source, seed: int, level: int, crop: int, with_depth: bool,
                 cache_bytes: int = 0, condition: str = 'none'):
        self.source, self.seed, self.level = source, seed, level
        self.crop, self.with_depth, self.cache_bytes = crop, with_depth, int(cache_bytes)
        self.condition = condition
        self._cached = (-1, None)  # (epoch, permutation); one tuple so threads see a pair
        self._cache = _LruCache(self.cache_bytes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_cache'] = None  # each worker process fills its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = _LruCache(self.cache_bytes)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the records in `epoch` (cached: consecutive indices share an epoch)."""
        cached_epoch, order = self._cached
        if cached_epoch != epoch:
            rng = np.random.default_rng([self.seed, self.level, 0, epoch])
            order = rng.permutation(len(self.source))
            self._cached = (epoch, order)
        return order

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(int(index), len(self.source))
        record_index = int(self.permutation(epoch)[position])
        rng = np.random.default_rng([self.seed, self.level, 1, int(index)])
        if not self.cache_bytes:
            image = _Decoded(self.source[record_index], self.with_depth)
        else:
            image = self._cache.get(record_index)
            if image is None:
                image = _Prepared(_Decoded(self.source[record_index], self.with_depth))
                self._cache.put(record_index, image, image.nbytes)
        example = _crop(image, rng, self.crop, self.level)
        # The maps are constant or pointwise in the depth channel: appending them after the crop
        # and the augmentation equals cropping and turning them with the photo.
        example['input'] = _with_controls(example['input'], self.condition, image.fnumber,
                                          image.focus_disparity)
        return example


class _LruCache:
    """A thread-safe least-recently-used map holding at most `max_bytes` of values."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self._items: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Stores `value` (evicting the least recently used) unless it alone exceeds the bound."""
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            while self.nbytes + nbytes > self.max_bytes:
                _, (_, freed) = self._items.popitem(last=False)
                self.nbytes -= freed
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes


class _Decoded:
    """A record's images decoded; `input_window` resizes only the window it is asked for."""

    def __init__(self, record: dict[str, Any], with_depth: bool):
        self.name = record['id'].decode() if isinstance(record['id'], bytes) else str(record['id'])
        self.photo = image_io.decode(record['sharp'], self.name)
        self.bokeh = image_io.decode(record['bokeh'], self.name)
        self.height, self.width = self.photo.shape[:2]
        self.half = image_ops.half_size(self.height, self.width)
        self.depth = (image_ops.depth_channel(image_io.decode(record['depth'], self.name),
                                              (self.height, self.width)) if with_depth else None)
        self.fnumber = float(record['fnumber']) if 'fnumber' in record else None
        self.focus_disparity = _record_focus(
            record, None if self.depth is None else self.depth[..., 0])

    def input_window(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """float32 [height, width, C] of the half-resolution model input, photo (+ depth)."""
        rgb = image_ops.resize_region(self.photo, self.half, (top, left, height, width))
        channels = [np.clip(rgb * np.float32(1 / 255), 0, 1)]
        if self.depth is not None:
            channels.append(self.depth[top:top + height, left:left + width])
        return np.concatenate(channels, axis=-1)


class _Prepared:
    """A record's whole half-resolution model input, made once; windows are slices of it."""

    def __init__(self, decoded: _Decoded):
        self.name, self.bokeh, self.half = decoded.name, decoded.bokeh, decoded.half
        self.height, self.width = decoded.height, decoded.width
        self.fnumber, self.focus_disparity = decoded.fnumber, decoded.focus_disparity
        self.input = decoded.input_window(0, 0, *self.half)
        self.nbytes = self.input.nbytes + self.bokeh.nbytes

    def input_window(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.input[top:top + height, left:left + width]


def crop_example(record: dict[str, Any], rng: np.random.Generator, crop: int, level: int,
                 with_depth: bool) -> dict[str, np.ndarray]:
    """One training pair from a record (raw image bytes), with crops and augmentation from rng.

    Returns:
      input: float32 [crop, crop, 4 or 3] in [0, 1], the half-resolution photo crop (+ depth).
      target: float32 [s, s, 3] in [0, 1], s = level_output_size(crop, level).
    """
    return _crop(_Decoded(record, with_depth), rng, crop, level)


def _crop(image: _Decoded | _Prepared, rng: np.random.Generator, crop: int, level: int
          ) -> dict[str, np.ndarray]:
    """crop_example on a decoded or prepared record."""
    if min(image.half) < crop:
        raise ValueError(f'image {image.name!r} is {image.height}x{image.width}: too small for '
                         f'config.data.crop_size={crop} (needs at least {2 * crop}x{2 * crop})')
    top = int(rng.integers(0, image.half[0] - crop + 1))
    left = int(rng.integers(0, image.half[1] - crop + 1))
    model_input = image.input_window(top, left, crop, crop)
    target = image.bokeh[2 * top:2 * top + 2 * crop, 2 * left:2 * left + 2 * crop]
    size = image_ops.level_output_size(crop, level)
    target = np.clip(image_ops.resize(target, (size, size)) * np.float32(1 / 255), 0, 1)
    # Joint augmentation: rot90 by k quarter turns, then an optional vertical flip.
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    model_input, target = np.rot90(model_input, turns), np.rot90(target, turns)
    if flip:
        model_input, target = model_input[::-1], target[::-1]
    return {'input': np.ascontiguousarray(model_input, np.float32),
            'target': np.ascontiguousarray(target, np.float32)}


def _per_device(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """[D * b, ...] -> [D, b, ...] for every entry."""
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def _local_batch_size(batch_size: int, num_local_devices: int, process_count: int,
                      field: str) -> int:
    if num_local_devices < 1 or process_count < 1:
        raise ValueError(f'num_local_devices={num_local_devices} and process_count='
                         f'{process_count} must be >= 1')
    if batch_size <= 0 or batch_size % (num_local_devices * process_count):
        raise ValueError(f'{field}={batch_size} must be a positive multiple of process_count x '
                         f'num_local_devices = {process_count} x {num_local_devices}')
    return batch_size // process_count


def cache_bytes(data: ml_collections.ConfigDict) -> int:
    """config.data.cache_mb in bytes, checked."""
    cache_mb = data.get('cache_mb', 0)
    if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or cache_mb < 0:
        raise ValueError(f'config.data.cache_mb must be a number >= 0 (0 = no cache), got '
                         f'{cache_mb!r}')
    return int(cache_mb * 2**20)


def _finish(pipeline: grain.MapDataset, data: ml_collections.ConfigDict
            ) -> grain.DatasetIterator:
    """Iterates `pipeline` with prefetching threads, in worker processes if configured."""
    prefetch = max(int(data.prefetch), 1)
    iter_dataset = pipeline.to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
    if data.num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain reads its absl flags when starting workers, which fails outside absl.app
            # (google/grain#1355); their defaults are what we want.
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data.num_workers), per_worker_buffer_size=prefetch))
    return iter(iter_dataset)


def train_iterator(data: ml_collections.ConfigDict, seed: int, level: int, start_step: int, *,
                   batch_size: int, num_local_devices: int, process_index: int = 0,
                   process_count: int = 1, condition: str = 'none'
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of `level` from step `start_step` on, for this process.

    Args:
      data: config.data (which data set, its split, crop size, workers, cache).
      seed: config.seed (the epoch permutations, crops and augmentation).
      level: paper level 1..7 (sets the target size).
      start_step: global step of the first batch (resume from a checkpoint by passing its step).
      batch_size: the GLOBAL batch size (all devices of all processes).
      num_local_devices, process_index, process_count: this process's share.
      condition: config.model.condition; other than 'none', the control maps follow the input.

    Yields:
      {'input': float32 [D, b, c, c, C + k], 'target': float32 [D, b, s, s, 3]} in [0, 1]
      (the control maps may exceed it), with D = num_local_devices, b = batch_size /
      process_count / D, c = data.crop_size, s = level_output_size(c, level), C = 4 (rgbd) or 3
      (rgb), k = control.condition_channels(condition). The returned grain iterator has close(),
      which stops its worker processes.
    """
    local = _local_batch_size(batch_size, num_local_devices, process_count,
                              f'batch_size (config.train.level{level}.batch_size)')
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if start_step < 0:
        raise ValueError(f'start_step must be >= 0, got {start_step}')
    crop = int(data.crop_size)
    image_ops.level_output_size(crop, level)  # validates crop and level
    make = _TrainExample(dataset.source(data, data.train_split), _check_seed(seed), level, crop,
                         data.builder_config == 'rgbd', cache_bytes=cache_bytes(data),
                         condition=_check_condition(data, condition))

    def global_index(i: int) -> int:
        step, row = divmod(i, local)
        return (start_step + step) * batch_size + process_index * local + row

    pipeline = (grain.MapDataset.range(_MAX_TRAIN_STEPS * local)
               .map(global_index).map(make).batch(local)
               .map(functools.partial(_per_device, num_devices=num_local_devices)))
    return _finish(pipeline, data)


# ----------------------------------------------------------------------------- evaluation

@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """Index into this process's share -> one whole image padded to `padded` (or a dummy)."""
    source: dataset.Source
    first: int  # global index of this process's first image
    count: int  # images of this process
    padded: tuple[int, int]  # input height, width (multiples of 32)
    channels: int  # RGB(+depth): 3 or 4
    photo_shape: tuple[int, int] | None = None  # the photos' padded size; None: no photos
    depth_shape: tuple[int, int] | None = None  # the depth maps' padded size; None: none
    condition: str = 'none'  # control maps follow the input unless 'none'
    with_fnumber: bool = False  # the records have `fnumber`: the examples carry it
    with_focus: bool = False  # the records have `focus_disparity`: the examples carry it

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        h, w = self.padded
        photo = depth = None
        fnumber = focus = np.nan  # padding entries
        if index >= self.count:
            channels = self.channels + control.condition_channels(self.condition)
            example = {'input': np.zeros((h, w, channels), np.float32),
                       'target': np.zeros((2 * h, 2 * w, 3), np.float32), 'id': np.str_(''),
                       'height': np.int32(0), 'width': np.int32(0), 'valid': np.bool_(False)}
        else:
            record = self.source[self.first + index]
            name = record['id'].decode()
            photo = image_io.decode(record['sharp'], name)
            depth = image_io.decode(record['depth'], name) if self.channels == 4 else None
            model_input = image_ops.make_model_input(photo, depth)
            if self.with_fnumber:
                fnumber = float(record['fnumber'])
            if self.with_focus:
                focus = float(record['focus_disparity'])
            if self.condition != 'none':
                focus = _record_focus(record, model_input[..., 3] if depth is not None else None)
                model_input = _with_controls(model_input, self.condition, fnumber, focus)
            ih, iw = model_input.shape[:2]
            target = image_ops.to_float(image_io.decode(record['bokeh'], name)[:2 * ih, :2 * iw])
            example = {'input': image_ops.pad_to_shape(model_input, h, w),
                       'target': image_ops.pad_to_shape(target, 2 * h, 2 * w),
                       'id': np.str_(name), 'height': np.int32(photo.shape[0]),
                       'width': np.int32(photo.shape[1]), 'valid': np.bool_(True)}
        if self.photo_shape:
            example['photo'] = _zero_padded(photo, self.photo_shape, (3,))
        if self.depth_shape:
            example['depth'] = _zero_padded(depth, self.depth_shape, ())
            example['depth_height'] = np.int32(0 if depth is None else depth.shape[0])
            example['depth_width'] = np.int32(0 if depth is None else depth.shape[1])
        if self.with_fnumber:
            example['fnumber'] = np.float32(fnumber)
        if self.with_focus:
            example['focus_disparity'] = np.float32(focus)
        return example


def _zero_padded(image: np.ndarray | None, shape: tuple[int, int], channels: tuple[int, ...]
                 ) -> np.ndarray:
    """uint8 image (or None: all zeros) padded with zeros at the bottom and right to `shape`."""
    out = np.zeros((*shape, *channels), np.uint8)
    if image is not None:
        out[:image.shape[0], :image.shape[1]] = image
    return out


def _largest_sizes(source: dataset.Source, count: int, keys: Sequence[str]
                   ) -> dict[str, tuple[int, int]]:
    """{key: the largest (height, width) of image `key` among the first `count` records}, read
    from the image headers only."""
    largest = {key: (0, 0) for key in keys}
    for index in range(count):
        record = source[index]
        for key in keys:
            with Image.open(io.BytesIO(record[key])) as image:  # reads the header only
                h, w = largest[key]
                largest[key] = (max(h, image.height), max(w, image.width))
    return largest


def eval_iterator(data: ml_collections.ConfigDict, split: str, *, num_local_devices: int,
                  process_index: int = 0, process_count: int = 1, max_images: int = 0,
                  with_photos: bool = False, condition: str = 'none'
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Whole images of `split` in stored (id) order, one per local device per batch.

    Process p gets the contiguous share [p * n, (p + 1) * n) with n = ceil(N / process_count);
    the last batches are filled with entries whose `valid` is False, so that every process
    yields the same number of batches. max_images > 0 (config.eval.max_images) takes only the
    first that many images of the split. condition: config.model.condition; other than 'none',
    the control maps follow the input's channels.

    Yields:
      input: float32 [D, 1, H, W, C + k], reflect-padded to the split's largest size rounded up
        to a multiple of 32 (the same shape on every process, so that every step runs one
        compiled program), C = 4 (rgbd) or 3 (rgb) channels in [0, 1], then k =
        control.condition_channels(condition) control maps; target: float32 [D, 1, 2H, 2W, 3],
        padded likewise;
      id: str [D, 1]; height, width: int32 [D, 1], the photo's full-resolution size;
      valid: bool [D, 1]. With `with_photos`, also what the baselines and image grids need:
      photo: uint8 [D, 1, PH, PW, 3], the full-resolution sharp photo as stored, zero-padded to
      the split's largest; in config `rgbd` depth: uint8 [D, 1, ph, pw], the depth map as
      stored, zero-padded likewise, and depth_height, depth_width: int32 [D, 1], its size.
      When the records have them: fnumber and focus_disparity: float32 [D, 1] (NaN for padding
      entries).
    """
    _local_batch_size(num_local_devices * process_count, num_local_devices, process_count,
                      'eval batch')
    if max_images < 0:
        raise ValueError(f'max_images must be >= 0 (0 = the whole split), got {max_images}')
    condition = _check_condition(data, condition)
    features = dataset.feature_names(data)
    source = dataset.source(data, split)
    total = len(source)
    if max_images > 0:
        total = min(total, max_images)
    share = -(-total // process_count)
    first = min(process_index * share, total)
    count = min(share, total - first)
    steps = -(-share // num_local_devices)
    with_depth = data.builder_config == 'rgbd'
    keys = ['sharp'] + (['depth'] if with_depth and with_photos else [])
    largest = _largest_sizes(source, total, keys)
    half = image_ops.half_size(*largest['sharp'])
    make = _EvalExample(source, first, count, (image_ops.round_up(half[0]),
                                               image_ops.round_up(half[1])),
                        4 if with_depth else 3,
                        photo_shape=largest['sharp'] if with_photos else None,
                        depth_shape=largest.get('depth'), condition=condition,
                        with_fnumber='fnumber' in features,
                        with_focus='focus_disparity' in features)
    pipeline = (grain.MapDataset.range(steps * num_local_devices).map(make)
               .batch(num_local_devices)
               .map(lambda batch: {k: v[:, None] for k, v in batch.items()}))
    return _finish(pipeline, data)
