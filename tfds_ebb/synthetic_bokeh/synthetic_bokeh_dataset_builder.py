"""`synthetic_bokeh`: procedurally generated EBB!-like pairs that need no download.

Each scene (scenes.py: textured shapes at several depths over a textured background, with
bright highlights) is rendered into a sharp/bokeh pair by the thin-lens renderer of
`bokeh_jax.classical`. Per scene an f-number N is drawn from `fnumbers` and a focal plane by
`focus` ('subject': the central subject; 'random': the subject in half the scenes, the depth under
a random pixel in the others); the blur strength is control.blur_strength(strength, N), strength
being the blur at f/2. The features are those of `ebb` (tfds_ebb/README.md): `id`
("train_00012"), `sharp` and `bokeh` (JPEG, quality 95, no chroma subsampling), and in config
`rgbd` the half-resolution 8-bit depth map (PNG, near = bright); plus `fnumber` and
`focus_disparity` (float32; the focal plane on the depth map's scale, [0, 1], near = 1).
Splits: `train` and `validation`. The defaults (fnumbers (2.0,), focus 'subject') give the
images of generator version 2: the controls are drawn after the scene, from the same generator.

Size and seed are builder arguments (the fields of `Generation`), e.g. from Python
`tfds.builder('synthetic_bokeh', config='rgbd', num_train=1000, seed=1)`, from the config
(`config.data.synthetic`), or the command line (tfds_ebb/README.md):
`tfds build synthetic_bokeh/rgbd/num_train=1000,seed=1,fnumbers=2:4:8,focus=random
--imports=tfds_ebb` (on the command line the f-numbers are separated by ':').
Scene i of a split depends only on (seed, split, i). The generation parameters are stored in the
dataset's metadata (`metadata.json`) so that a reader can tell which set is on disk.
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# bokeh_jax is an installed package (`pip install -e .`), also when `tfds build` loads this file
# by path.
from bokeh_jax import control
from bokeh_jax import image_ops
from . import scenes

_SPLIT_CODES = {'train': 0, 'validation': 1}
_JPEG_QUALITY = 95
# Bumped whenever scenes.py or the renderer change what a given seed produces.
# 2: the subject is the nearest object unless `foreground`; 3: an f-number and a focal plane per
# scene, stored (the images of the default fnumbers and focus are version 2's).
GENERATOR_VERSION = 3

_DESCRIPTION = """\
Synthetic stand-in for EBB!: procedurally generated scenes (textured shapes at several depths,
bright highlights) rendered by a layered thin-lens renderer into an all-in-focus photo and a
shallow depth-of-field photo focused on the central subject, with a half-resolution depth map.
"""


@dataclasses.dataclass(frozen=True)
class Generation:
    """What determines the generated set (stored as the dataset's metadata).

    Attributes:
      num_train, num_validation: scenes per split.
      height, width: photo size; multiples of 64 so that the half-resolution model input is a
        multiple of 32.
      seed: scene i of split s is generated from (seed, s, i).
      strength: blur disc diameter, as a fraction of the height, for |disparity - focus| = 1
        at f/2 (the blur at f-number N is control.blur_strength(strength, N)).
      foreground: objects and ground may come nearer than the subject (scenes.py), so the depth
        in focus varies between scenes; without it the subject is nearest in every scene.
      fnumbers: the f-numbers a scene's is drawn from (uniformly).
      focus: where the camera focuses, one of scenes.FOCUS_MODES (see scenes.choose_focus).
    """
    num_train: int = 300
    num_validation: int = 40
    height: int = 256
    width: int = 384
    seed: int = 0
    strength: float = scenes.STRENGTH
    foreground: bool = False
    fnumbers: tuple[float, ...] = (control.REFERENCE_FNUMBER,)
    focus: str = 'subject'

    def __post_init__(self):
        for field in ('height', 'width'):
            value = getattr(self, field)
            if value <= 0 or value % (2 * image_ops.SIZE_MULTIPLE):
                raise ValueError(f'synthetic_bokeh: {field}={value} must be a positive multiple '
                                 f'of {2 * image_ops.SIZE_MULTIPLE}')
        for field in ('num_train', 'num_validation'):
            if getattr(self, field) <= 0:
                raise ValueError(f'synthetic_bokeh: {field} must be positive, got '
                                 f'{getattr(self, field)}')
        if not self.fnumbers:
            raise ValueError('synthetic_bokeh: fnumbers must name at least one f-number')
        for value in self.fnumbers:
            control.check_fnumber(value, f'synthetic_bokeh: fnumbers entry {value!r}')
        if self.focus not in scenes.FOCUS_MODES:
            raise ValueError(f'synthetic_bokeh: focus must be one of {scenes.FOCUS_MODES}, got '
                             f'{self.focus!r}')

    def metadata(self) -> dict[str, int | float | str | list[float]]:
        """The fields (fnumbers as a list, as metadata.json reads back) and the version."""
        return {**dataclasses.asdict(self), 'fnumbers': list(self.fnumbers),
                'generator_version': GENERATOR_VERSION}


def _flag(value: bool | str) -> bool:
    """A bool builder argument. The `tfds build` command line turns only `True`/`False` into
    bools; `foreground=false` would arrive as a non-empty (truthy) string."""
    if isinstance(value, str):
        if value.lower() not in ('true', 'false', '1', '0'):
            raise ValueError(f'synthetic_bokeh: foreground must be true or false, got {value!r}')
        return value.lower() in ('true', '1')
    return bool(value)


def _fnumbers(value: float | str | tuple | list) -> tuple[float, ...]:
    """The fnumbers builder argument as floats: a sequence, one number, or (command line)
    numbers separated by ':'."""
    if isinstance(value, str):
        value = value.split(':')
    elif not isinstance(value, (tuple, list)):
        value = (value,)
    try:
        return tuple(float(v) for v in value)
    except ValueError:
        raise ValueError(f'synthetic_bokeh: fnumbers must be f-numbers (e.g. 2:2.8:4 on the '
                         f'command line), got {value!r}') from None


def feature_spec(with_depth: bool) -> tfds.features.FeaturesDict:
    """The features of `ebb` (a copy, so that each builder loads on its own; a test keeps them
    identical)."""
    features = {
        'id': tfds.features.Text(doc='Image id: the file stem (ebb) or scene id (synthetic).'),
        'sharp': tfds.features.Image(
            shape=(None, None, 3), encoding_format='jpeg',
            doc='All-in-focus photo (f/16), uint8 RGB, original JPEG bytes.'),
        'bokeh': tfds.features.Image(
            shape=(None, None, 3), encoding_format='jpeg',
            doc='Shallow depth-of-field photo (f/1.8) of the same scene, same size.'),
    }
    if with_depth:
        features['depth'] = tfds.features.Image(
            shape=(None, None, 1), encoding_format='png',
            doc='Depth map at half the photo size (+-1 px), 8-bit, near = bright.')
    return tfds.features.FeaturesDict(features)


# What this builder stores besides the features of `ebb`.
CONTROL_FEATURES = {
    'fnumber': tfds.features.Scalar(
        np.float32, doc='f-number of the bokeh photo (its blur: control.blur_strength).'),
    'focus_disparity': tfds.features.Scalar(
        np.float32, doc='Disparity of the focal plane, on the depth map scale / 255 (near = 1).'),
}


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == 'JPEG':
        Image.fromarray(image).save(buffer, fmt, quality=_JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(image[..., 0]).save(buffer, fmt)
    return buffer.getvalue()


def make_example(generation: Generation, with_depth: bool, split: str, index: int
                 ) -> dict[str, str | bytes]:
    """Scene `index` of `split` as a feature dict (a pure function of its arguments)."""
    rng = np.random.default_rng([generation.seed, _SPLIT_CODES[split], index])
    scene = scenes.make_scene(rng, generation.height, generation.width, generation.foreground)
    # Drawn after the scene, so that the scene does not depend on them.
    fnumber = generation.fnumbers[int(rng.integers(len(generation.fnumbers)))]
    focus = scenes.choose_focus(rng, scene, generation.focus)
    # control.blur_strength (strength * 2 / N) in float64: exactly `strength` at f/2, so that every
    # image size renders as before (float32's 0.06 is an ulp off in some heights' blur).
    strength = generation.strength * float(control.aperture_scale(fnumber))
    sharp, bokeh, depth = scenes.render_pair(scene, strength, focus)
    example = {'id': f'{split}_{index:05d}', 'sharp': _encode(sharp, 'JPEG'),
               'bokeh': _encode(bokeh, 'JPEG'), 'fnumber': np.float32(fnumber),
               'focus_disparity': np.float32(focus)}
    if with_depth:
        example['depth'] = _encode(depth, 'PNG')
    return example


class Builder(tfds.core.GeneratorBasedBuilder):
    """Synthetic bokeh pairs; no download needed."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release.'}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name='rgbd', description='Photo pairs with a half-resolution depth map.'),
        tfds.core.BuilderConfig(name='rgb', description='Photo pairs only.'),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = 'rgbd'

    def __init__(self, *, num_train: int = Generation.num_train,
                 num_validation: int = Generation.num_validation, height: int = Generation.height,
                 width: int = Generation.width, seed: int = Generation.seed,
                 strength: float = Generation.strength,
                 foreground: bool = Generation.foreground,
                 fnumbers: float | str | tuple | list = Generation.fnumbers,
                 focus: str = Generation.focus, **kwargs):
        """Builder arguments besides TFDS's own: the fields of `Generation`."""
        self.generation = Generation(num_train, num_validation, height, width, seed,
                                     float(strength), _flag(foreground), _fnumbers(fnumbers),
                                     str(focus))
        super().__init__(**kwargs)

    @property
    def with_depth(self) -> bool:
        return self.builder_config.name == 'rgbd'

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {**feature_spec(self.with_depth), **CONTROL_FEATURES}),
            disable_shuffling=True,  # keep scene order
            metadata=tfds.core.MetadataDict(self.generation.metadata()),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        return {'train': self._generate_examples('train', self.generation.num_train),
                'validation': self._generate_examples('validation',
                                                      self.generation.num_validation)}

    def _generate_examples(self, split: str, count: int):
        for index in range(count):
            example = make_example(self.generation, self.with_depth, split, index)
            yield example['id'], example
