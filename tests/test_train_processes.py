"""Real launch.py training runs: interrupted (SIGTERM, SIGKILL at three points), resumed, and
spread over two processes, each compared with one uninterrupted run."""

import glob
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from bokeh_jax import checkpoint
from tfds_ebb import prepare
from helpers import (ROOT, assert_trees_equal, launch, launch_command, launch_env,
                     tensorboard_tags, tiny_config)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('tfds'))
    prepare.prepare_dataset(tiny_config(path).data)
    return path


# Two levels, enough steps at level 6 for a signal to land in the middle of it.
RUN_STEPS = {7: 3, 6: 30}


def train_args(data_dir: str, workdir: str) -> list[str]:
    return ['--mode=train', '--config=configs/default.py:tiny', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}', '--config.train.order=(7, 6)',
            f'--config.train.level7.steps={RUN_STEPS[7]}',
            f'--config.train.level6.steps={RUN_STEPS[6]}',
            '--config.train.checkpoint_every=4', '--config.eval.max_images=2']


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
    """One process, two devices, straight through."""
    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    launch(*train_args(data_dir, workdir), devices=2)
    return workdir


def test_uninterrupted_run_writes_levels_logs_and_checkpoints(uninterrupted):
    assert checkpoint.saved_levels(uninterrupted) == [6, 7]
    params, meta = checkpoint.load_params(uninterrupted)
    assert meta['level'] == 6 and meta['channels'] == 4 and meta['source'] == 'train'
    with open(os.path.join(uninterrupted, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    steps = [(r['level'], r['step']) for r in records if 'loss' in r]
    assert steps == [(7, s) for s in range(1, 4)] + [(6, s) for s in range(1, 31)]
    scored = [r for r in records if 'val_num_images' in r]
    assert [r['level'] for r in scored] == [7, 6]
    # The last level's record is the final evaluation's, which scores every baseline.
    assert 'val_baselines_classical_psnr' in scored[1]
    assert 'val_baselines_classical_psnr' not in scored[0]
    assert os.path.exists(os.path.join(uninterrupted, 'eval', 'validation_level6_pynet',
                                       'grid.png'))
    assert tensorboard_tags(uninterrupted) >= {'level7/loss', 'level6/loss', 'level6/val_psnr'}


def test_workdir_remembers_its_config(uninterrupted):
    """Eval on a trained workdir without --config uses the config that trained it (the tiny
    width, its data and eval split), and a --config that changes the model is refused."""
    saved = json.load(open(os.path.join(uninterrupted, 'config.json')))
    assert saved['source'] == 'configs/default.py:tiny'
    assert saved['config']['model']['channels'] == 4
    result = launch('--mode=eval', f'--workdir={uninterrupted}', '--config.eval.max_images=1',
                    '--config.eval.level=6',
                    '--config.eval.baselines=("identity",)')
    assert 'Using the config saved in' in result.stderr
    summary = json.load(open(os.path.join(uninterrupted, 'eval', 'validation_level6_pynet',
                                          'summary.json')))
    assert summary['num_images'] == 1 and summary['level'] == 6
    result = launch('--mode=eval', '--config=configs/default.py:tiny', f'--workdir={uninterrupted}',
                    '--config.model.channels=8', check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: config.model.channels=8 disagrees with') and 'Traceback' not in result.stderr


def test_sigterm_then_resume_equals_uninterrupted_run(data_dir, uninterrupted, tmp_path):
    workdir = str(tmp_path / 'interrupted')
    args = train_args(data_dir, workdir)
    log = open(tmp_path / 'interrupted.log', 'w+')  # a file: a full pipe would stall the run
    process = subprocess.Popen(launch_command(*args), cwd=ROOT, env=launch_env(2), stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics):
            with open(metrics) as f:
                if any(json.loads(line).get('level') == 6 for line in f if line.strip()):
                    break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    log.seek(0)
    out = log.read()
    log.close()
    assert process.returncode == 75, out[-3000:]  # saved and asked to be re-run
    assert 'Re-run to resume' in out
    assert checkpoint.saved_levels(workdir) == [7]

    result = launch(*args, devices=2)
    assert 'already finished' in result.stderr or 'Resuming level 6' in result.stderr
    for level in (7, 6):
        resumed, _ = checkpoint.load_params(workdir, level)
        reference, _ = checkpoint.load_params(uninterrupted, level)
        assert_trees_equal(resumed, reference, f'level {level}')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_process_args(data_dir: str, workdir: str, port: int, process_id: int) -> list[str]:
    return [*train_args(data_dir, workdir), '--config.train.distributed=yes',
            f'--config.dist.coordinator_address=127.0.0.1:{port}',
            '--config.dist.num_processes=2', f'--config.dist.process_id={process_id}',
            '--config.dist.cpu_collectives=gloo', '--config.dist.initialization_timeout=60',
            '--config.dist.heartbeat_timeout=30']


def test_sigterm_to_one_of_two_processes_stops_both_at_one_checkpoint(data_dir, uninterrupted,
                                                                      tmp_path):
    """Two processes of one device each train like one process with two devices, and a SIGTERM
    to process 1 alone reaches process 0 through JAX's preemption sync point: both save one
    checkpoint at the same step and exit 75, only process 0 logs, and the run resumes (here on
    one process with two devices) to the uninterrupted run's parameters: level 7 and the start of
    level 6 trained by the two processes, the rest by one."""
    workdir = str(tmp_path / 'preempted')
    port = _free_port()
    processes, logs = [], []
    for process_id in (0, 1):
        process, log = _start(_two_process_args(data_dir, workdir, port, process_id),
                              tmp_path / f'process{process_id}.log', devices=1)
        processes.append(process)
        logs.append(log)
    try:
        deadline = time.time() + 400
        while (time.time() < deadline and processes[0].poll() is None
               and _level6_steps_logged(workdir) < 2):
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(timeout=300)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    outs = []
    for p, log in zip(processes, logs):
        log.seek(0)
        outs.append(log.read())
        log.close()
        assert p.returncode == 75, outs[-1][-4000:]
    stopped = [line for out in outs for line in out.splitlines() if 'preemption notice' in line]
    assert len(stopped) == 2 and len({line.split(' step ')[1] for line in stopped}) == 1, stopped
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
    assert steps and steps[-1] < sum(RUN_STEPS.values())
    assert not glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*'))
    assert checkpoint.saved_levels(workdir) == [7]
    logged = _level6_steps_logged(workdir)  # one line per step (log_every 1) if only process 0 logs
    assert steps[-1] - RUN_STEPS[7] in (logged, logged + 1), (steps, logged)

    launch(*train_args(data_dir, workdir), devices=2)
    for level in (7, 6):
        resumed, _ = checkpoint.load_params(workdir, level)
        reference, _ = checkpoint.load_params(uninterrupted, level)
        assert_trees_equal(resumed, reference, f'level {level}')


def _start(args: list[str], log_path, devices: int = 2) -> tuple[subprocess.Popen, object]:
    log = open(log_path, 'w+')  # a file: a full pipe would stall the run
    return subprocess.Popen(launch_command(*args), cwd=ROOT, env=launch_env(devices), stdout=log,
                            stderr=subprocess.STDOUT, text=True), log


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.002)
    assert process.poll() is None, 'the run ended before the kill point'
    process.kill()  # SIGKILL: no handler, no cleanup
    process.wait(timeout=60)


def _level6_steps_logged(workdir: str) -> int:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"loss"' in line and '"level": 6' in line)


def test_sigkill_at_three_points_then_resume_equals_uninterrupted_run(data_dir, uninterrupted,
                                                                      tmp_path):
    """SIGKILL during the end-of-level parameter save, during an async checkpoint save, and
    between steps; each re-run sets the half-written folder aside (naming it) and resumes, and
    the last one ends with the parameters of the uninterrupted run."""
    workdir = str(tmp_path / 'killed')
    args = train_args(data_dir, workdir)
    level7_tmp = os.path.join(workdir, 'params', 'level_7.orbax-checkpoint-tmp')
    step11_tmp = os.path.join(workdir, 'checkpoints', '11.orbax-checkpoint-tmp')  # level 6 step 8
    kills = [lambda: os.path.exists(level7_tmp), lambda: os.path.exists(step11_tmp),
             lambda: _level6_steps_logged(workdir) >= 22]
    half_written = []
    for index, ready in enumerate(kills):
        process, log = _start(args, tmp_path / f'run{index}.log')
        _kill_when(process, ready)
        log.seek(0)
        out = log.read()
        log.close()
        if index and half_written and half_written[-1][0] == index - 1:
            assert f'Half-written {half_written[-1][1]}' in out, out[-3000:]
        assert process.returncode == -signal.SIGKILL, out[-3000:]
        for tmp in (level7_tmp, step11_tmp):
            if os.path.exists(tmp):
                half_written.append((index, tmp))
    assert half_written, 'no kill landed inside a save'
    result = launch(*args, devices=2)
    assert 'Resuming level 6' in result.stderr
    for level in (7, 6):
        resumed, _ = checkpoint.load_params(workdir, level)
        reference, _ = checkpoint.load_params(uninterrupted, level)
        assert_trees_equal(resumed, reference, f'level {level}')
    assert os.listdir(os.path.join(workdir, 'incomplete'))  # set aside, not deleted
