"""TF1 checkpoint import: fidelity against real outputs of the original TF graph, and bad files."""

import jax
import numpy as np
import pytest

import tf_checkpoints
from bokeh_jax import convert
from bokeh_jax import model as model_lib


def test_released_layout_reproduces_tf_outputs(tmp_path):
    """Seeded weights in the release's layout -> load -> PyNET matches every TF level to 1e-4."""
    variables = tf_checkpoints.fixture_variables()
    assert len(variables) == 440
    prefix = tf_checkpoints.write_tf1_checkpoint(
        str(tmp_path / 'pynet_bokeh_level_0'), tf_checkpoints.seeded_values(variables)
    )
    params, info = convert.load_tf_checkpoint(prefix)
    assert info['channels'] == 32 and info['input_channels'] == 4
    assert convert.param_count(params) == 47_551_791

    reference = np.load(f'{tf_checkpoints.FIXTURE_DIR}/ref_seed0_64x96.npz')
    outputs = jax.jit(lambda p, x: model_lib.PyNET(32).apply({'params': p}, x, level=1))(
        params, reference['input']
    )
    for level in range(1, 8):
        np.testing.assert_allclose(
            outputs[level], reference[f'level{level}'], atol=1e-4, err_msg=f'level {level}'
        )


def test_tf_order_matches_the_release_shapes():
    variables = tf_checkpoints.fixture_variables()
    shapes = model_lib.param_shapes(32)
    paths = convert.tf_variable_paths(shapes)
    assert len(paths) == len(set(paths)) == 440
    for index, ((name, shape), path) in enumerate(zip(variables, paths)):
        assert name == convert.tf_variable_name(index)
        leaf = shapes
        for key in path:
            leaf = leaf[key]
        assert list(leaf.shape) == shape, (name, path)


def _tiny_values(channels=4, input_channels=4):
    return tf_checkpoints.random_values(channels, input_channels, seed=0)


def test_missing_variable_is_named(tmp_path):
    values = _tiny_values()[:-1]
    prefix = tf_checkpoints.write_tf1_checkpoint(str(tmp_path / 'ckpt'), values)
    with pytest.raises(
        ValueError, match=r"'generator/Variable_439'.*level1/head/conv/bias.*missing"
    ):
        convert.load_tf_checkpoint(prefix)


def test_wrong_shape_is_named(tmp_path):
    values = _tiny_values()
    values[5] = np.zeros((7,), np.float32)
    prefix = tf_checkpoints.write_tf1_checkpoint(str(tmp_path / 'ckpt'), values)
    with pytest.raises(ValueError, match=r"'generator/Variable_5' has shape \[7\], expected \[8\]"):
        convert.load_tf_checkpoint(prefix)


def test_unreadable_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere/ckpt'):
        convert.load_tf_checkpoint(str(tmp_path / 'nowhere' / 'ckpt'))
    (tmp_path / 'junk.index').write_bytes(b'not a checkpoint')
    with pytest.raises(FileNotFoundError, match='junk'):
        convert.load_tf_checkpoint(str(tmp_path / 'junk'))


def test_tiny_width_round_trip(tmp_path):
    values = _tiny_values(channels=4, input_channels=3)
    prefix = tf_checkpoints.write_tf1_checkpoint(str(tmp_path / 'ckpt'), values)
    params, info = convert.load_tf_checkpoint(prefix)
    assert (info['channels'], info['input_channels']) == (4, 3)
    paths = convert.tf_variable_paths(params)
    for value, path in zip(values, paths):
        leaf = params
        for key in path:
            leaf = leaf[key]
        np.testing.assert_array_equal(leaf, value)
