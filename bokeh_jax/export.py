"""Exports of trained PyNET parameters for phones and servers (`launch.py --mode=export`).

Formats (file names inside the output folder):
  tflite        pynet_level1_float32.tflite: LiteRT, the level-1 forward at one fixed model input
                size (`size`, default 512x768 = the paper's 1024x1536 photo), float32.
  tflite_fp16   pynet_level1_float16.tflite: the same with float16 weights (half the file; the
                runtime computes in float32 on CPU).
  tflite_int8   pynet_level1_int8.tflite: dynamic-range int8 weights (not a default: its quality
                is reported in export.json; see docs/export.md).
  saved_model   saved_model/: TF SavedModel for TF Serving, any photo size (multiples of 64).
                Signature `serving_default`: photo uint8 [N, H, W, 3] (+ depth uint8 [N, H/2, W/2,
                1], near = bright, 0..255, for an RGB-D model) -> image uint8 [N, H, W, 3] and
                image_float float32 [N, H, W, 3] (unclipped level-1 output). Signature `model`:
                the model input float32 [N, h, w, C] in [0, 1] (h, w multiples of 32) -> image
                float32 [N, 2h, 2w, 3].
  jax_export    pynet_level1.jax_export: serialized StableHLO (jax.export) of the model input ->
                level-1 image function with the weights inside and symbolic shape
                "b, 32*h, 32*w, C": `jax.export.deserialize(bytes).call(x)` needs neither the model
                code nor the parameters.
An `export.json` manifest lists each file with its size, shapes and PSNR against JAX.

Every exported function runs the convolutions on XLA (conv_impl='xla'): oneDNN custom calls would
not survive serialization. The TFLite and SavedModel graphs come from jax2tf (StableHLO inside a
tf.XlaCallModule op), which the TFLite converter legalizes to builtin ops: the model's transposed
convs are already a sub-pixel 2x2 conv + depth-to-space and its instance norm plain reductions,
so no op falls back to Flex/TF ops. TensorFlow is imported inside the functions that need it; the
rest of bokeh_jax stays TF-free at run time.
"""

from collections.abc import Callable, Sequence
import datetime
import functools
import json
import os
import shutil
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bokeh_jax import image_ops
from bokeh_jax import model as model_lib
from bokeh_jax import output_paths

FILES = {
    'tflite': 'pynet_level1_float32.tflite',
    'tflite_fp16': 'pynet_level1_float16.tflite',
    'tflite_int8': 'pynet_level1_int8.tflite',
    'saved_model': 'saved_model',
    'jax_export': 'pynet_level1.jax_export',
}
DEFAULT_FORMATS = ('tflite', 'tflite_fp16', 'saved_model', 'jax_export')
# Model input (half the photo) of the paper's 1024x1536 EBB! photos.
DEFAULT_SIZE = (512, 768)
MANIFEST = 'export.json'
# Below this PSNR against JAX a float32 export is a mis-conversion, not rounding: export fails.
MIN_FLOAT32_PSNR = 50.0


class ExportError(ValueError):
    """A user error in what was asked to export (formats, size, output folder)."""


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """'tflite,saved_model' (or a sequence) -> ('tflite', 'saved_model'); names checked."""
    names = [n.strip() for n in (text.split(',') if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in FILES]
    if unknown or not names:
        raise ExportError(f'--formats: unknown format(s) {unknown or names!r}; expected a '
                          f'comma-separated list of {list(FILES)}')
    return tuple(dict.fromkeys(names))


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the model input (half the photo): positive multiples of 32, else ExportError."""
    h, w = (int(v) for v in size)
    m = model_lib.SIZE_MULTIPLE
    if h <= 0 or w <= 0 or h % m or w % m:
        raise ExportError(f'--export_size: the model input height and width must be positive '
                          f'multiples of {m} (photo: multiples of {2 * m}); got {h}x{w}')
    return h, w


# ----------------------------------------------------------------------------------------------
# The exported functions (pure JAX).
# ----------------------------------------------------------------------------------------------


@functools.cache  # one function per width: jax.jit of it compiles each input shape once
def level1_forward(channels: int) -> Callable[[Any, jax.Array], jax.Array]:
    """(params, x float32 [N, h, w, C] in [0, 1]) -> level-1 image float32 [N, 2h, 2w, 3],
    unclipped (about -0.08..1.08). Convolutions on XLA, so the function serializes."""
    net = model_lib.PyNET(channels, conv_impl='xla')

    def forward(params: Any, x: jax.Array) -> jax.Array:
        return net.apply({'params': params}, x, level=1)[1]

    return forward


def _half_taps() -> np.ndarray:
    """The 8 weights of image_ops.resize's x0.5 antialiased Keys cubic: output i (centre 2i + 0.5
    in input pixels) reads inputs 2i - 3 .. 2i + 4, at (-3.5 .. 3.5) / 2 kernel units."""
    distances = (np.arange(8) - 3.5) / 2
    w = image_ops.keys_cubic(distances)
    return (w / w.sum()).astype(np.float32)


def downscale_half(x: jax.Array) -> jax.Array:
    """float32 [N, H, W, C] -> [N, H/2, W/2, C] (H, W even), as image_ops.resize to half size.

    A stride-2 separable 8-tap filter over the zero-padded image, divided by the same filter over
    ones: taps that fall off the image are dropped and the rest renormalized, as resize does, and
    the shape can stay symbolic (no weight tables built from concrete sizes).
    """
    taps = jnp.asarray(_half_taps())

    def along(v: jax.Array, axis: int) -> jax.Array:
        shape = (8, 1, 1, 1) if axis == 1 else (1, 8, 1, 1)
        kernel = jnp.tile(taps.reshape(shape), (1, 1, 1, v.shape[-1]))
        pad = ((3, 4), (0, 0)) if axis == 1 else ((0, 0), (3, 4))
        strides = (2, 1) if axis == 1 else (1, 2)
        return jax.lax.conv_general_dilated(
            v, kernel, strides, pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=v.shape[-1], precision=jax.lax.Precision.HIGHEST)

    ones = jnp.ones_like(x[:1, ..., :1])
    weights = along(along(ones, 1), 2)
    return along(along(x, 1), 2) / weights


def serving_forward(channels: int, input_channels: int) -> Callable[..., dict[str, jax.Array]]:
    """(params, photo uint8 [N, H, W, 3], depth uint8 [N, H/2, W/2, 1] (RGB-D only)) ->
    {'image': uint8 [N, H, W, 3], 'image_float': float32 [N, H, W, 3] unclipped}.

    H, W multiples of 64. The photo is halved as in training (image_ops.make_model_input); the
    depth channel is depth / 255, with no stretching (render.py stretches maps to 0..255 first;
    EBB!'s maps already span it).
    """
    forward = level1_forward(channels)

    def serve(params: Any, photo: jax.Array, depth: jax.Array | None = None) -> dict:
        rgb = jnp.clip(downscale_half(photo.astype(jnp.float32) * np.float32(1 / 255)), 0.0, 1.0)
        x = rgb
        if input_channels == 4:
            x = jnp.concatenate([rgb, depth.astype(jnp.float32) * np.float32(1 / 255)], axis=-1)
        y = forward(params, x)
        image = jnp.round(jnp.clip(y, 0.0, 1.0) * 255).astype(jnp.uint8)
        return {'image': image, 'image_float': y}

    return serve


# ----------------------------------------------------------------------------------------------
# Writers, one per format.
# ----------------------------------------------------------------------------------------------


def jax_export_bytes(params: Any, channels: int, input_channels: int) -> bytes:
    """Serialized jax.export of x float32 [b, 32h, 32w, C] -> image [b, 64h, 64w, 3], weights
    inside as constants."""
    forward = level1_forward(channels)
    params = jax.tree.map(jnp.asarray, params)
    shape = jax.export.symbolic_shape(f'b, 32*h, 32*w, {input_channels}')
    exported = jax.export.export(jax.jit(lambda x: forward(params, x)))(
        jax.ShapeDtypeStruct(shape, jnp.float32))
    return bytes(exported.serialize())


def tf_module(params: Any, channels: int, input_channels: int) -> Any:
    """A tf.Module holding the weights as tf.Variables, with tf.functions `serve` (photo [+ depth]
    uint8, any size that is a multiple of 64) and `model` (float32 model input, multiples of 32)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    module = tf.Module()
    module.params = tf.nest.map_structure(
        lambda v: tf.Variable(np.asarray(v), trainable=False), params)
    model_fn = jax2tf.convert(
        level1_forward(channels), with_gradient=False,
        polymorphic_shapes=[None, f'(b, 32*h, 32*w, {input_channels})'])

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, input_channels], tf.float32, name='model_input')])
    def model(model_input):
        return {'image': model_fn(module.params, model_input)}

    serve_jax = serving_forward(channels, input_channels)
    if input_channels == 4:
        serve_fn = jax2tf.convert(
            serve_jax, with_gradient=False,
            polymorphic_shapes=[None, '(b, 64*h, 64*w, 3)', '(b, 32*h, 32*w, 1)'])

        @tf.function(autograph=False, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name='photo'),
            tf.TensorSpec([None, None, None, 1], tf.uint8, name='depth')])
        def serve(photo, depth):
            return serve_fn(module.params, photo, depth)
    else:
        serve_fn = jax2tf.convert(
            lambda p, photo: serve_jax(p, photo), with_gradient=False,
            polymorphic_shapes=[None, '(b, 64*h, 64*w, 3)'])

        @tf.function(autograph=False, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name='photo')])
        def serve(photo):
            return serve_fn(module.params, photo)

    module.model, module.serve = model, serve
    module.channels = channels
    return module


def save_saved_model(module: Any, path: str) -> None:
    import tensorflow as tf

    tf.saved_model.save(module, path, signatures={
        'serving_default': module.serve, 'model': module.model})


TFLITE_VARIANTS = ('tflite', 'tflite_fp16', 'tflite_int8')


def tflite_bytes(module: Any, size: Sequence[int], variant: str) -> bytes:
    """The level-1 forward at model input float32 [1, h, w, C] as a LiteRT flatbuffer: 'tflite'
    (float32), 'tflite_fp16' (float16 weights) or 'tflite_int8' (dynamic-range int8 weights).
    Only builtin ops: a graph that needs TF (Flex) ops fails to convert instead of shipping them.

    `module` is tf_module's; the forward is converted again at the fixed shape, because the
    converter leaves a shape-polymorphic StableHLO module's dynamic gathers unconverted.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    h, w = size
    channels = module.model.input_signature[0].shape[-1]
    model_fn = jax2tf.convert(level1_forward(module.channels), with_gradient=False)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([1, h, w, channels], tf.float32, name='model_input')])
    def fixed(model_input):
        return {'image': model_fn(module.params, model_input)}

    concrete = fixed.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == 'tflite_fp16':
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == 'tflite_int8':
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant != 'tflite':
        raise ExportError(f'unknown TFLite variant {variant!r}; expected one of {TFLITE_VARIANTS}')
    return converter.convert()


# ----------------------------------------------------------------------------------------------
# Runtimes: each artifact run as a user runs it (used by the checks and the tests).
# ----------------------------------------------------------------------------------------------


def tflite_interpreter(path: str, num_threads: int | None = None) -> Any:
    """A LiteRT interpreter for `path` (ai-edge-litert; tf.lite's where it is not installed),
    with XNNPACK, the default CPU delegate."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(interpreter: Any, x: np.ndarray) -> np.ndarray:
    """Runs a level-1 .tflite on float32 [1, h, w, C] -> [1, 2h, 2w, 3]."""
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(inp['index'], np.ascontiguousarray(x, np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(out['index'])


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of a against b for images in [0, 1] (peak 1); inf when identical."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float('inf') if mse == 0 else 10 * np.log10(1.0 / mse)


# ----------------------------------------------------------------------------------------------
# The export mode.
# ----------------------------------------------------------------------------------------------


def check_input(input_channels: int, size: Sequence[int]) -> np.ndarray:
    """A check input float32 [1, h, w, C] in [0, 1]: a smooth random image (seeded), not white
    noise, so that the PSNRs resemble those on photos."""
    h, w = size
    coarse = np.random.default_rng(0).random((h // 8, w // 8, input_channels), np.float32)
    return np.clip(image_ops.resize(coarse, (h, w)), 0, 1)[None]


def export(params: Any, meta: dict, output: str, *, formats: Sequence[str] = DEFAULT_FORMATS,
           size: Sequence[int] = DEFAULT_SIZE, overwrite: bool = False,
           protected: Sequence[str] = ()) -> dict:
    """Writes `formats` of level-1 `params` into the folder `output` and returns the manifest.

    meta: the parameters' metadata (checkpoint.load_params), with `channels` and `input_channels`.
    Each artifact is run by its own runtime on a check input of model input size `size` and
    compared with JAX (manifest `psnr_vs_jax_db`). Written into `output`.partial first, then
    renamed: an existing `output` is replaced only with `overwrite`, and a failed export leaves
    no half-written folder. `output` may not lie in or hold a `protected` path (the workdir's
    parameters, ...) or lie below a file (output_paths.py).
    """
    formats = parse_formats(formats)
    size = check_size(size)
    output = os.path.abspath(output)
    problem = output_paths.output_problem(output, protected=protected, replaces_folder=True)
    if problem:
        raise ExportError(f'--output: {problem}')
    if os.path.exists(output) and not overwrite:
        raise ExportError(f'--output {output!r} already exists; pass --overwrite to replace it')
    condition = model_lib.condition_of(params)[0]
    if condition != 'none':
        raise ExportError(f'--mode=export handles unconditioned models only; these parameters are '
                          f'conditioned on {condition!r} (model.condition): render them with '
                          f'--mode=render or serve them with --mode=serve')
    if meta.get('residual', False):
        raise ExportError('--mode=export handles the paper\'s image heads only; these parameters '
                          'are of a residual model (model.residual): render them with '
                          '--mode=render or serve them with --mode=serve')
    channels, input_channels = int(meta['channels']), int(meta['input_channels'])
    params = jax.tree.map(np.asarray, params)
    partial = output + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)

    x = check_input(input_channels, size)
    reference = np.asarray(jax.jit(level1_forward(channels))(params, x))
    entries = {}
    module = None
    try:
        for name in formats:
            path = os.path.join(partial, FILES[name])
            logging.info('Exporting %s to %s', name, path)
            if name == 'jax_export':
                with open(path, 'wb') as f:
                    f.write(jax_export_bytes(params, channels, input_channels))
                exported = jax.export.deserialize(bytearray(open(path, 'rb').read()))
                y = np.asarray(exported.call(x))
            else:
                if module is None:
                    module = tf_module(params, channels, input_channels)
                if name == 'saved_model':
                    save_saved_model(module, path)
                    import tensorflow as tf
                    loaded = tf.saved_model.load(path)
                    y = loaded.signatures['model'](model_input=tf.constant(x))['image'].numpy()
                else:
                    with open(path, 'wb') as f:
                        f.write(tflite_bytes(module, size, name))
                    y = run_tflite(tflite_interpreter(path), x)
            entries[name] = _entry(path, partial, y, reference)
            logging.info('%s: %.1f dB against JAX', name, entries[name]['psnr_vs_jax_db'])
            if name in ('tflite', 'saved_model', 'jax_export') and (
                    entries[name]['psnr_vs_jax_db'] < MIN_FLOAT32_PSNR):
                raise RuntimeError(
                    f'{name}: the exported model disagrees with JAX ({entries[name]}); '
                    f'expected >= {MIN_FLOAT32_PSNR} dB for a float32 export')
        manifest = {
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'channels': channels, 'input_channels': input_channels,
            'model_input_size': list(size), 'jax': jax.__version__,
            'params_meta': {k: v for k, v in meta.items() if _is_json(v)},
            'formats': entries,
        }
        with open(os.path.join(partial, MANIFEST), 'w') as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _entry(path: str, root: str, y: np.ndarray, reference: np.ndarray) -> dict:
    if os.path.isdir(path):
        nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    else:
        nbytes = os.path.getsize(path)
    return {'path': os.path.relpath(path, root), 'bytes': int(nbytes),
            'psnr_vs_jax_db': round(psnr_db(y, reference), 2),
            'max_abs_diff': float(np.max(np.abs(y - reference)))}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
