"""Times the training input pipeline of a level on this machine (no model).

    python -m bokeh_jax.bench.pipeline --config=configs/default.py:tiny --levels=1,3
"""

from collections.abc import Sequence
import time

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from bokeh_jax import input_pipeline


def pipeline_speed(config: ml_collections.ConfigDict, level: int, num_batches: int
                       ) -> dict[str, float]:
    """Times the training pipeline of `level` on this machine (one process, one device).

    Uses the level's batch size (config.train.level{k}.batch_size) and config.data as is; the
    data set must be prepared (`python -m tfds_ebb.prepare --config=...`). Returns examples/s
    and batches/s after one warm-up batch (which includes starting the workers).
    """
    batch_size = int(config.train[f'level{level}'].batch_size)
    iterator = input_pipeline.train_iterator(config.data, config.seed, level, 0, batch_size=batch_size,
                              num_local_devices=1)
    try:
        next(iterator)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    return {'level': level, 'batch_size': batch_size, 'crop_size': int(config.data.crop_size),
            'num_workers': int(config.data.num_workers), 'batches': num_batches,
            'seconds': seconds, 'batches_per_sec': num_batches / seconds,
            'examples_per_sec': num_batches * batch_size / seconds}


def main() -> None:
    config = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant].')
    levels = flags.DEFINE_string('levels', '1,3', 'Comma-separated paper levels to benchmark.')
    num_batches = flags.DEFINE_integer('num_batches', 20, 'Timed batches per level.')
    flags.mark_flags_as_required(['config'])

    def run(argv: Sequence[str]) -> None:
        del argv
        for level in (int(v) for v in levels.value.split(',')):
            result = pipeline_speed(config.value, level, num_batches.value)
            print(f"level {level}: {result['examples_per_sec']:.1f} examples/s "
                  f"({result['batches_per_sec']:.2f} batches/s of {result['batch_size']}, crop "
                  f"{result['crop_size']}, {result['num_workers']} workers)", flush=True)

    app.run(run)


if __name__ == '__main__':
    main()
