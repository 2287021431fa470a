"""EBB! (Everything is Better with Bokeh!) as a TFDS dataset, built from a manual download.

Features (identical in `synthetic_bokeh`; see tfds_ebb/README.md):
  id:    Text, the photo's file stem, e.g. "4400".
  sharp: Image uint8 [H, W, 3], the f/16 photo; the original JPEG bytes, not re-encoded.
  bokeh: Image uint8 [H, W, 3], the f/1.8 photo of the same scene; original JPEG bytes.
  depth: Image uint8 [H/2, W/2, 1] (+-1 pixel), 8-bit PNG, near = bright (config `rgbd` only).

Splits: `train` (pairs 0..4399 of the training folder), `val294` (pairs 4400..4693, the split
later papers report on) and, with the original code's layout, `test` (its `test/` folder).
Only non-empty splits are created. Records keep the id order (shuffling is disabled).

Every photo is fully decoded while building; problems raise `BadInput` naming the file, or,
with the builder argument `skip_bad=True`, are skipped and listed in the log and in the
dataset's metadata (`metadata.json`, key `skipped`). Non-RGB or non-JPEG photos and depth maps
that are not 8-bit grayscale PNGs are rejected, not converted, so that what is stored is
exactly what was downloaded.

No stale data sets: the builder records the manual folder's files it reads (relative name, size
and modification time of every photo and depth map; not their contents, which would mean reading
the whole download again on every reuse) in the dataset's metadata (key `manual_files`). Building
again over a prepared data set compares them with the folder and raises `StaleDataset`, saying
what was added, removed or changed and how to rebuild, instead of silently reusing it.

This module imports nothing from the rest of the project so that `tfds build tfds_ebb/ebb`
can load it on its own.
"""

import dataclasses
import io

from absl import logging
from etils import epath
from PIL import Image
import tensorflow_datasets as tfds

# EBB! training ids 0..4693; the last 294 are the "Val294" evaluation split of later papers.
NUM_TRAINING_PAIRS = 4694
FIRST_VAL294_ID = 4400
_PHOTO_SUFFIXES = ('.jpg', '.jpeg')
_DEPTH_SUFFIX = '.png'
_MAX_LISTED = 20  # problems listed in one error message

_DESCRIPTION = """\
EBB! (Everything is Better with Bokeh!, Ignatov et al., CVPR-W 2020): aligned pairs of photos
taken with a Canon 7D and a 50 mm lens at f/16 (sharp, `sharp`) and f/1.8 (shallow depth of
field, `bokeh`), plus an optional 8-bit depth map at half resolution (`depth`, near = bright).
"""

_CITATION = """\
@inproceedings{ignatov2020rendering,
  title={Rendering Natural Camera Bokeh Effect with Deep Learning},
  author={Ignatov, Andrey and Patel, Jagruti and Timofte, Radu},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition Workshops},
  year={2020}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
EBB! cannot be downloaded automatically. Put it into `manual_dir` (`--manual_dir=DIR` of
`tfds build`, or `config.data.manual_dir`) in one of these two layouts:

1. The AIM 2020 release (register at https://competitions.codalab.org/competitions/24716 or
   see https://people.ee.ethz.ch/~ihnatova/pynet-bokeh.html and unpack the training archive):
     DIR/Training/original/<i>.jpg   sharp photos, i = 0..4693
     DIR/Training/bokeh/<i>.jpg      bokeh photos
     DIR/Training/original_depth/<i>.png   depth maps (config `rgbd` only; see below), or any
       folder given by the builder argument `depth_dir` (absolute, or relative to DIR):
       tfds.builder('ebb', config='rgbd', depth_dir='/x'), config.data.depth_dir, or
       tfds build ebb/rgbd/depth_dir=/x --imports=tfds_ebb --manual_dir=DIR (project installed)

2. The layout of the original PyNET-Bokeh code:
     DIR/train/{original,bokeh,original_depth}/<i>.jpg|png   (ids 0..4693 as above)
     DIR/test/{original,bokeh,original_depth}/<name>.jpg|png (optional; becomes split `test`)

The release ships no depth maps. The paper made them with MegaDepth
(https://github.com/zl548/MegaDepth): run it on every `original/<i>.jpg`, resize its output to
half the photo size, invert it if needed so that near = bright, stretch each map to 0..255 and
save it as an 8-bit grayscale PNG `<i>.png` (bokeh_jax.image_ops.normalize_depth does the
resizing and stretching for a map of any resolution). Without depth maps build config `rgb`.
"""


class BadInput(ValueError):
    """A file of the manual download cannot be used; the message names it."""


class StaleDataset(BadInput):
    """The prepared data set was built from other files than the manual folder holds now."""


FINGERPRINT_KEY = 'manual_files'


def manual_files(manual_dir: epath.Path, depth_dir: str, with_depth: bool
                 ) -> dict[str, list[int]]:
    """{name: [size in bytes, mtime in seconds]} of the photos and depth maps the builder reads.

    Names are relative to `manual_dir` (absolute for a `depth_dir` outside it).
    """
    files = {}
    for folder in find_folders(manual_dir, depth_dir, with_depth):
        for sub, suffixes in ((folder.original, _PHOTO_SUFFIXES), (folder.bokeh, _PHOTO_SUFFIXES),
                              (folder.depth, (_DEPTH_SUFFIX,))):
            if sub is None:
                continue
            for path in sub.iterdir():
                if path.name.startswith('.') or path.suffix.lower() not in suffixes:
                    continue
                try:
                    name = str(path.relative_to(manual_dir))
                except ValueError:
                    name = str(path)
                files[name] = size_and_mtime(path)
    return files


def size_and_mtime(path: epath.Path) -> list[int]:
    """[bytes, modification time in whole seconds] (epath's stat, which works for gs:// too)."""
    stat = path.stat()
    return [int(stat.length), int(stat.mtime)]


def compare_files(recorded: dict[str, list[int]], current: dict[str, list[int]]) -> str:
    """'' when equal, else 'N added (a, b, ...), M removed (...), K changed (...)'."""
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    changed = sorted(k for k in set(current) & set(recorded)
                     if list(current[k]) != list(recorded[k]))
    parts = []
    for what, names in (('added', added), ('removed', removed), ('changed', changed)):
        if names:
            listed = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
            parts.append(f'{len(names)} file(s) {what} ({listed})')
    return '; '.join(parts)


def feature_spec(with_depth: bool) -> tfds.features.FeaturesDict:
    """The features shared by `ebb` and `synthetic_bokeh` (module docstring)."""
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


@dataclasses.dataclass(frozen=True)
class _Folder:
    """One folder of pairs: `name` is 'Training', 'train' or 'test'."""
    name: str
    original: epath.Path
    bokeh: epath.Path
    depth: epath.Path | None


def find_folders(manual_dir: epath.Path, depth_dir: str, with_depth: bool) -> list[_Folder]:
    """The folders of pairs in `manual_dir`, in either supported layout (see the instructions)."""
    aim, pynet = manual_dir / 'Training', manual_dir / 'train'
    if aim.exists() and pynet.exists():
        raise BadInput(f'{manual_dir}: holds both Training/ (AIM 2020 layout) and train/ '
                       '(original code layout); keep one')
    if aim.exists():
        names = [('Training', aim)]
    elif pynet.exists():
        names = [('train', pynet)] + ([('test', manual_dir / 'test')]
                                      if (manual_dir / 'test').exists() else [])
    else:
        found = sorted(p.name for p in manual_dir.iterdir()) if manual_dir.exists() else []
        raise BadInput(f'{manual_dir}: expected Training/original and Training/bokeh (AIM 2020 '
                       f'release) or train/original and train/bokeh (original code); found '
                       f'{found}.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    folders = []
    for name, root in names:
        depth = None
        if with_depth:
            depth = root / 'original_depth'
            if depth_dir and name != 'test':
                depth = epath.Path(depth_dir)
                depth = depth if depth.is_absolute() else manual_dir / depth
        for path in (root / 'original', root / 'bokeh') + ((depth,) if depth else ()):
            if not path.is_dir():
                hint = (' (config `rgbd` needs depth maps; see the instructions, or build config '
                        '`rgb`)') if path == depth else ''
                raise BadInput(f'{path}: folder not found{hint}')
        folders.append(_Folder(name, root / 'original', root / 'bokeh', depth))
    return folders


def _list_files(folder: epath.Path, suffixes: tuple[str, ...]) -> dict[str, epath.Path]:
    """{stem: path} of the files with `suffixes` in `folder` (hidden files are ignored)."""
    files, other = {}, []
    for path in sorted(folder.iterdir()):
        if path.name.startswith('.'):
            continue
        if path.suffix.lower() not in suffixes:
            other.append(path.name)
            continue
        if path.stem in files:
            raise BadInput(f'{path}: same id as {files[path.stem]}')
        files[path.stem] = path
    if other:
        logging.warning('%s: ignoring %d file(s) that are not %s: %s', folder, len(other),
                        '/'.join(suffixes), other[:_MAX_LISTED])
    return files


def _raise_or_skip(problems: dict[str, str], skip_bad: bool, skipped: dict[str, str]) -> None:
    """Raises one BadInput listing `problems` ({id: message}), or records them as skipped."""
    if not problems:
        return
    if skip_bad:
        skipped.update(problems)
        return
    listed = '\n  '.join(list(problems.values())[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    raise BadInput(f'{len(problems)} problem(s) in the EBB! folder:\n  {listed}'
                   + (f'\n  ... and {more} more' if more > 0 else '')
                   + '\n(build with the builder argument skip_bad=True to skip these pairs)')


def pair_ids(folder: _Folder, skip_bad: bool, skipped: dict[str, str]
             ) -> dict[str, tuple[epath.Path, epath.Path, epath.Path | None]]:
    """{id: (sharp, bokeh, depth or None)} of the complete pairs in `folder`."""
    originals = _list_files(folder.original, _PHOTO_SUFFIXES)
    bokehs = _list_files(folder.bokeh, _PHOTO_SUFFIXES)
    depths = _list_files(folder.depth, (_DEPTH_SUFFIX,)) if folder.depth else {}
    problems = {}
    for stem, path in originals.items():
        if stem not in bokehs:
            problems[stem] = f'{path}: no bokeh photo {folder.bokeh / stem}.jpg'
        elif folder.depth and stem not in depths:
            problems[stem] = f'{path}: no depth map {folder.depth / stem}{_DEPTH_SUFFIX}'
    for stem, path in bokehs.items():
        if stem not in originals:
            problems[stem] = f'{path}: no sharp photo {folder.original / stem}.jpg'
    if folder.name != 'test':
        for stem, path in originals.items():
            if not (stem.isdigit() and int(stem) < NUM_TRAINING_PAIRS):
                problems[stem] = (f'{path}: EBB! training photos are named 0..'
                                  f'{NUM_TRAINING_PAIRS - 1}.jpg; {stem!r} fits no split')
    _raise_or_skip(problems, skip_bad, skipped)
    return {stem: (originals[stem], bokehs[stem], depths.get(stem))
            for stem in sorted(originals, key=lambda s: (len(s), s)) if stem not in problems}


def read_photo(path: epath.Path) -> tuple[bytes, tuple[int, int]]:
    """The bytes and (height, width) of an RGB JPEG, fully decoded once to validate it."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes everything: a truncated file raises here
            fmt, mode, (width, height) = image.format, image.mode, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f'{path}: unreadable or truncated image ({e})') from e
    if fmt != 'JPEG':
        raise BadInput(f'{path}: expected a JPEG photo, found {fmt}')
    if mode != 'RGB':
        raise BadInput(f'{path}: photo is {mode}, expected RGB (grayscale, CMYK and alpha photos '
                       'are rejected rather than converted; convert it to an RGB JPEG yourself)')
    return data, (height, width)


def read_depth(path: epath.Path, photo_hw: tuple[int, int]) -> bytes:
    """The bytes of an 8-bit grayscale PNG depth map of half the photo size (+-1 pixel)."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt, mode, (width, height) = image.format, image.mode, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f'{path}: unreadable or truncated depth map ({e})') from e
    if fmt != 'PNG' or mode != 'L':
        raise BadInput(f'{path}: depth map is {fmt} mode {mode}, expected an 8-bit grayscale PNG '
                       '(mode L)')
    for axis, d, p in (('height', height, photo_hw[0]), ('width', width, photo_hw[1])):
        if abs(2 * d - p) > 2:
            raise BadInput(f'{path}: depth map is {height}x{width} but the photo is '
                           f'{photo_hw[0]}x{photo_hw[1]}; its {axis} must be half the photo '
                           f'{axis} ({p / 2:g}, +-1 pixel)')
    return data


def read_pair(stem: str, sharp: epath.Path, bokeh: epath.Path, depth: epath.Path | None
              ) -> dict[str, str | bytes]:
    """One validated example (the feature dict of the module docstring)."""
    sharp_bytes, sharp_hw = read_photo(sharp)
    bokeh_bytes, bokeh_hw = read_photo(bokeh)
    if sharp_hw != bokeh_hw:
        raise BadInput(f'{bokeh}: bokeh photo is {bokeh_hw[0]}x{bokeh_hw[1]} but the sharp photo '
                       f'{sharp} is {sharp_hw[0]}x{sharp_hw[1]}')
    example = {'id': stem, 'sharp': sharp_bytes, 'bokeh': bokeh_bytes}
    if depth is not None:
        example['depth'] = read_depth(depth, sharp_hw)
    return example


class CheckedManualFolder:
    """Mixin of builders from a manual folder: a prepared data set is reused only if the folder
    still holds the files it was built from.

    The builder records `self.fingerprint(manual_dir)` ({name: [size, mtime]} of every file it
    reads) in its metadata under FINGERPRINT_KEY while building; building again compares.
    """

    def fingerprint(self, manual_dir: epath.Path) -> dict[str, list[int]]:
        raise NotImplementedError

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        """TFDS's, but a prepared data set is reused only if the manual folder is unchanged."""
        mode = download_config.download_mode if download_config else None
        if self.data_path.exists() and not (mode and mode.overwrite_dataset):
            manual_dir = (download_config and download_config.manual_dir) or epath.Path(
                download_dir or self.data_dir_root / 'downloads') / 'manual'
            self.check_up_to_date(epath.Path(manual_dir))
        super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                     **kwargs)

    def check_up_to_date(self, manual_dir: epath.Path) -> None:
        """Raises StaleDataset when the prepared data set was built from other files than
        `manual_dir` holds now (data sets without a record, or without the folder, pass)."""
        recorded = self.info.metadata.get(FINGERPRINT_KEY) if self.info.metadata else None
        if recorded is None or not manual_dir.exists():
            return
        try:
            current = self.fingerprint(manual_dir)
        except BadInput:
            return  # the folder is no longer usable: keep using what was built from it
        difference = compare_files(recorded, current)
        if difference:
            raise StaleDataset(
                f'{self.data_dir} was built from other files than {manual_dir} holds now: '
                f'{difference}. Rebuild it: delete {self.data_dir} (or pass --overwrite to '
                f'tfds_ebb/build.py, or bump the builder VERSION); it is not reused silently')


class RgbdConfigs:
    """Mixin of builders of photo pairs with configs 'rgbd' (with a depth map) and 'rgb': their
    DatasetInfo from the class's DESCRIPTION, HOMEPAGE, CITATION and `feature_spec`. Examples keep
    the order the builder yields them in (evaluation reads images in order)."""

    DESCRIPTION = HOMEPAGE = CITATION = ''

    @property
    def with_depth(self) -> bool:
        return self.builder_config.name == 'rgbd'

    def feature_spec(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION, features=self.feature_spec(), homepage=self.HOMEPAGE,
            citation=self.CITATION, disable_shuffling=True, metadata=tfds.core.MetadataDict())


class Builder(RgbdConfigs, CheckedManualFolder, tfds.core.GeneratorBasedBuilder):
    """EBB! from a manually downloaded folder (see MANUAL_DOWNLOAD_INSTRUCTIONS)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release: rgbd and rgb configs, train/val294/test splits.'}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name='rgbd', description='Photo pairs with an 8-bit half-resolution depth map.'),
        tfds.core.BuilderConfig(
            name='rgb', description='Photo pairs only, for users without depth maps.'),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = 'rgbd'
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    DESCRIPTION, CITATION = _DESCRIPTION, _CITATION
    HOMEPAGE = 'https://people.ee.ethz.ch/~ihnatova/pynet-bokeh.html'

    def __init__(self, *, depth_dir: str = '', skip_bad: bool = False, **kwargs):
        """Builder arguments besides TFDS's own (`config`, `data_dir`, `file_format`, ...).

        Args:
          depth_dir: folder with the training photos' depth maps `<id>.png`, absolute or
            relative to the manual dir; '' = the layout's `original_depth/` folder.
          skip_bad: skip pairs with a problem, listing them, instead of stopping at the first.
        """
        self.depth_dir = depth_dir
        self.skip_bad = skip_bad
        super().__init__(**kwargs)

    def feature_spec(self) -> tfds.features.FeaturesDict:
        return feature_spec(self.with_depth)

    def fingerprint(self, manual_dir: epath.Path) -> dict[str, list[int]]:
        return manual_files(manual_dir, self.depth_dir, self.with_depth)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        skipped = {}
        splits = {}
        for folder in find_folders(epath.Path(dl_manager.manual_dir), self.depth_dir,
                                   self.with_depth):
            pairs = pair_ids(folder, self.skip_bad, skipped)
            if folder.name == 'test':
                splits['test'] = pairs
            else:
                splits['train'] = {k: v for k, v in pairs.items() if int(k) < FIRST_VAL294_ID}
                splits['val294'] = {k: v for k, v in pairs.items() if int(k) >= FIRST_VAL294_ID}
        if skipped:
            logging.warning('EBB! skip_bad: skipping %d incomplete pair(s): %s', len(skipped),
                            skipped)
        self.info.metadata['skipped'] = skipped
        self.info.metadata[FINGERPRINT_KEY] = manual_files(
            epath.Path(dl_manager.manual_dir), self.depth_dir, self.with_depth)
        for name in [name for name, pairs in splits.items() if not pairs]:
            logging.warning('EBB!: no pairs for split %r; it is not created', name)
            del splits[name]
        if not splits:
            raise BadInput(f'{dl_manager.manual_dir}: no usable photo pairs found')
        logging.info('EBB! splits: %s', {k: len(v) for k, v in splits.items()})
        return {name: self._generate_examples(name, pairs) for name, pairs in splits.items()}

    def _generate_examples(self, split: str, pairs):
        skipped = {}
        for stem, paths in pairs.items():
            try:
                example = read_pair(stem, *paths)
            except BadInput as e:
                if not self.skip_bad:
                    raise
                skipped[stem] = str(e)
                continue
            yield stem, example
        if skipped:
            logging.warning('EBB! skip_bad: skipped %d pair(s) of split %s: %s', len(skipped),
                            split, skipped)
            self.info.metadata['skipped'].update(skipped)
