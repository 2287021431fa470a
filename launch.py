"""The one entry point of bokeh_jax.

  python launch.py --mode=MODE --config=configs/default.py[:VARIANT] --workdir=DIR [--config.x.y=v]

With no flags it is the demo (`make demo`): --mode=train --config=configs/default.py:demo
--workdir=workdir/demo. The paper's recipe is --config=configs/default.py.

Which config a run uses: an explicit --config; else the one a training saved in
WORKDIR/config.json (so eval and render of a trained workdir use the config that trained it);
else the demo's for train and the paper's for every other mode. --config.a.b=value overrides
apply to whichever it is.

Errors a user can cause (bad files, flags or config values) end with one line, `error: ...`,
and exit status 2; --debug shows their traceback.

Modes:
  train     coarse-to-fine training of every level in config.train.order, resuming from WORKDIR;
            ends with the eval mode on the finest level trained (config.train.final_eval)
  summary   parameters per group / output path and forward FLOPs (--input_size=HxW)
  convert   import the released TF1 checkpoint (--tf_checkpoint=PREFIX) to WORKDIR/params/level_1
  eval      score WORKDIR's params on config.data.eval_split, with the identity and classical
            baselines: writes WORKDIR/eval/<split>_level<K>_<protocol>/ (CSV, JSON, grid.png)
  bench     speed of the forward pass, train steps and rendering against the TF / PyTorch peers
            (config.bench): prints tables, writes WORKDIR/bench.json
  estimate  wall time and peak memory of config.train's whole schedule on this backend: times
            one train step per level (--estimate_step_budget), writes WORKDIR/estimate.json
  render    full-resolution bokeh of a photo or a folder with WORKDIR's level-1 params:
            --input=PHOTO|FOLDER [--depth=MAP|FOLDER] --output=FILE|FOLDER [--overwrite]
            [--bfloat16] (config.render; depth: any resolution, near = bright). Without --depth,
            an RGB + depth model gets MegaDepth's estimate (needs import_depth first). --bfloat16:
            bfloat16 convolutions (on CPU: oneDNN, 0.2-0.6x float32's time; float32 where the CPU
            lacks avx512_bf16/amx_bf16, with a line saying so). A model trained with
            aperture/focus control (model.condition) takes --fnumber=2.8 --focus=X,Y (a pixel)
  import_depth  import the released MegaDepth weights (--megadepth_weights=best_generalization_net_G.pth,
            read without PyTorch) to WORKDIR/depth/megadepth/
  depth     depth maps in EBB!'s convention with WORKDIR's MegaDepth (config.depth):
            --input=PHOTO|FOLDER --output=FILE.png|FOLDER [--overwrite]; existing maps are skipped
  serve     a local web page (127.0.0.1, --port=N, 0 = any free port; config.serve): upload a photo
            and its depth map, compare PyNET and the classical render with it, download them
  export    WORKDIR's level-1 params for phones and servers: --output=FOLDER [--formats=tflite,
            tflite_fp16,saved_model,jax_export] [--export_size=512x768] [--overwrite]
            (bokeh_jax/export.py, docs/export.md)
"""

import os
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from bokeh_jax import workdir as workdir_lib
from bokeh_jax.errors import UserError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                               'default.py')



def _override_error(error: Exception, argv: list[str]) -> str:
    """One line for a bad `--config.x` override: the flag(s) and what ml_collections said."""
    text = str(error.args[0] if error.args else error)
    for old, new in (('\\n', ' '), ('\n', ' '), ("\\'", ''), ("'", '')):
        text = text.replace(old, new)
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    named = [a.split('=')[0] for a in overrides
             if a.split('=')[0].rsplit('.', 1)[-1] in text] or overrides
    return f'{", ".join(named) or "--config"}: {text}'


try:  # without --config, config_flags applies the overrides to the default right here
    _CONFIG = config_flags.DEFINE_config_file(
        'config',
        _DEFAULT_CONFIG + ':demo',
        'Experiment config file, optionally with :VARIANT.',
        lock_config=True,
    )
except (KeyError, AttributeError, TypeError, ValueError) as _error:
    print(f'error: {_override_error(_error, sys.argv)}', file=sys.stderr)
    sys.exit(2)
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
_FNUMBER = flags.DEFINE_string(
    'fnumber', None, 'render: f-number to render at (e.g. 2.8), for a model trained with aperture '
    'control (model.condition); default 2.')
_FOCUS = flags.DEFINE_string(
    'focus', None, 'render: X,Y, the pixel of the photo to focus on (x right, y down), for a model '
    'trained with focus control; default: the depth at the centre of the photo.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'render, depth, convert, export: replace existing outputs (never an input).')
_MEGADEPTH_WEIGHTS = flags.DEFINE_string(
    'megadepth_weights', None, 'import_depth: best_generalization_net_G.pth (PyTorch state dict).'
)
_ESTIMATE_STEP_BUDGET = flags.DEFINE_float(
    'estimate_step_budget', 30.0, 'estimate: a step predicted slower than this many seconds is '
    'timed at one image per device and scaled to the batch.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show the traceback of user errors too.')
_BFLOAT16 = flags.DEFINE_bool(
    'bfloat16', False,
    'render, serve: convolutions in bfloat16 (config.model.dtype; on CPU through oneDNN with '
    'float32 sums, encoder and norms; docs/performance.md).'
)
_PORT = flags.DEFINE_integer('port', None, 'serve: port (0 = any free one); default config.serve.port.')
_FORMATS = flags.DEFINE_string(
    'formats', 'tflite,tflite_fp16,saved_model,jax_export',
    'export: comma-separated formats (tflite, tflite_fp16, tflite_int8, saved_model, jax_export).'
)
_EXPORT_SIZE = flags.DEFINE_string(
    'export_size', '512x768', 'export: fixed model input HxW of the TFLite files (half the photo).'
)


# Training stopped by SIGTERM/SIGINT after saving its state: re-run the same command to resume.
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL
EXIT_USER_ERROR = 2


def _parse_size(text: str, flag: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise UserError(f'--{flag} must look like 512x768, got {text!r}') from None
    return h, w


def run_summary(config, workdir: str) -> None:
    from bokeh_jax import summary

    h, w = _parse_size(_INPUT_SIZE.value, 'input_size')
    from bokeh_jax.training import config_checks

    input_channels = config_checks.input_channels(config)
    print(summary.summarize(config.model.channels, input_channels, h, w))


def run_convert(config, workdir: str) -> None:
    from bokeh_jax import checkpoint, convert

    if not _TF_CHECKPOINT.value:
        raise UserError(
            '--mode=convert needs --tf_checkpoint=PREFIX (the TF1 checkpoint, e.g. '
            '.../pynet_bokeh_level_0)'
        )

    def refuse_to_replace():
        if 1 in checkpoint.saved_levels(workdir) and not _OVERWRITE.value:
            raise UserError(f'{checkpoint.params_dir(workdir, 1)} already holds parameters '
                            f'({checkpoint.describe(workdir, 1)}); pass --overwrite to replace '
                            f'them, or convert into another --workdir')

    refuse_to_replace()
    params, info = convert.load_tf_checkpoint(_TF_CHECKPOINT.value)  # before touching the workdir
    with workdir_lib.exclusive(workdir, 'convert'):
        refuse_to_replace()
        path = checkpoint.save_params(workdir, 1, params, info)
    print(
        f'Imported {convert.param_count(params):,} parameters '
        f'(channels={info["channels"]}, input_channels={info["input_channels"]}) to {path}'
    )


def run_train(config, workdir: str) -> None:
    from bokeh_jax import train
    from tfds_ebb import prepare

    try:
        train.train_and_evaluate(config, workdir, config_source=_config_source(),
                                 prepare_data=prepare.prepare_dataset_once)
    except train.Interrupted as e:
        print(e)
        sys.exit(EXIT_INTERRUPTED)


def run_eval(config, workdir: str) -> None:
    from bokeh_jax import checkpoint, evaluate
    from tfds_ebb import prepare

    # The parameters first: a missing or damaged folder is named before any data set is built.
    checkpoint.load_params(workdir, int(config.eval.params_level) or None)
    prepare.prepare_dataset_once(config.data)
    evaluate.run(config, workdir)


def run_render(config, workdir: str) -> None:
    from bokeh_jax import render, render_jobs

    if not (_INPUT.value and _OUTPUT.value):
        raise UserError('--mode=render needs --input=PHOTO_OR_FOLDER and --output=PATH')
    depth_fn = None
    if not _DEPTH.value and _needs_depth(workdir):
        from bokeh_jax import depth_maps

        try:
            depth_fn = depth_maps.load_estimator(config, workdir)
        except depth_maps.DepthError as e:
            raise UserError(f'render failed: {render.NEEDS_DEPTH} Or let MegaDepth estimate '
                            f'it: {e}') from None
        print(f'No --depth: estimating each photo\'s depth with {config.depth.model} '
              f'({config.depth.working_size}) from {workdir}/depth/{config.depth.model}')
    try:
        render_jobs.render_paths(
            config, workdir, _INPUT.value, _DEPTH.value, _OUTPUT.value, overwrite=_OVERWRITE.value,
            depth_fn=depth_fn, fnumber=_FNUMBER.value, focus=_FOCUS.value)
    except render_jobs.RenderError as e:
        raise UserError(f'render failed: {e}') from None


def _needs_depth(workdir: str) -> bool:
    """Whether WORKDIR's finest parameters take RGB + depth (False when there are none: render
    then says so itself)."""
    from bokeh_jax import checkpoint

    levels = checkpoint.saved_levels(workdir)
    return bool(levels) and checkpoint.read_meta(workdir, levels[0])['input_channels'] == 4


def run_import_depth(config, workdir: str) -> None:
    from bokeh_jax import depth_maps

    if not _MEGADEPTH_WEIGHTS.value:
        raise UserError('--mode=import_depth needs --megadepth_weights=PATH (the released '
                        'best_generalization_net_G.pth; see the README)')
    path, count = depth_maps.import_weights(_MEGADEPTH_WEIGHTS.value, workdir)
    print(f'Imported {count:,} MegaDepth parameters to {path}')


def run_depth(config, workdir: str) -> None:
    from bokeh_jax import depth_maps

    if not (_INPUT.value and _OUTPUT.value):
        raise UserError('--mode=depth needs --input=PHOTO_OR_FOLDER and --output=PATH')
    depth_maps.make_depth_maps(config, workdir, _INPUT.value, _OUTPUT.value,
                               overwrite=_OVERWRITE.value)


def run_export(config, workdir: str) -> None:
    from bokeh_jax import checkpoint, export, output_paths

    if not _OUTPUT.value:
        raise UserError('--mode=export needs --output=FOLDER')
    try:
        formats = export.parse_formats(_FORMATS.value)
        size = export.check_size(_parse_size(_EXPORT_SIZE.value, 'export_size'))
        params, meta = checkpoint.load_params(workdir, 1)
        manifest = export.export(params, meta, _OUTPUT.value, formats=formats, size=size,
                                 overwrite=_OVERWRITE.value,
                                 protected=output_paths.workdir_inputs(workdir))
    except (ValueError, FileNotFoundError) as e:  # ExportError, or params that do not load
        raise UserError(f'export failed: {e}') from None
    for name, entry in manifest['formats'].items():
        print(f'{name:12s} {entry["path"]:30s} {entry["bytes"] / 2**20:8.1f} MiB '
              f'{entry["psnr_vs_jax_db"]:7.1f} dB vs JAX')


def run_bench(config, workdir: str) -> None:
    from bokeh_jax.bench import harness

    harness.run(config, workdir)


def run_serve(config, workdir: str) -> None:
    from bokeh_jax import serve

    try:
        serve.serve(config, workdir, _PORT.value, serve.depth_estimator(config, workdir))
    except UserError as e:
        raise UserError(f'serve failed: {e}') from None


def run_estimate(config, workdir: str) -> None:
    from bokeh_jax.training import estimate

    estimate.run(config, workdir, step_budget_s=_ESTIMATE_STEP_BUDGET.value)


MODES = {
    'eval': run_eval,
    'train': run_train,
    'summary': run_summary,
    'convert': run_convert,
    'bench': run_bench,
    'render': run_render,
    'import_depth': run_import_depth,
    'depth': run_depth,
    'serve': run_serve,
    'export': run_export,
    'estimate': run_estimate,
}


def _config_source() -> str:
    return _SOURCE[0]


_SOURCE = ['']  # where the config of this run came from, for messages and config.json


def resolve_config(mode: str, workdir: str) -> ml_collections.ConfigDict:
    """The run's config (see the module docstring) with the command line's overrides."""
    given = _CONFIG.value
    explicit = flags.FLAGS['config'].present
    saved = workdir_lib.read_config(workdir)
    if explicit:
        if saved is not None:
            # A field the saved config lacks (written before it existed) has the paper's value.
            workdir_lib.check_same_model(workdir_lib.merge(_paper_config(), saved[0]), given,
                                         workdir)
        _SOURCE[0] = config_flags.get_config_filename(flags.FLAGS['config'])
        return given
    if saved is not None:
        config = workdir_lib.merge(given, saved[0])
        _SOURCE[0] = saved[1] or workdir_lib.config_path(workdir)
        print(f'Using the config saved in {workdir_lib.config_path(workdir)} '
              f'({saved[1] or "no source recorded"})', file=sys.stderr)
    elif mode == 'train':
        _SOURCE[0] = 'configs/default.py:demo'
        return given
    else:
        config = _paper_config()
        _SOURCE[0] = 'configs/default.py'
    # The command line's --config.a.b=value, already parsed and typed by config_flags.
    for field, value in config_flags.get_override_values(flags.FLAGS['config']).items():
        workdir_lib.set_field(config, field, value)
    config.lock()
    return config


def use_bfloat16(config: ml_collections.ConfigDict, mode: str) -> None:
    """--bfloat16: config.model.dtype = 'bfloat16'; on CPU with conv_impl 'xla', also 'auto'
    (XLA:CPU's own bfloat16 is slower than float32, and far less accurate than oneDNN's path)."""
    import jax

    from bokeh_jax import model as model_lib

    if mode not in ('render', 'serve'):
        raise UserError(f'--bfloat16 applies to --mode=render and --mode=serve, not {mode!r} '
                        f'(--config.model.dtype=bfloat16 sets the computation dtype of any mode)')
    config.model.dtype = 'bfloat16'
    if jax.default_backend() != 'cpu':
        return
    if config.model.conv_impl == 'xla':
        config.model.conv_impl = 'auto'
    if model_lib.resolve_conv_impl(config.model.conv_impl) != 'onednn':
        raise UserError('--bfloat16 on CPU runs the convolutions through oneDNN, which is not '
                        'installed: run `make onednn`, or render without --bfloat16')
    from bokeh_jax import onednn

    if not onednn.cpu_has_bf16():
        config.model.dtype = 'float32'
        print(f'--bfloat16: this CPU has none of {", ".join(onednn.BF16_FLAGS)} (/proc/cpuinfo '
              f'flags): rendering in float32', file=sys.stderr)
        return
    print('--bfloat16: bfloat16 convolutions in oneDNN (float32 sums; encoder, norms and output '
          'float32)', file=sys.stderr)


def _paper_config() -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location('bokeh_jax_default_config', _DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv) -> None:
    if len(argv) > 1:
        raise UserError(f'unexpected arguments: {argv[1:]}')
    if _MODE.value not in MODES:
        raise UserError(f'Unknown --mode={_MODE.value!r}; expected one of {sorted(MODES)}')
    config = resolve_config(_MODE.value, _WORKDIR.value)
    logging.info('Config: %s', _SOURCE[0])
    if _BFLOAT16.value:
        use_bfloat16(config, _MODE.value)
    MODES[_MODE.value](config, _WORKDIR.value)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad `--config.x` override (an unknown field, a value of the
    wrong type) turned into a one-line error naming it."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(str(e)) from None
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise UserError(_override_error(e, argv)) from None


def _run() -> None:
    try:
        app.run(main, flags_parser=_parse_flags)
    except UserError as e:
        if _DEBUG.present and _DEBUG.value:
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: library threads (orbax's event loop after a failed restore) would print
        # tracebacks of their own while the interpreter shuts down. Nothing is left to clean up:
        # user errors come before any work, and the workdir lock dies with the process.
        os._exit(EXIT_USER_ERROR)


if __name__ == '__main__':
    _run()
