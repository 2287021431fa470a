"""The control sweep program (`python -m bokeh_jax.sweep`): its measures, and one run each with the
classical reference and with a tiny conditioned model."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
from bokeh_jax import checkpoint, classical, control, sweep
from bokeh_jax import model as model_lib

PHOTOS = os.path.join(helpers.ROOT, 'tests', 'data', 'photos')


def run_sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'bokeh_jax.sweep', *args], cwd=helpers.ROOT,
                          env=helpers.launch_env(), capture_output=True, text=True, timeout=600)


def test_measures_see_blur_only_where_it_is():
    rng = np.random.default_rng(0)
    image = rng.random((60, 80, 3)).astype(np.float32)
    disparity = sweep.ramp_disparity(60, 80, 'horizontal')
    np.testing.assert_array_equal(disparity[5], np.linspace(0, 1, 80, dtype=np.float32))
    in_focus, out_of_focus = sweep.regions(disparity, 0.5)
    assert in_focus[:, 38:42].all() and not in_focus[:, :30].any()  # the columns near x = 40
    assert out_of_focus[:, :10].all() and out_of_focus[:, -10:].all()
    assert not out_of_focus[:, 20:60].any()
    # Blur the left and right thirds only: the out-of-focus measure falls, the in-focus one not.
    blurred = image.copy()
    for part in (slice(0, 27), slice(53, 80)):
        blurred[:, part] = classical.disc_blur(image[:, part], 3.0)
    assert sweep.sharpness(blurred, out_of_focus) < 0.6 * sweep.sharpness(image, out_of_focus)
    assert sweep.sharpness(blurred, in_focus) == sweep.sharpness(image, in_focus)
    with pytest.raises(sweep.UserError, match='flat around the focus'):
        sweep.regions(np.full((8, 8), 0.5, np.float32), 0.5)


def test_classical_sweep_is_monotone_with_a_sharp_focal_plane():
    """The reference: the thin-lens renderer at control.blur_strength(0.06, N) on a real photo
    with a vertical ramp, every full stop from f/2 to f/16."""
    result = run_sweep('--renderer=classical', f'--photos={PHOTOS}/chelsea.jpg')
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith('f/')]
    assert [float(r[0][2:]) for r in rows] == list(control.FULL_STOPS)
    out_of_focus = [float(r[1]) for r in rows]
    assert out_of_focus == sorted(out_of_focus) and out_of_focus[0] < 0.6 * out_of_focus[-1]
    assert '(451x300, depth: ramp (vertical), focal disparity 0.500)' in result.stdout
    resampled = [line.split() for line in lines if line.startswith('  x0.5 x2')][0]
    assert float(resampled[3]) < 0.95  # the half-resolution photo upsampled is less sharp
    assert '  out-of-focus blur monotone in N: yes' in lines
    assert any(line.startswith('  in focus within 10% of the input: yes') for line in lines)
    assert lines[-1] == 'All sweeps monotone with a sharp focal plane: yes'


def test_sweep_refuses_bad_arguments(tmp_path):
    # What the flags go through, called directly (one subprocess per behaviour is too many).
    with pytest.raises(sweep.UserError, match='--fnumbers must be an f-number between 1 and 32'):
        sweep.parse_fnumbers('2,64')
    with pytest.raises(sweep.UserError, match='at least two'):
        sweep.parse_fnumbers('2')
    assert sweep.parse_fnumbers('8,2,4') == [2.0, 4.0, 8.0]
    with pytest.raises(sweep.UserError, match='no such file'):
        sweep.photo_paths(str(tmp_path / 'none'))
    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0), input_channels=4)
    checkpoint.save_params(str(tmp_path), 1, params, {'channels': 4, 'input_channels': 4})
    with pytest.raises(sweep.UserError, match='unconditioned.*--renderer=classical'):
        sweep.model_renderer(str(tmp_path))


def test_sweep_runs_a_conditioned_model(tmp_path):
    """A tiny random aperture_focus model: the program renders every f-number through the model
    and prints the table (an untrained model promises no monotone sweep)."""
    condition = 'aperture_focus'
    model = model_lib.PyNET(4, condition=condition, condition_method='input')
    params = model_lib.init_params(model, jax.random.key(1), input_channels=4, scheme='he')
    checkpoint.save_params(str(tmp_path), 1, params, {
        'channels': 4, 'input_channels': 4, 'condition': condition, 'condition_method': 'input'})
    result = run_sweep(f'--workdir={tmp_path}', f'--photos={PHOTOS}', '--max_side=96',
                       '--ramp=horizontal', '--fnumbers=2,4,8,16')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('(96x64, depth: ramp (horizontal)') == 2, result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith('f/')]
    assert [r[0] for r in rows] == ['f/2', 'f/4', 'f/8', 'f/16'] * 2
    # The f-number reaches the model: the four renders differ.
    assert len({r[1] for r in rows[:4]}) > 1, result.stdout
