"""The one entry point of bokeh_jax.

  python launch.py --mode=MODE --config=configs/default.py[:VARIANT] --workdir=DIR [--config.x.y=v]

With no flags it is the demo (`make demo`): --mode=train --config=configs/default.py:demo
--workdir=workdir/demo. The paper's recipe is --config=configs/default.py.

Modes:
  train     coarse-to-fine training of every level in config.train.order, resuming from WORKDIR;
            ends with the eval mode on the finest level trained (config.train.final_eval)
  summary   parameters per group / output path and forward FLOPs (--input_size=HxW)
  convert   import the released TF1 checkpoint (--tf_checkpoint=PREFIX) to WORKDIR/params/level_1
  eval      score WORKDIR's params on config.data.eval_split, with the identity and classical
            baselines: writes WORKDIR/eval/<split>_level<K>_<protocol>/ (CSV, JSON, grid.png)
  bench     speed of the forward pass, train steps and rendering against the TF / PyTorch peers
            (config.bench): prints tables, writes WORKDIR/bench.json
  render    full-resolution bokeh of a photo or a folder with WORKDIR's level-1 params:
            --input=PHOTO|FOLDER [--depth=MAP|FOLDER] --output=FILE|FOLDER [--overwrite]
            (config.render; depth: any resolution, near = bright)
  export    WORKDIR's level-1 params for phones and servers: --output=FOLDER [--formats=tflite,
            tflite_fp16,saved_model,jax_export] [--export_size=512x768] [--overwrite]
            (bokeh_jax/export.py, docs/export.md)
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py:demo'),
    'Experiment config file, optionally with :VARIANT.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', 'workdir/demo',
                               'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_string('mode', 'train', 'What to run; see the module docstring.')
_TF_CHECKPOINT = flags.DEFINE_string('tf_checkpoint', None, 'convert: TF1 checkpoint prefix.')
_INPUT_SIZE = flags.DEFINE_string(
    'input_size', '512x768', 'summary: model input size HxW (half the photo size).'
)
_INPUT = flags.DEFINE_string('input', None, 'render: a photo (JPEG/PNG) or a folder of photos.')
_DEPTH = flags.DEFINE_string(
    'depth', None, 'render: depth map of the photo, or a folder with <name>.png per photo.'
)
_OUTPUT = flags.DEFINE_string(
    'output', None, 'render: output image (format from its extension) or folder.'
)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'render, export: replace existing outputs.')
_FORMATS = flags.DEFINE_string(
    'formats', 'tflite,tflite_fp16,saved_model,jax_export',
    'export: comma-separated formats (tflite, tflite_fp16, tflite_int8, saved_model, jax_export).'
)
_EXPORT_SIZE = flags.DEFINE_string(
    'export_size', '512x768', 'export: fixed model input HxW of the TFLite files (half the photo).'
)


# Training stopped by SIGTERM/SIGINT after saving its state: re-run the same command to resume.
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL


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


def run_train(config, workdir: str) -> None:
    from bokeh_jax import train

    try:
        train.train_and_evaluate(config, workdir)
    except train.Interrupted as e:
        print(e)
        sys.exit(EXIT_INTERRUPTED)


def run_eval(config, workdir: str) -> None:
    from bokeh_jax import evaluate

    evaluate.run(config, workdir)


def run_render(config, workdir: str) -> None:
    from bokeh_jax import render

    if not (_INPUT.value and _OUTPUT.value):
        raise app.UsageError('--mode=render needs --input=PHOTO_OR_FOLDER and --output=PATH')
    try:
        render.render_paths(
            config, workdir, _INPUT.value, _DEPTH.value, _OUTPUT.value, overwrite=_OVERWRITE.value
        )
    except render.RenderError as e:
        sys.exit(f'render failed: {e}')


def run_export(config, workdir: str) -> None:
    from bokeh_jax import checkpoint, export

    if not _OUTPUT.value:
        raise app.UsageError('--mode=export needs --output=FOLDER')
    try:
        formats = export.parse_formats(_FORMATS.value)
        size = export.check_size(_parse_size(_EXPORT_SIZE.value, 'export_size'))
        params, meta = checkpoint.load_params(workdir, 1)
        manifest = export.export(params, meta, _OUTPUT.value, formats=formats, size=size,
                                 overwrite=_OVERWRITE.value)
    except (ValueError, FileNotFoundError) as e:  # ExportError, or params that do not load
        sys.exit(f'export failed: {e}')
    for name, entry in manifest['formats'].items():
        print(f'{name:12s} {entry["path"]:30s} {entry["bytes"] / 2**20:8.1f} MiB '
              f'{entry["psnr_vs_jax_db"]:7.1f} dB vs JAX')


def run_bench(config, workdir: str) -> None:
    from bokeh_jax.bench import harness

    harness.run(config, workdir)


MODES = {
    'eval': run_eval,
    'train': run_train,
    'summary': run_summary,
    'convert': run_convert,
    'bench': run_bench,
    'render': run_render,
    'export': run_export,
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
