"""Building the data set that a bokeh_jax config names (`config.data`), unless it is on disk.

bokeh_jax reads a prepared data set from its folder (bokeh_jax.dataset.dataset_dir) and
never imports the builders; the training loop and `launch.py --mode=eval` call
`prepare_dataset_once` first. From the command line:

    python -m tfds_ebb.prepare --config=configs/default.py:tiny
"""

from collections.abc import Iterator, Sequence
import contextlib
import fcntl
import pathlib
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import tensorflow_datasets as tfds

from bokeh_jax import dataset
from bokeh_jax.errors import UserError
from tfds_ebb.ebb import ebb_dataset_builder
from tfds_ebb.realbokeh import realbokeh_dataset_builder
from tfds_ebb.synthetic_bokeh import synthetic_bokeh_dataset_builder  # registers the builder

# The builders that read config.data.manual_dir, and what they tell a user without one.
_MANUAL = {'ebb': ebb_dataset_builder, 'realbokeh': realbokeh_dataset_builder}


def builder_kwargs(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """Builder arguments (besides config, data_dir, file_format) from `config.data`."""
    if data.name == 'synthetic_bokeh':
        return dataset.synthetic_settings(data)
    if data.name == 'ebb':
        return {'depth_dir': data.depth_dir, 'skip_bad': bool(data.skip_bad)}
    if data.name == 'realbokeh':
        return {'megadepth_weights': data.megadepth_weights}
    raise ValueError(f"config.data.name must be 'ebb', 'synthetic_bokeh' or 'realbokeh', got "
                     f"{data.name!r}")


def dataset_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder that `config.data` describes (nothing is built)."""
    return tfds.builder(data.name, config=data.builder_config, data_dir=data.data_dir or None,
                        file_format=dataset.FILE_FORMAT, **builder_kwargs(data))


def prepare_dataset(data: ml_collections.ConfigDict) -> None:
    """Builds the data set `config.data` names into data.data_dir (array_record) unless present.

    `synthetic_bokeh` is generated on the spot; if the copy on disk was generated with other
    `config.data.synthetic` settings (or by another generator version), it is regenerated (it is
    a pure function of them). `ebb` and `realbokeh` need the download in
    `config.data.manual_dir`; a problem with it (the builder's BadInput) is a UserError. Processes
    that call this at the same time on one machine (or a shared file system with POSIX locks)
    build once: the others wait on a lock file next to the data set and then find it prepared.
    """
    with _build_lock(dataset_builder(data).data_path):
        builder = dataset_builder(data)  # what is on disk now that we hold the lock
        if builder.is_prepared():
            _check_prepared(data, builder)
            if data.name in _MANUAL and data.manual_dir:
                _check_up_to_date(builder, data)
            if not (data.name == 'synthetic_bokeh' and _synthetic_differs(builder)):
                return
            logging.warning('%s was generated with other settings than config.data.synthetic = '
                            '%s; regenerating it', builder.data_dir, builder.generation.metadata())
            builder.data_path.rmtree()
            builder = dataset_builder(data)
        download_config = None
        if data.name in _MANUAL:
            if not data.manual_dir:
                raise ValueError(
                    f'config.data.manual_dir is empty: {data.name} must be downloaded by hand '
                    'and the field set to its folder.\n\n'
                    + _MANUAL[data.name].MANUAL_DOWNLOAD_INSTRUCTIONS)
            download_config = tfds.download.DownloadConfig(manual_dir=data.manual_dir)
        logging.info('Building %s/%s into %s', data.name, data.builder_config, builder.data_dir)
        try:
            builder.download_and_prepare(file_format=dataset.FILE_FORMAT,
                                         download_config=download_config)
        except ebb_dataset_builder.BadInput as e:
            raise UserError(f'{e} (config.data.manual_dir={data.manual_dir})') from None


def prepare_dataset_once(data: ml_collections.ConfigDict) -> None:
    """prepare_dataset in a (multi-process) job: process 0 first, the others once it is there
    (they only check it then), so that no file system needs locks shared between hosts."""
    if jax.process_index() == 0:
        prepare_dataset(data)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('tfds_ebb.prepare: dataset prepared')
        if jax.process_index() > 0:
            prepare_dataset(data)


@contextlib.contextmanager
def _build_lock(data_path: epath.Path) -> Iterator[None]:
    """An exclusive lock on `<data_path>.lock` (local and mounted paths; none for gs:// etc.)."""
    if '://' in str(data_path):
        yield
        return
    lock = pathlib.Path(f'{data_path}.lock')
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, 'a') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_prepared(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> None:
    formats = [str(getattr(f, 'value', f)) for f in builder.info.available_file_formats()]
    if dataset.FILE_FORMAT not in formats:
        raise ValueError(
            f'{builder.data_dir} holds {data.name} in {formats}, but the input pipeline '
            f'reads {dataset.FILE_FORMAT}: rebuild it with '
            f'file_format={dataset.FILE_FORMAT!r} or point config.data.data_dir elsewhere')


def _check_up_to_date(builder: tfds.core.DatasetBuilder, data: ml_collections.ConfigDict) -> None:
    """ebb / realbokeh on disk must have been built from what config.data.manual_dir holds."""
    try:
        builder.check_up_to_date(epath.Path(data.manual_dir))
    except ebb_dataset_builder.StaleDataset as e:
        raise UserError(f'{e} (config.data.manual_dir={data.manual_dir})') from None


def _synthetic_differs(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether synthetic_bokeh on disk was generated with other settings than requested."""
    wanted = builder.generation.metadata()
    return {k: builder.info.metadata.get(k) for k in wanted} != wanted


def main(argv: Sequence[str]) -> None:
    del argv
    prepare_dataset(_CONFIG.value.data)
    print(dataset.dataset_dir(_CONFIG.value.data))


if __name__ == '__main__':
    from absl import app
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant].')
    app.run(main)
