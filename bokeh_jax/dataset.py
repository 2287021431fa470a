"""The prepared data set on disk: where it is, whether it is the one config.data asks for, and
random access to a split's records (images as encoded bytes), without the builders' code.

tfds_ebb.prepare builds the set with TFDS into <data_dir>/<name>/<builder_config>/<version>;
reading goes through `tfds.builder_from_directory(...).as_data_source(split)` (array_record,
examples parsed by TFDS's numpy parser, no TensorFlow).
"""

from collections.abc import Sequence
from typing import Any

from etils import epath
import ml_collections
import tensorflow_datasets as tfds

FILE_FORMAT = 'array_record'  # the random-access format grain reads (tfds_ebb.prepare builds it)
_IMAGE_KEYS = ('sharp', 'bokeh', 'depth')
# The synthetic_bokeh builder arguments that config.data.synthetic sets.
_SYNTHETIC_FIELDS = ('num_train', 'num_validation', 'height', 'width', 'seed')


def dataset_dir(data: ml_collections.ConfigDict) -> str:
    """The folder of the prepared data set `data.name`/`data.builder_config`.

    <data.data_dir or TFDS's default>/<name>/<builder_config>/<newest version with a
    dataset_info.json>: where TFDS builds it (tfds_ebb.prepare.prepare_dataset). Raises
    FileNotFoundError when the data set is not prepared there.
    """
    root = epath.Path(data.data_dir or tfds.core.constants.get_default_data_dir())
    folder = root / data.name / data.builder_config
    versions = []
    if folder.is_dir():
        versions = [tfds.core.Version(p.name) for p in folder.iterdir()
                    if tfds.core.Version.is_valid(p.name) and (p / 'dataset_info.json').exists()]
    if not versions:
        raise FileNotFoundError(
            f'{data.name}/{data.builder_config} is not prepared in {folder}; build it first '
            '(train and eval do: tfds_ebb.prepare.prepare_dataset)')
    return str(folder / str(max(versions)))


def dataset_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared data set that `data` names, read from its folder (no builder code needed)."""
    return tfds.builder_from_directory(dataset_dir(data))


def synthetic_settings(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """The synthetic_bokeh builder arguments that data.synthetic sets (its metadata.json keeps
    them)."""
    settings = {field: int(data.synthetic[field]) for field in _SYNTHETIC_FIELDS}
    # Absent from configs written before #22 (a workdir's saved config): the fixed look.
    fnumbers = data.synthetic.get('fnumbers', (2.0,))
    fnumbers = fnumbers if isinstance(fnumbers, (tuple, list)) else (fnumbers,)
    return {**settings, 'strength': float(data.synthetic.strength),
            'foreground': bool(data.synthetic.foreground),
            'fnumbers': [float(v) for v in fnumbers],  # a list, as metadata.json reads back
            'focus': str(data.synthetic.get('focus', 'subject'))}


def synthetic_differs(data: ml_collections.ConfigDict, metadata: dict[str, Any]) -> bool:
    """Whether a synthetic_bokeh set with `metadata` (its metadata.json) was generated with other
    settings than data.synthetic asks for."""
    wanted = synthetic_settings(data)
    return {k: metadata.get(k) for k in wanted} != wanted


def feature_names(data: ml_collections.ConfigDict) -> set[str]:
    """The features of the records of the prepared data set `data` names (e.g. 'fnumber')."""
    return set(dataset_builder(data).info.features)


class Source:
    """Random access to one split's records, opened lazily so that it pickles small (each grain
    worker process opens its own)."""

    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split = data_dir, split
        self._records = None

    def __getstate__(self) -> dict[str, str]:
        return {'data_dir': self.data_dir, 'split': self.split}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(**state)

    @property
    def records(self) -> Sequence[dict[str, Any]]:
        if self._records is None:
            builder = tfds.builder_from_directory(self.data_dir)
            decoders = {k: tfds.decode.SkipDecoding()
                        for k in _IMAGE_KEYS if k in builder.info.features}
            self._records = builder.as_data_source(self.split, decoders=decoders)
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


def source(data: ml_collections.ConfigDict, split: str) -> Source:
    """Split `split` of the prepared data set `data` names; raises when it is missing or stale."""
    builder = dataset_builder(data)
    if data.name == 'synthetic_bokeh' and synthetic_differs(data, builder.info.metadata):
        raise ValueError(f'{builder.data_dir} was generated with other settings than '
                         'config.data.synthetic; build it again (tfds_ebb.prepare.prepare_dataset)')
    if split not in builder.info.splits:
        raise ValueError(f'split {split!r} not in {data.name} '
                         f'(has {sorted(builder.info.splits)})')
    return Source(str(builder.data_dir), split)
