"""The CPU benchmark peer: PyNET in TensorFlow 2, with the original TF1 graph's ops.

Conv = `tf.nn.conv2d` + bias, instance norm = `tf.nn.moments` over H and W, leaky ReLU =
max(0.2x, x), transposed conv = `tf.nn.conv2d_transpose` with TF 'SAME' padding, all inside one
`tf.function`, so Grappler fuses bias and activation into oneDNN convolutions as it does for the
released graph. Weights are copied from a bokeh_jax parameter tree, whose kernels already use TF's
layouts. The train step is 100 * MAE at one level plus TF's fused Adam kernel (`ResourceApplyAdam`,
what `tf.compat.v1.train.AdamOptimizer` runs) over the level's output path.

A benchmark peer, not library code: TensorFlow is imported here only, and only the benchmark
harness imports this module, when TF is installed.
"""

from typing import Any, Callable, Sequence

import jax
import numpy as np
import tensorflow as tf

from bokeh_jax import model as model_lib
from bokeh_jax.bench import structure


def _leaky_relu(x: tf.Tensor) -> tf.Tensor:
    return tf.maximum(0.2 * x, x)


class TFPyNET(tf.Module, structure.Ops):
    """PyNET forward pass and train step in TensorFlow, on weights copied from a bokeh_jax tree.

    Args:
      params: a full bokeh_jax PyNET parameter tree (numpy or jax arrays, float32).
    """

    def __init__(self, params: Any):
        super().__init__(name='tf_pynet')
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        self._paths = [tuple(k.key for k in path) for path, _ in flat]
        # One tf.Variable per bokeh_jax leaf, addressed by its '/'-joined path.
        self._vars = {
            '/'.join(p): tf.Variable(np.asarray(v, np.float32), name='.'.join(p))
            for p, (_, v) in zip(self._paths, flat)
        }

    def _v(self, *path: str) -> tf.Variable:
        return self._vars['/'.join(path)]

    # ---- structure.Ops: SPEC "Primitives" ----
    def space_to_depth(self, x):
        return tf.nn.space_to_depth(x, 2)

    def max_pool(self, x):
        return tf.nn.max_pool2d(x, 2, 2, 'VALID')

    # Name scopes 'norm', 'act', 'up', 'concat', 'loss', 'adam' mark the parts of a train step
    # for the profile breakdown (bench/breakdown.py); they change no op.
    def concat(self, xs: Sequence[tf.Tensor]) -> tf.Tensor:
        with tf.name_scope('concat'):
            return tf.concat(list(xs), -1)

    def _conv(self, x, path, instance_norm: bool):
        x = tf.nn.conv2d(x, self._v(*path, 'conv', 'kernel'), 1, 'SAME')
        x = tf.nn.bias_add(x, self._v(*path, 'conv', 'bias'))
        if instance_norm:
            with tf.name_scope('norm'):
                mean, var = tf.nn.moments(x, [1, 2], keepdims=True)
                x = (x - mean) / tf.sqrt(var + 1e-3)
                x = self._v(*path, 'norm', 'scale') * x + self._v(*path, 'norm', 'bias')
        with tf.name_scope('act'):
            return _leaky_relu(x)

    def multi_block(self, x, path, kmax, instance_norm):
        outputs = []
        for k in range(3, kmax + 1, 2):
            y = self._conv(x, (*path, f'k{k}a'), instance_norm)
            outputs.append(self._conv(y, (*path, f'k{k}b'), instance_norm))
        return self.concat(outputs)

    def up(self, x, path):
        with tf.name_scope('up'):
            kernel = self._v(*path, 'conv', 'kernel')  # [3, 3, out, in]
            shape = tf.shape(x)
            out_shape = tf.stack([shape[0], 2 * shape[1], 2 * shape[2], kernel.shape[2]])
            return _leaky_relu(tf.nn.conv2d_transpose(x, kernel, out_shape, 2, 'SAME'))

    def conv3x3(self, x, path):
        x = tf.nn.conv2d(x, self._v(*path, 'conv', 'kernel'), 1, 'SAME')
        return tf.nn.bias_add(x, self._v(*path, 'conv', 'bias'))

    # ---- the model ----
    def outputs(self, x: tf.Tensor, level: int) -> dict[int, tf.Tensor]:
        """Images tanh(z)*0.58 + 0.5 of levels 7..`level`: float32 [N, H*s, W*s, 3]."""
        logits = structure.pynet_logits(self, x, level)
        return {k: tf.tanh(z) * 0.58 + 0.5 for k, z in logits.items()}

    def trainable_paths(self, level: int) -> list[tuple[str, ...]]:
        """bokeh_jax paths of the parameters on the path to output `level`, in `trainable` order."""
        return [p for p in self._paths if model_lib.on_output_path(p, level)]

    def trainable(self, level: int) -> list[tf.Variable]:
        """The variables on the path to output `level` (what the paper trains at that level)."""
        return [self._vars['/'.join(p)] for p in self.trainable_paths(level)]

    # ---- benchmark entry points ----
    def forward_fn(self, level: int = 1) -> Callable[[Any], tf.Tensor]:
        """Compiled forward pass: x float32 [N, H, W, C] in [0, 1] -> the image of `level`."""
        return tf.function(lambda x: self.outputs(x, level)[level], reduce_retracing=True)

    def loss_and_grads_fn(self, level: int) -> Callable[[Any, Any], tuple]:
        """Compiled (x, target) -> (100 * MAE at `level`, gradients of `trainable(level)`)."""
        variables = self.trainable(level)

        @tf.function(reduce_retracing=True)
        def loss_and_grads(x, target):
            with tf.GradientTape() as tape:
                loss = 100.0 * tf.reduce_mean(tf.abs(self.outputs(x, level)[level] - target))
            return loss, tape.gradient(loss, variables)

        return loss_and_grads

    def train_step_fn(
        self,
        level: int,
        learning_rate: float = 5e-5,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
    ) -> Callable[[Any, Any], tf.Tensor]:
        """Compiled train step: (x [N, H, W, C], target of `level`) -> 100 * MAE before the update.

        Adam moments are fresh variables made here, one pair per trained variable.
        """
        variables = self.trainable(level)
        slots = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in variables]
        step = tf.Variable(0.0)

        @tf.function(reduce_retracing=True)
        def train_step(x, target):
            with tf.GradientTape() as tape:
                image = self.outputs(x, level)[level]
                with tf.name_scope('loss'):
                    loss = 100.0 * tf.reduce_mean(tf.abs(image - target))
            grads = tape.gradient(loss, variables)
            with tf.name_scope('adam'):
                step.assign_add(1.0)
                b1_power, b2_power = tf.pow(b1, step), tf.pow(b2, step)
            for v, (m, u), g in zip(variables, slots, grads):
                tf.raw_ops.ResourceApplyAdam(
                    var=v.handle,
                    m=m.handle,
                    v=u.handle,
                    beta1_power=b1_power,
                    beta2_power=b2_power,
                    lr=learning_rate,
                    beta1=b1,
                    beta2=b2,
                    epsilon=eps,
                    grad=g,
                )
            return loss

        return train_step


def conv_fn() -> Callable[[Any, Any, Any], tf.Tensor]:
    """conv + bias + leaky ReLU as one compiled TF function (per-shape profiling)."""
    return tf.function(
        lambda x, k, b: _leaky_relu(tf.nn.bias_add(tf.nn.conv2d(x, k, 1, 'SAME'), b))
    )


def to_tensor(x: Any) -> tf.Tensor:
    return tf.constant(np.asarray(x, np.float32))


def sync(x: Any) -> None:
    """Waits for a TF result (TF eager returns when the result is ready; .numpy() makes sure)."""
    tf.nest.map_structure(lambda t: t.numpy(), x)


def version() -> str:
    return f'tensorflow {tf.__version__}'
