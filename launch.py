"""The one entry point of bokeh_jax.

  python launch.py --mode=MODE --config=configs/default.py[:VARIANT] --workdir=DIR [--config.x.y=v]

Modes:
  summary   parameters per group / output path and forward FLOPs (--input_size=HxW)
  convert   import the released TF1 checkpoint: --tf_checkpoint=PREFIX, writes WORKDIR/params/level_1
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py'),
    'Experiment config file, optionally with :VARIANT.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', 'workdir', 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_string('mode', 'summary', 'What to run; see the module docstring.')
_TF_CHECKPOINT = flags.DEFINE_string('tf_checkpoint', None, 'convert: TF1 checkpoint prefix.')
_INPUT_SIZE = flags.DEFINE_string(
    'input_size', '512x768', 'summary: model input size HxW (half the photo size).'
)


def _parse_size(text: str, flag: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise app.UsageError(f'--{flag} must look like 512x768, got {text!r}') from None
    return h, w


def run_summary(config, workdir: str) -> None:
    from bokeh_jax import summary

    h, w = _parse_size(_INPUT_SIZE.value, 'input_size')
    input_channels = 3 if config.data.builder_config == 'rgb' else 4
    print(summary.summarize(config.model.channels, input_channels, h, w))


def run_convert(config, workdir: str) -> None:
    from bokeh_jax import checkpoint, convert

    if not _TF_CHECKPOINT.value:
        raise app.UsageError(
            '--mode=convert needs --tf_checkpoint=PREFIX (the TF1 checkpoint, e.g. '
            '.../pynet_bokeh_level_0)'
        )
    params, info = convert.load_tf_checkpoint(_TF_CHECKPOINT.value)
    path = checkpoint.save_params(workdir, 1, params, info)
    print(
        f'Imported {convert.param_count(params):,} parameters '
        f'(channels={info["channels"]}, input_channels={info["input_channels"]}) to {path}'
    )


MODES = {
    'summary': run_summary,
    'convert': run_convert,
}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if _MODE.value not in MODES:
        raise app.UsageError(f'Unknown --mode={_MODE.value!r}; expected one of {sorted(MODES)}')
    config = _CONFIG.value
    logging.info('Config:\n%s', config)
    MODES[_MODE.value](config, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
