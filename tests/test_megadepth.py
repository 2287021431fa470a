"""MegaDepth: the port against real PyTorch outputs, and the torch-free .pth reader."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

import torch_files
from bokeh_jax import megadepth, torch_pickle

FIXTURE = pathlib.Path(__file__).parent / 'data' / 'megadepth_reference'


@pytest.fixture(scope='module')
def seed0():
    """(params, input, PyTorch's log depth) of the fixture's seed-0 weights."""
    ref = np.load(FIXTURE / 'ref_seed0_64x96.npz')
    params = megadepth.params_from_state_dict(megadepth.seeded_state_dict(0))
    return params, ref['input'], ref['log_depth']


def test_layout_is_the_released_state_dict():
    released = json.loads((FIXTURE / 'state_dict.json').read_text())
    ours = [[f'module.{k}', list(s), d] for k, s, d in megadepth.state_dict_layout(True)]
    assert ours == released['state_dict']
    total = sum(int(np.prod(s)) for _, s, d in megadepth.state_dict_layout() if d == 'float32')
    assert total == released['parameters_float32'] == 5_371_297


def test_port_matches_pytorch_on_the_fixture(seed0):
    params, x, expected = seed0
    init = jax.eval_shape(megadepth.MegaDepth().init, jax.random.key(0), x)['params']
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params)))
    out = np.asarray(jax.jit(megadepth.MegaDepth().apply)({'params': params}, x))
    assert out.shape == expected.shape == (1, 64, 96, 1)
    assert np.abs(out - expected).max() < 1e-4
    folded = megadepth.fold_batch_norm(params)
    assert len(jax.tree.leaves(folded)) < len(jax.tree.leaves(params))
    out = np.asarray(jax.jit(megadepth.MegaDepth(folded=True).apply)({'params': folded}, x))
    assert np.abs(out - expected).max() < 1e-4


def test_state_dict_round_trip(seed0):
    params = seed0[0]
    state_dict = megadepth.state_dict_from_params(params)
    seeded = megadepth.seeded_state_dict(0, num_batches_tracked=False)
    assert list(state_dict) == list(seeded)
    assert all(np.array_equal(state_dict[k], seeded[k]) for k in seeded)


@pytest.mark.parametrize('name', ['sample_legacy.pth', 'sample_zip.pth'])
def test_reads_files_written_by_pytorch(name):
    expected = np.load(FIXTURE / 'sample_expected.npz')
    found = torch_pickle.load_state_dict(str(FIXTURE / name))
    assert list(found) == list(expected.keys())
    for key in expected.keys():
        assert found[key].dtype == expected[key].dtype and found[key].shape == expected[key].shape
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)


@pytest.mark.parametrize('layout', ['legacy', 'zip'])
def test_reads_the_released_layout(tmp_path, layout, seed0):
    """The whole network written as the release was (legacy: old rebuild function, cuda:0, no
    counters) and as PyTorch writes now (zip: v2, Parameters, counters)."""
    params = seed0[0]
    path = tmp_path / 'net_G.pth'
    if layout == 'legacy':
        torch_files.write_legacy(path, megadepth.seeded_state_dict(0, num_batches_tracked=False))
        assert b'torch.cuda\nFloatStorage' in path.read_bytes()
    else:
        torch_files.write_zip(path, megadepth.seeded_state_dict(0), parameters=True)
    loaded = megadepth.params_from_state_dict(torch_pickle.load_state_dict(str(path)))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize('layout', ['legacy', 'zip'])
def test_refuses_a_pickle_that_runs_code(tmp_path, layout):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch_files.write_malicious(path, layout, f'touch {marker}')
    with pytest.raises(torch_pickle.UnsafePickleError, match=r'evil\.pth.*os\.system'):
        torch_pickle.load_state_dict(str(path))
    assert not marker.exists()


def test_wrong_state_dicts_name_the_key():
    good = megadepth.seeded_state_dict(1, num_batches_tracked=False)
    unprefixed = {k.removeprefix('module.'): v for k, v in good.items()}
    jax.tree.map(np.testing.assert_array_equal, megadepth.params_from_state_dict(unprefixed),
                 megadepth.params_from_state_dict(good))
    key = 'module.3.0.0.1.2.3.weight'
    cases = {
        'missing': ({k: v for k, v in good.items() if k != key}, r'missing.*3\.0\.0\.1\.2\.3\.weight'),
        'extra': ({**good, 'module.9.weight': np.zeros(3, np.float32)}, r'unexpected.*9\.weight'),
        'shape': ({**good, key: good[key][:, :, :1]}, r'3\.0\.0\.1\.2\.3\.weight has shape'),
        'dtype': ({**good, key: good[key].astype(np.float16)}, r'3\.0\.0\.1\.2\.3\.weight.*float16'),
    }
    for name, (state_dict, message) in cases.items():
        with pytest.raises(megadepth.WeightsError, match=message):
            megadepth.params_from_state_dict(state_dict, 'x.pth')


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / 'cut.pth'
    torch_files.write_legacy(path, dict(list(megadepth.seeded_state_dict(2).items())[:3]))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(torch_pickle.TorchFileError, match=r'cut\.pth.*ends early'):
        torch_pickle.load_state_dict(str(path))


def test_torch_peer_computes_the_same_network(seed0):
    pytest.importorskip('torch', reason='PyTorch is an optional benchmark peer')
    from bokeh_jax import depth_bench

    params, x, expected = seed0
    forward = depth_bench.torch_forward(megadepth.state_dict_from_params(params))
    assert np.abs(forward(x) - expected).max() < 1e-4
