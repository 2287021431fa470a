"""launch.py through real subprocesses: summary, convert, and clear failures."""

import re

import jax
import numpy as np

import tf_checkpoints
from helpers import launch
from bokeh_jax import checkpoint, convert
from bokeh_jax import model as model_lib

def test_summary_mode():
    result = launch(
        '--mode=summary',
        '--config=configs/default.py',
        '--config.model.channels=8',
        '--input_size=64x96',
    )
    out = result.stdout
    assert 'PyNET(channels=8), input 1 x 64 x 96 x 4' in out
    shapes = model_lib.param_shapes(8)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert re.search(rf'^total\s+{total:,}\s+440$', out, re.M), out
    assert re.search(r'^level 1\s+128x192\s', out, re.M) and 'GFLOP' in out


def test_convert_mode_writes_loadable_orbax_params(tmp_path):
    values = tf_checkpoints.random_values(4, 4, seed=1)
    prefix = tf_checkpoints.write_tf1_checkpoint(
        str(tmp_path / 'tf' / 'pynet_bokeh_level_0'), values
    )
    workdir = tmp_path / 'work'
    result = launch('--mode=convert', f'--tf_checkpoint={prefix}', f'--workdir={workdir}')
    assert 'Imported' in result.stdout
    params, meta = checkpoint.load_params(str(workdir))
    assert meta['channels'] == 4 and meta['input_channels'] == 4 and meta['level'] == 1
    for value, path in zip(values, convert.tf_variable_paths(params)):
        leaf = params
        for key in path:
            leaf = leaf[key]
        np.testing.assert_array_equal(leaf, value)


def test_bad_invocations_fail_clearly(tmp_path):
    result = launch('--mode=nonsense', check=False)
    assert result.returncode != 0 and "Unknown --mode='nonsense'" in result.stderr
    result = launch('--mode=summary', '--config.model.chanels=4', check=False)
    assert result.returncode != 0 and 'chanels' in result.stderr
    result = launch(
        '--mode=convert',
        f'--tf_checkpoint={tmp_path}/missing',
        f'--workdir={tmp_path}',
        check=False,
    )
    assert result.returncode != 0 and 'missing' in result.stderr
