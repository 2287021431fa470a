"""RealBokeh (Bokehlicious, ICCV 2025) as a TFDS dataset, built from a manual download.

RealBokeh photographs each scene at f/22 (the input) and at up to 19 f-numbers from f/2.0 to
f/20 (the targets). One example per (scene, target f-number); the features are those of `ebb`
(tfds_ebb/README.md), so every stage of bokeh_jax reads it unchanged, plus the apertures:
  id:             Text, the target's file stem, e.g. "0012_f2.8".
  scene:          Text, the scene id, e.g. "0012".
  sharp:          Image uint8 [H, W, 3], the f/22 photo; the original JPEG bytes.
  bokeh:          Image uint8 [H, W, 3], the same scene at f/`fnumber`; original JPEG bytes.
  depth:          Image uint8 [H/2, W/2, 1], 8-bit PNG, near = bright (config `rgbd` only): the
                  release has no depth, so MegaDepth estimates it from `sharp` while building
                  (bokeh_jax/depth_maps.py, EBB!'s convention), once per scene.
  fnumber:        float32, the target's f-number (from the metadata's `target_avs`).
  source_fnumber: float32, the input's (the metadata's `source_av`, else the file name's).
  focal_length, focus_plane_distance: float32, as the metadata gives them (NaN where absent).
Splits: `train`, `validation`, `test`, those whose folder exists. Records are in (scene,
f-number) order (shuffling is disabled).

Every file is checked while building; a problem stops the build with BadInput naming the file
(all problems of the folder listing are reported at once): a scene's input without metadata or
metadata without input, a target folder of a scene with no input, an f-number in `target_avs`
with no image, an unreadable metadata file, a corrupt or non-RGB JPEG, a target whose size is not
the input's. Target images that the metadata does not list are not used; they are logged and
kept in the dataset's metadata (`unlisted`). As for `ebb`, the files read (and, for `rgbd`, the
weights file and the working size) are recorded, and a prepared set built from other files is
not reused (StaleDataset).
"""

import dataclasses
import io
import json
import math
import os
import re

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# bokeh_jax and tfds_ebb are installed packages (`pip install -e .`), also when `tfds build`
# loads this file by path.
from bokeh_jax import control
from bokeh_jax import depth_maps
from bokeh_jax import image_io
from tfds_ebb.ebb import ebb_dataset_builder as ebb

BadInput = ebb.BadInput
StaleDataset = ebb.StaleDataset

SPLITS = ('train', 'validation', 'test')
_PHOTO_SUFFIXES = ('.jpg', '.jpeg')
# <scene>_f<N>: N as the release writes it (2.0, 2.8, 20, 22), or without the '.0'.
_NAME = re.compile(r'^(?P<scene>.+)_f(?P<fnumber>\d+(?:\.\d+)?)$')
_MAX_LISTED = 20  # problems listed in one error message

_DESCRIPTION = """\
RealBokeh (Seizinger et al., ICCV 2025): real photos of each scene taken at f/22 (sharp input)
and at up to 19 f-numbers from f/2.0 to f/20 (targets), with per-scene metadata (focal length,
focus distance). One example per scene and target f-number; config `rgbd` adds a MegaDepth
depth map of the input, estimated while building.
"""

_CITATION = """\
@inproceedings{seizinger2025bokehlicious,
  title={Bokehlicious: Photorealistic Bokeh Rendering with Controllable Apertures},
  author={Seizinger, Tim and Vasluianu, Florin-Alexandru and Conde, Marcos V. and Wu, Zongwei
          and Timofte, Radu},
  booktitle={IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2025}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
RealBokeh cannot be downloaded automatically (about 21 GB; licence CC BY-NC-SA, see the release).
Download the authors' release from https://huggingface.co/datasets/timseizinger/RealBokeh_3MP,
e.g. `huggingface-cli download timseizinger/RealBokeh_3MP --repo-type dataset --local-dir DIR`,
and give its folder as `manual_dir` (`--manual_dir=DIR` of `tfds build`, or
`config.data.manual_dir`). The builder reads, for each split folder present (train, validation,
test):
  DIR/<split>/in/<id>_f22.JPG           the f/22 input of scene <id>
  DIR/<split>/gt/<id>/<id>_f<N>.JPG     its targets (N written 2.0 or 2, 2.8, 20, ...)
  DIR/<split>/metadata/<id>.json        source_av, target_avs (the targets' f-numbers),
                                        focal_length, focus_plane_distance
Config `rgbd` estimates depth maps with MegaDepth while building: pass the released weights
best_generalization_net_G.pth (https://github.com/zl548/MegaDepth) as the builder argument
`megadepth_weights` (config.data.megadepth_weights). Without them, build config `rgb`.
"""


@dataclasses.dataclass(frozen=True)
class Scene:
    """One scene of a split: its input photo, targets {f-number: path} and metadata."""
    scene: str
    photo: epath.Path
    targets: dict[float, epath.Path]
    source_fnumber: float
    focal_length: float
    focus_plane_distance: float


def parse_name(path: epath.Path) -> tuple[str, float] | None:
    """'<scene>_f<N>.JPG' -> (scene, N); None for other names."""
    match = _NAME.match(path.stem)
    if not match:
        return None
    return match['scene'], float(match['fnumber'])


def _key(fnumber: float) -> float:
    """f-numbers as compared: 2, 2.0 and 2.00 are one aperture."""
    return round(float(fnumber), 2)


def _photos(folder: epath.Path) -> list[epath.Path]:
    """The JPEG files of `folder` (hidden files ignored; other files logged)."""
    photos, other = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith('.') or path.is_dir():
            continue
        (photos if path.suffix.lower() in _PHOTO_SUFFIXES else other).append(path)
    if other:
        logging.warning('%s: ignoring %d file(s) that are not JPEG photos: %s', folder,
                        len(other), [p.name for p in other[:_MAX_LISTED]])
    return photos


def _number(metadata: dict, key: str) -> float:
    """metadata[key] as a float; NaN when absent or null."""
    value = metadata.get(key)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{key} must be a number, got {value!r}')
    return float(value)


def read_metadata(path: epath.Path, input_fnumber: float
                  ) -> tuple[list[float], float, float, float]:
    """(target f-numbers, source f-number, focal length, focus plane distance) of one scene's
    metadata file; BadInput names the file and the field. The source f-number is `source_av`,
    or without it the input photo's (`input_fnumber`, from its name)."""
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f'{path}: unreadable metadata file ({e})') from None
    try:
        if not isinstance(metadata, dict):
            raise ValueError(f'expected a JSON object, found {type(metadata).__name__}')
        avs = metadata.get('target_avs')
        if not isinstance(avs, list) or not avs:
            raise ValueError(f'target_avs must be a non-empty list of f-numbers, got {avs!r}')
        targets = [control.check_fnumber(v, f'target_avs[{i}]') for i, v in enumerate(avs)]
        keys = [_key(v) for v in targets]
        if len(set(keys)) < len(keys):
            repeated = next(v for i, v in enumerate(targets) if keys.index(keys[i]) != i)
            raise ValueError(f'target_avs lists f/{repeated:g} more than once')
        source = input_fnumber
        if metadata.get('source_av') is not None:
            source = control.check_fnumber(metadata['source_av'], 'source_av')
        return (targets, source, _number(metadata, 'focal_length'),
                _number(metadata, 'focus_plane_distance'))
    except ValueError as e:
        raise BadInput(f'{path}: {e}') from None


def _raise(problems: list[str]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise BadInput(problems[0])
    more = len(problems) - _MAX_LISTED
    raise BadInput(f'{len(problems)} problems in the RealBokeh folder:\n  '
                   + '\n  '.join(problems[:_MAX_LISTED])
                   + (f'\n  ... and {more} more' if more > 0 else ''))


def split_folders(manual_dir: epath.Path) -> dict[str, epath.Path]:
    """{split: folder} of the split folders in `manual_dir`; BadInput when there are none."""
    folders = {name: manual_dir / name for name in SPLITS if (manual_dir / name).is_dir()}
    if not folders:
        found = sorted(p.name for p in manual_dir.iterdir()) if manual_dir.is_dir() else []
        raise BadInput(f'{manual_dir}: expected RealBokeh split folders {list(SPLITS)} (each with '
                       f'in/, gt/ and metadata/), found {found}.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    for folder in folders.values():
        for sub in ('in', 'gt', 'metadata'):
            if not (folder / sub).is_dir():
                raise BadInput(f'{folder / sub}: folder not found (a RealBokeh split folder holds '
                               'in/, gt/ and metadata/)')
    return folders


def scenes(folder: epath.Path, unlisted: list[str]) -> list[Scene]:
    """The scenes of one split folder, checked against each other (see the module docstring).

    Target images the metadata does not list are appended to `unlisted`.
    """
    problems = []
    inputs: dict[str, tuple[epath.Path, float]] = {}
    for path in _photos(folder / 'in'):
        parsed = parse_name(path)
        if parsed is None:
            problems.append(f'{path}: expected an input photo named <id>_f<N>.JPG (e.g. '
                            '0012_f22.JPG)')
        elif parsed[0] in inputs:
            problems.append(f'{path}: a second input photo of scene {parsed[0]} (first '
                            f'{inputs[parsed[0]][0].name})')
        else:
            inputs[parsed[0]] = (path, parsed[1])
    metadata = {p.stem: p for p in sorted((folder / 'metadata').iterdir())
                if p.suffix.lower() == '.json' and not p.name.startswith('.')}
    for scene, path in metadata.items():
        if scene not in inputs:
            problems.append(f'{path}: scene {scene} has no input photo '
                            f'{folder / "in" / scene}_f22.JPG')
    gt: dict[str, dict[float, epath.Path]] = {}
    for scene_dir in sorted((folder / 'gt').iterdir()):
        if not scene_dir.is_dir() or scene_dir.name.startswith('.'):
            continue
        for path in _photos(scene_dir):
            parsed = parse_name(path)
            if scene_dir.name not in inputs:
                problems.append(f'{path}: target of scene {scene_dir.name}, which has no input '
                                f'photo in {folder / "in"}')
                break
            if parsed is None or parsed[0] != scene_dir.name:
                problems.append(f'{path}: expected a target named {scene_dir.name}_f<N>.JPG')
            elif _key(parsed[1]) in gt.setdefault(scene_dir.name, {}):
                problems.append(f'{path}: same f-number as '
                                f'{gt[scene_dir.name][_key(parsed[1])].name}')
            else:
                gt[scene_dir.name][_key(parsed[1])] = path
    found = []
    for scene in sorted(inputs, key=lambda s: (len(s), s)):
        photo, input_fnumber = inputs[scene]
        if scene not in metadata:
            problems.append(f'{photo}: no metadata file {folder / "metadata" / scene}.json')
            continue
        try:
            avs, source, focal_length, distance = read_metadata(metadata[scene], input_fnumber)
        except BadInput as e:
            problems.append(str(e))
            continue
        images = gt.get(scene, {})
        targets = {}
        for fnumber in sorted(avs):
            if _key(fnumber) in images:
                targets[fnumber] = images[_key(fnumber)]
            else:
                problems.append(f'{metadata[scene]}: lists f/{fnumber:g} in target_avs but '
                                f'there is no {folder / "gt" / scene / scene}_f{fnumber:g}.JPG')
        listed = {_key(v) for v in avs}
        unlisted.extend(str(p) for k, p in images.items() if k not in listed)
        found.append(Scene(scene, photo, targets, source, focal_length, distance))
    _raise(problems)
    return found


def manual_files(manual_dir: epath.Path) -> dict[str, list[int]]:
    """{name relative to manual_dir: [size, mtime]} of the photos and metadata files read."""
    files, manual_dir = {}, epath.Path(manual_dir)
    for folder in split_folders(manual_dir).values():
        paths = _photos(folder / 'in') + [
            p for p in (folder / 'metadata').iterdir() if p.suffix.lower() == '.json']
        paths += [p for d in (folder / 'gt').iterdir() if d.is_dir() for p in _photos(d)]
        for path in paths:
            files[str(path.relative_to(manual_dir))] = ebb.size_and_mtime(path)
    return files


def feature_spec(with_depth: bool) -> tfds.features.FeaturesDict:
    """`ebb`'s features (module docstring) and the apertures."""
    features = {
        'id': tfds.features.Text(doc="The target's file stem, e.g. 0012_f2.8."),
        'scene': tfds.features.Text(doc='The scene id (the metadata file stem).'),
        'sharp': tfds.features.Image(
            shape=(None, None, 3), encoding_format='jpeg',
            doc='The f/22 input photo, uint8 RGB, original JPEG bytes.'),
        'bokeh': tfds.features.Image(
            shape=(None, None, 3), encoding_format='jpeg',
            doc='The same scene at f/`fnumber`, same size, original JPEG bytes.'),
        'fnumber': tfds.features.Scalar(np.float32, doc="The target's f-number."),
        'source_fnumber': tfds.features.Scalar(np.float32, doc="The input's f-number (22)."),
        'focal_length': tfds.features.Scalar(
            np.float32, doc='Focal length (mm) from the metadata; NaN if absent.'),
        'focus_plane_distance': tfds.features.Scalar(
            np.float32, doc='Focus distance from the metadata; NaN if absent.'),
    }
    if with_depth:
        features['depth'] = tfds.features.Image(
            shape=(None, None, 1), encoding_format='png',
            doc="MegaDepth's depth of `sharp` at half its size (+-1 px), 8-bit, near = bright.")
    return tfds.features.FeaturesDict(features)


def _png(depth: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(depth, mode='L').save(buffer, 'PNG')
    return buffer.getvalue()


class Builder(ebb.RgbdConfigs, ebb.CheckedManualFolder, tfds.core.GeneratorBasedBuilder):
    """RealBokeh from a manually downloaded folder (see MANUAL_DOWNLOAD_INSTRUCTIONS)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release: rgb and rgbd (MegaDepth at build time) configs.'}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name='rgbd', description='Photo pairs with a MegaDepth depth map of the input.'),
        tfds.core.BuilderConfig(name='rgb', description='Photo pairs only.'),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = 'rgbd'
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    DESCRIPTION, CITATION = _DESCRIPTION, _CITATION
    HOMEPAGE = 'https://timseizinger.github.io/BokehliciousProjectPage/'

    def __init__(self, *, megadepth_weights: str = '', depth_working_size: str = '384x512',
                 **kwargs):
        """Builder arguments besides TFDS's own (`config`, `data_dir`, `file_format`, ...).

        Args:
          megadepth_weights: config `rgbd`: MegaDepth's best_generalization_net_G.pth (or a state
            dict of its layout), read without PyTorch.
          depth_working_size: MegaDepth's input size HxW for landscape photos (turned for
            portrait ones), multiples of 16; the demo's 384x512 as for `launch.py --mode=depth`.
        """
        self.megadepth_weights = str(megadepth_weights)
        self.depth_working_size = str(depth_working_size)
        super().__init__(**kwargs)

    def feature_spec(self) -> tfds.features.FeaturesDict:
        return feature_spec(self.with_depth)

    def _weights(self) -> epath.Path:
        if not self.megadepth_weights:
            raise BadInput('realbokeh/rgbd makes depth maps with MegaDepth while building: pass '
                           'the builder argument megadepth_weights=PATH of '
                           'best_generalization_net_G.pth (config.data.megadepth_weights), or '
                           'build config rgb')
        return epath.Path(os.path.abspath(self.megadepth_weights))

    def fingerprint(self, manual_dir: epath.Path) -> dict[str, list[int]]:
        """The files read (ebb.CheckedManualFolder); for rgbd also the weights file, under a name
        that carries the working size, since both determine the depth maps."""
        files = manual_files(manual_dir)
        if self.with_depth:
            weights = self._weights()
            if not weights.is_file():
                raise BadInput(f'{weights}: no such file (megadepth_weights)')
            files[f'{weights} (MegaDepth at {self.depth_working_size})'] = (
                ebb.size_and_mtime(weights))
        return files

    def _estimator(self) -> depth_maps.Estimator | None:
        if not self.with_depth:
            return None
        try:
            size = depth_maps.parse_size(self.depth_working_size, 'depth_working_size')
            return depth_maps.Estimator(depth_maps.read_weights(str(self._weights())), size)
        except depth_maps.DepthError as e:
            raise BadInput(str(e)) from None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = epath.Path(dl_manager.manual_dir)
        estimator = self._estimator()
        unlisted: list[str] = []
        splits = {name: scenes(folder, unlisted)
                  for name, folder in split_folders(manual_dir).items()}
        if unlisted:
            logging.warning('RealBokeh: %d target image(s) not listed in their metadata are not '
                            'used: %s', len(unlisted), unlisted[:_MAX_LISTED])
        self.info.metadata['unlisted'] = unlisted
        self.info.metadata[ebb.FINGERPRINT_KEY] = self.fingerprint(manual_dir)
        for name in [name for name, found in splits.items() if not found]:
            logging.warning('RealBokeh: no scenes in split %r; it is not created', name)
            del splits[name]
        if not splits:
            raise BadInput(f'{manual_dir}: no RealBokeh scenes found')
        logging.info('RealBokeh splits (scenes): %s', {k: len(v) for k, v in splits.items()})
        return {name: self._generate_examples(found, estimator)
                for name, found in splits.items()}

    def _generate_examples(self, found: list[Scene], estimator: depth_maps.Estimator | None):
        for scene in found:
            photo, photo_hw = ebb.read_photo(scene.photo)
            common = {'scene': scene.scene, 'sharp': photo,
                      'source_fnumber': scene.source_fnumber,
                      'focal_length': scene.focal_length,
                      'focus_plane_distance': scene.focus_plane_distance}
            if estimator is not None:
                common['depth'] = _png(estimator(image_io.decode(photo, str(scene.photo))))
            for fnumber, path in scene.targets.items():
                target, target_hw = ebb.read_photo(path)
                if target_hw != photo_hw:
                    raise BadInput(f'{path}: target is {target_hw[0]}x{target_hw[1]} but the '
                                   f'input {scene.photo} is {photo_hw[0]}x{photo_hw[1]}')
                yield path.stem, {**common, 'id': path.stem, 'bokeh': target,
                                  'fnumber': fnumber}
