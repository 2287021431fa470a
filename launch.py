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
            (config.render; depth: any resolution, near = bright). Without --depth, an RGB + depth
            model gets MegaDepth's estimate (needs import_depth first)
  import_depth  import the released MegaDepth weights (--megadepth_weights=best_generalization_net_G.pth,
            read without PyTorch) to WORKDIR/depth/megadepth/
  depth     depth maps in EBB!'s convention with WORKDIR's MegaDepth (config.depth):
            --input=PHOTO|FOLDER --output=FILE.png|FOLDER [--overwrite]; existing maps are skipped
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
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'render, depth: replace existing outputs.')
_MEGADEPTH_WEIGHTS = flags.DEFINE_string(
    'megadepth_weights', None, 'import_depth: best_generalization_net_G.pth (PyTorch state dict).'
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
    depth_fn = None
    if not _DEPTH.value and _needs_depth(workdir):
        from bokeh_jax import depth_maps

        try:
            depth_fn = depth_maps.load_estimator(config, workdir)
        except depth_maps.DepthError as e:
            sys.exit(f'render failed: {render.NEEDS_DEPTH} Or let MegaDepth estimate it: {e}')
        print(f'No --depth: estimating each photo\'s depth with {config.depth.model} '
              f'({config.depth.working_size}) from {workdir}/depth/{config.depth.model}')
    try:
        render.render_paths(
            config, workdir, _INPUT.value, _DEPTH.value, _OUTPUT.value, overwrite=_OVERWRITE.value,
            depth_fn=depth_fn,
        )
    except render.RenderError as e:
        sys.exit(f'render failed: {e}')


def _needs_depth(workdir: str) -> bool:
    """Whether WORKDIR's finest parameters take RGB + depth (False when there are none: render
    then says so itself)."""
    from bokeh_jax import checkpoint

    levels = checkpoint.saved_levels(workdir)
    return bool(levels) and checkpoint.read_meta(workdir, levels[0])['input_channels'] == 4


def run_import_depth(config, workdir: str) -> None:
    from bokeh_jax import depth_maps

    if not _MEGADEPTH_WEIGHTS.value:
        raise app.UsageError('--mode=import_depth needs --megadepth_weights=PATH (the released '
                             'best_generalization_net_G.pth; see docs/depth.md)')
    try:
        path, count = depth_maps.import_weights(_MEGADEPTH_WEIGHTS.value, workdir)
    except depth_maps.DepthError as e:
        sys.exit(f'import_depth failed: {e}')
    print(f'Imported {count:,} MegaDepth parameters to {path}')


def run_depth(config, workdir: str) -> None:
    from bokeh_jax import depth_maps

    if not (_INPUT.value and _OUTPUT.value):
        raise app.UsageError('--mode=depth needs --input=PHOTO_OR_FOLDER and --output=PATH')
    try:
        depth_maps.make_depth_maps(config, workdir, _INPUT.value, _OUTPUT.value,
                                   overwrite=_OVERWRITE.value)
    except depth_maps.DepthError as e:
        sys.exit(f'depth failed: {e}')


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
    'import_depth': run_import_depth,
    'depth': run_depth,
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
