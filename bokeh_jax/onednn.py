"""oneDNN convolutions for XLA:CPU, through jax.ffi: the `config.model.conv_impl='onednn'` backend.

XLA:CPU computes the kernel gradient of PyNET's large convolutions (5x5 to 9x9, 32 to 512
channels) 3-4x slower than oneDNN, TensorFlow's CPU library, which makes our train step about
twice TF's. `conv_general_dilated` here is a drop-in for `jax.lax.conv_general_dilated` (what
`nn.Conv(conv_general_dilated=...)` takes) whose forward pass, input gradient and kernel gradient
run in oneDNN, through the custom calls of `native/dnnl_conv_ffi.cc`. Results agree with XLA's to
float32 rounding (~1e-6 relative). All three, not only the kernel gradient: in the level-3 train
step (batch 1, 512x512) that took 0.60x XLA's time against 0.97x with only the kernel gradient in
oneDNN (paired medians of 3 calls each, on a shared 2-core machine at load 3-4).

`conv_general_dilated_bf16` is the rendering variant (conv_impl 'onednn_bf16', what
`config.model.dtype='bfloat16'` selects on CPU): the same convolutions with bfloat16 input and
kernel, float32 accumulation and float32 result, so bias, instance norm and activations stay
float32. It needs a CPU with AVX512-BF16 or AMX-BF16 (`cpu_has_bf16`); elsewhere it logs once and
runs the float32 convolutions. Its gradient is the float32 one.

Where it applies: float32, NHWC input, HWIO kernel, stride 1, no dilation, no feature groups,
zero 'SAME' padding and an odd square kernel (every conv of PyNET's multi-blocks). Any other
convolution goes to `jax.lax.conv_general_dilated` unchanged. CPU only.

Set-up: `make onednn` pip-installs oneDNN (`onednn`, `onednn-devel`: the library, its headers and
Intel's runtimes, ~2 GB) into the running environment. The first use compiles the custom calls
with g++ against that install into `native/build/` (a few seconds; again whenever the source, the
install or jax changes) and registers them with XLA once per process.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(_ROOT, 'native', 'dnnl_conv_ffi.cc')
BUILD_DIR = os.path.join(_ROOT, 'native', 'build')
# Handler symbols of SOURCE, registered under the same names.
TARGETS = ('DnnlConvForward', 'DnnlConvBackwardData', 'DnnlConvBackwardWeights',
           'DnnlConvForwardBf16')
# /proc/cpuinfo flags of the instructions oneDNN runs bfloat16 products with.
BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
_HOW_TO_INSTALL = "config.model.conv_impl='onednn' needs `make onednn`"
_NHWC = ('NHWC', 'HWIO', 'NHWC')

_lock = threading.Lock()
_registered = False


class OneDNNUnavailable(RuntimeError):
    """oneDNN, its headers or a C++ compiler is missing; the message says which and how to fix."""


# ----------------------------------------------------------------------------- building


def find_onednn(prefix: str | None = None) -> dict[str, str]:
    """Paths of the oneDNN pip install in `prefix` (default: the running environment).

    The `onednn` and `onednn-devel` wheels put their files under `<prefix>/lib` and
    `<prefix>/include` (a venv, or `pip install --prefix`). Returns {'include', 'library',
    'opencl'}: the header folder, libdnnl.so and Intel's OpenCL CPU runtime, which the library's
    SYCL layer looks for on its first call. Raises OneDNNUnavailable naming what is missing.
    """
    prefix = prefix or sys.prefix
    paths = {
        'include': os.path.join(prefix, 'include'),
        'library': os.path.join(prefix, 'lib', 'libdnnl.so'),
        'opencl': os.path.join(prefix, 'lib', 'libintelocl.so'),
    }
    wanted = {
        'header': (os.path.join(paths['include'], 'oneapi', 'dnnl', 'dnnl.hpp'), 'onednn-devel'),
        'library': (paths['library'], 'onednn'),
        'OpenCL runtime': (paths['opencl'], 'intel-opencl-rt, a dependency of onednn'),
    }
    for what, (path, package) in wanted.items():
        if not os.path.exists(path):
            raise OneDNNUnavailable(
                f'{_HOW_TO_INSTALL}: oneDNN {what} {path} not found (pip package {package} in '
                f'{prefix})'
            )
    return paths


def _compile_command(compiler: str, paths: dict[str, str], output: str) -> list[str]:
    lib_dir = os.path.dirname(paths['library'])
    return [
        compiler, '-O2', '-std=c++17', '-shared', '-fPIC',
        '-isystem', jax.ffi.include_dir(), '-isystem', paths['include'],
        SOURCE, paths['library'],
        # RPATH, not RUNPATH: libdnnl's own dependencies (TBB, SYCL) sit beside it and it has
        # no search path of its own, so ours must apply to them too.
        f'-Wl,--disable-new-dtags,-rpath,{lib_dir}',
        '-o', output,
    ]


def library_path() -> str:
    """The compiled custom calls: native/build/dnnl_conv_ffi-<hash>.so, built when missing.

    The hash covers the source, the compile command (compiler, oneDNN and jax paths) and the jax
    version, so an edit or another environment gets its own build. Builds write to a temporary
    file and rename it, so concurrent processes (pytest -n) never load half a file.
    """
    paths = find_onednn()
    compiler = os.environ.get('CXX', 'g++')
    with open(SOURCE, 'rb') as f:
        digest = hashlib.sha256(f.read())
    digest.update(' '.join(_compile_command(compiler, paths, '')).encode())
    digest.update(jax.__version__.encode())
    path = os.path.join(BUILD_DIR, f'dnnl_conv_ffi-{digest.hexdigest()[:16]}.so')
    if os.path.exists(path):
        return path
    if shutil.which(compiler) is None:
        raise OneDNNUnavailable(
            f'{_HOW_TO_INSTALL}: the C++ compiler {compiler!r} (env CXX, default g++) is not on '
            f'PATH, and {path} is not built yet'
        )
    os.makedirs(BUILD_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=BUILD_DIR)
    os.close(fd)
    try:
        command = _compile_command(compiler, paths, tmp)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OneDNNUnavailable(f'compiling {SOURCE} failed:\n{result.stderr[-4000:]}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def ensure_registered() -> None:
    """Builds (if needed) and loads the custom calls, and registers them with XLA: once."""
    global _registered
    with _lock:
        if _registered:
            return
        paths = find_onednn()
        # Must be set before oneDNN's first call; the SYCL runtime it is built with otherwise
        # fails with "SYCL cpu devices queried but not found" even for the plain CPU engine.
        os.environ.setdefault('OCL_ICD_FILENAMES', paths['opencl'])
        library = ctypes.cdll.LoadLibrary(library_path())
        for name in TARGETS:
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(library, name)), platform='cpu'
            )
        _registered = True


# ----------------------------------------------------------------------------- the operations


def _call(target: str, shape: tuple[int, ...], *args: jax.Array) -> jax.Array:
    ensure_registered()
    # 'sequential': under vmap the handler sees one [N, H, W, C] problem at a time.
    result = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, result, vmap_method='sequential')(*args)


def forward(x: jax.Array, w: jax.Array) -> jax.Array:
    """conv(x [N, H, W, I], w [K, K, I, O]) -> [N, H, W, O], stride 1, 'SAME', float32."""
    return _call('DnnlConvForward', (*x.shape[:3], w.shape[3]), x, w)


def backward_data(g: jax.Array, w: jax.Array) -> jax.Array:
    """Input gradient: g [N, H, W, O] (output cotangent), w [K, K, I, O] -> [N, H, W, I]."""
    return _call('DnnlConvBackwardData', (*g.shape[:3], w.shape[2]), g, w)


def backward_weights(x: jax.Array, g: jax.Array, kernel_size: int) -> jax.Array:
    """Kernel gradient: x [N, H, W, I], g [N, H, W, O] -> [K, K, I, O]."""
    return _call(
        'DnnlConvBackwardWeights', (kernel_size, kernel_size, x.shape[3], g.shape[3]), x, g
    )


@jax.custom_vjp
def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' stride-1 conv of float32 x [N, H, W, I] with w [K, K, I, O], K odd, in oneDNN."""
    return forward(x, w)


def _conv_fwd(x, w):
    return conv(x, w), (x, w)


def _conv_bwd(residuals, g):
    x, w = residuals
    return backward_data(g, w), backward_weights(x, g, w.shape[0])


conv.defvjp(_conv_fwd, _conv_bwd)


def forward_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """conv(x bf16 [N, H, W, I], w bf16 [K, K, I, O]) -> float32 [N, H, W, O], float32 sums."""
    return _call('DnnlConvForwardBf16', (*x.shape[:3], w.shape[3]), x, w)


@jax.custom_vjp
def conv_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """`conv` with x and w rounded to bfloat16 (float32 in and out); float32 gradient."""
    return forward_bf16(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _conv_bf16_fwd(x, w):
    return conv_bf16(x, w), (x, w)


conv_bf16.defvjp(_conv_bf16_fwd, _conv_bwd)


@functools.cache
def cpu_has_bf16(cpuinfo: str = '/proc/cpuinfo') -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_FLAGS)


@functools.cache
def _warn_no_bf16() -> None:
    logging.warning('bfloat16 convolutions asked for, but this CPU has none of %s '
                    '(/proc/cpuinfo flags): running them in float32', ', '.join(BF16_FLAGS))


# ----------------------------------------------------------------------------- drop-in


def _same_padding(padding: Any, kernel_size: int) -> bool:
    if isinstance(padding, str):
        return padding.upper() == 'SAME'
    half = kernel_size // 2
    return [tuple(p) for p in padding] == [(half, half), (half, half)]


def supports(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    preferred_element_type: Any = None,
) -> bool:
    """Whether oneDNN runs this `lax.conv_general_dilated` call (see the module docstring)."""
    if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
        return False
    k, k2 = rhs.shape[:2]  # HWIO, when the layout check below passes
    ours = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    theirs = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (
        theirs == ours
        and lhs.dtype == rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32, np.float32)
        and k == k2
        and k % 2 == 1
        and tuple(window_strides) == (1, 1)
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and feature_group_count == 1
        and batch_group_count == 1
        and _same_padding(padding, k)
    )


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` with oneDNN where `supports` says so, XLA elsewhere.

    Raises OneDNNUnavailable (what is missing, and `make onednn`) when oneDNN or g++ is absent,
    and ValueError on a backend other than CPU.
    """
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count)
    if not supports(*args, preferred_element_type=preferred_element_type):
        return jax.lax.conv_general_dilated(
            *args, precision=precision, preferred_element_type=preferred_element_type
        )
    if jax.default_backend() != 'cpu':
        raise ValueError(
            f"config.model.conv_impl='onednn' runs on CPU only; JAX's backend is "
            f"{jax.default_backend()!r} (use conv_impl='xla')"
        )
    return conv(lhs, rhs)


def conv_general_dilated_bf16(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`conv_general_dilated` with bfloat16 products and float32 sums and result in oneDNN.

    float32 operands in, float32 out, for the convolutions `supports` takes; on a CPU without
    bfloat16 instructions (`cpu_has_bf16`) they run in float32, with one warning. Others: XLA.
    """
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count)
    float32 = lambda: conv_general_dilated(  # noqa: E731
        *args, precision=precision, preferred_element_type=preferred_element_type)
    if not supports(*args, preferred_element_type=preferred_element_type):
        return float32()
    if not cpu_has_bf16():
        _warn_no_bf16()
        return float32()
    if jax.default_backend() != 'cpu':
        raise ValueError(
            f"config.model.conv_impl='onednn_bf16' runs on CPU only; JAX's backend is "
            f"{jax.default_backend()!r}"
        )
    return conv_bf16(lhs, rhs)
