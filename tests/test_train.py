"""Training: trainable subsets, config checks, and real launch.py runs that are interrupted,
resumed, and spread over two processes."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import optax
import pytest

from bokeh_jax import checkpoint, input_pipeline, train
from bokeh_jax.training import checkpoints as checkpoints_lib
from bokeh_jax.training import multihost
from bokeh_jax.training import optimizer as optimizer_lib
from bokeh_jax import model as model_lib
from configs import default
from tfds_ebb import prepare
from helpers import ROOT, assert_trees_equal, launch, launch_command, launch_env, tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('tfds'))
    prepare.prepare_dataset(tiny_config(path).data)
    return path


# ----------------------------------------------------------------------------- in-process


def _random_batch(level: int, crop: int = 64, devices: int = 2, per_device: int = 1):
    rng = np.random.default_rng(level)
    side = crop * 2 // 2 ** (level - 1)
    return {'input': rng.random((devices, per_device, crop, crop, 4), np.float32),
            'target': rng.random((devices, per_device, side, side, 3), np.float32)}


@pytest.mark.parametrize('mode', ['path', 'level'])
def test_frozen_parameters_do_not_change(mode):
    level = 6
    config = default.get_config('tiny')
    config.train.level6.trainable = mode  # per level; overrides config.train.trainable
    model = model_lib.PyNET(4)
    params = model_lib.init_params(model, jax.random.key(0))
    tx = optimizer_lib.make_optimizer(config, level)
    state = train.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params))
    mask = optimizer_lib.trainable_mask(params, level, mode)
    step = jax.pmap(train.make_train_step(model, level, {'mae': 100.0}, tx, mask),
                    axis_name=train.AXIS)
    replicated = multihost.replicate(state)
    for _ in range(2):
        replicated, metrics = step(replicated, _random_batch(level), {})
    after = multihost.unreplicate(replicated.params)
    # Differentiating only the trained subset gives the gradients of differentiating everything
    # (compared through plain SGD: Adam would blow rounding noise in zero gradients up to full
    # steps).
    frozen = jax.tree.map(lambda t: not t, mask)
    sgd = optax.chain(optax.sgd(1.0), optax.masked(optax.set_to_zero(), frozen))
    updated = []
    for trainable in (mask, None):
        step = jax.pmap(train.make_train_step(model, level, {'mae': 100.0}, sgd, trainable),
                        axis_name=train.AXIS)
        sgd_state = train.TrainState(step=np.int32(0), params=params, opt_state=sgd.init(params))
        new_state, _ = step(multihost.replicate(sgd_state), _random_batch(level), {})
        updated.append(multihost.unreplicate(new_state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), *updated)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, after)
    leaves = jax.tree_util.tree_leaves_with_path(mask)
    for (path, trainable), did_change in zip(leaves, jax.tree.leaves(changed)):
        name = jax.tree_util.keystr(path)
        if not trainable:
            assert not did_change, f'frozen {name} changed'
    # What is trained: level 6's own blocks always; the encoder and level 7's trunk only on the
    # 'path' setting; never level 7's side head or anything finer.
    assert changed['level6']['d3']['k3a']['conv']['kernel']
    assert changed['encoder']['e1']['k3a']['conv']['kernel'] == (mode == 'path')
    assert changed['level7']['d1']['k3a']['conv']['kernel'] == (mode == 'path')
    assert not changed['level7']['head']['conv']['kernel']
    assert not changed['level5']['d3']['k3a']['conv']['kernel']
    assert np.isfinite(float(metrics['loss'][0]))


def test_vgg_loss_without_weights_fails_before_training(tmp_path):
    config = tiny_config(str(tmp_path / 'never_built'), **{'train.level7.loss.vgg': 0.1})
    config.train.order = (7,)
    with pytest.raises(ValueError, match='VGG-19 weights'):
        train.train_and_evaluate(config, str(tmp_path / 'work'))
    assert not os.path.exists(tmp_path / 'never_built')  # nothing was built or compiled


def test_level1_upsampling_start(tmp_path, data_dir):
    """With level1_start='upsample', level 1 trains from model.upsampling_start of level 2's final
    parameters (here at a negligible rate, so that its saved parameters are still that start)."""
    config = tiny_config(data_dir, **{
        'train.order': (2, 1), 'train.level1_start': 'upsample', 'train.level1.trainable': 'level',
        'train.level1.learning_rate': 1e-12, 'train.final_eval': False})
    workdir = str(tmp_path / 'work')
    train.train_and_evaluate(config, workdir)
    level2, _ = checkpoint.load_params(workdir, 2)
    level1, _ = checkpoint.load_params(workdir, 1)
    expected = model_lib.upsampling_start(level2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-9), level1, expected)
    assert not np.allclose(level1['level1']['up']['conv']['kernel'],
                           level2['level1']['up']['conv']['kernel'])


def _finetune_config(data_dir: str):
    """Level 6 alone ('level') for 3 steps, then its whole path for 3 more."""
    return tiny_config(data_dir, **{
        'train.order': (7, 6), 'train.level7.steps': 1, 'train.level6.steps': 3,
        'train.level6.trainable': 'level', 'train.level6.learning_rate': 1e-2,
        'train.level6.finetune.steps': 3, 'train.level6.finetune.learning_rate': 1e-3,
        'train.checkpoint_every': 1, 'train.keep_checkpoints': 20, 'train.final_eval': False,
        'eval.max_images': 1})


def test_finetune_stage_trains_the_path_and_resumes_from_either_stage(tmp_path, data_dir):
    """The second stage trains what the first froze (from fresh Adam state), and a run that lost
    everything after a checkpoint (killed) resumes to the same parameters, whether it died at the
    stage boundary or inside the finetune stage."""
    reference = str(tmp_path / 'reference')
    config = _finetune_config(data_dir)
    train.train_and_evaluate(config, reference)
    checkpoints = os.path.join(reference, 'checkpoints')
    steps = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
    assert steps == list(range(1, 8))  # level 7: 1; level 6: 2..7 (global steps)
    after_level7, _ = checkpoint.load_params(reference, 7)
    final, meta = checkpoint.load_params(reference, 6)
    assert meta['steps'] == 6
    manager = checkpoints_lib.checkpoint_manager(reference, config)
    like = train.TrainState(step=np.int32(0), params=final,
                            opt_state=optimizer_lib.make_optimizer(config, 6).init(final))
    boundary = checkpoints_lib.restore_state(manager, 4, like)  # level 6 step 3: stage 1 done
    manager.close()
    assert int(boundary.step) == 3
    for group in ('encoder', 'level7'):  # frozen in stage 1, trained in stage 2
        assert_trees_equal(boundary.params[group], after_level7[group], group)
        assert not np.allclose(jax.tree.leaves(final[group])[0],
                               jax.tree.leaves(after_level7[group])[0])
    assert not np.allclose(jax.tree.leaves(boundary.params['level6'])[0],
                           jax.tree.leaves(after_level7['level6'])[0])
    with open(os.path.join(reference, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    assert [(r['level'], r['step']) for r in records if 'loss' in r and r['level'] == 6] == [
        (6, s) for s in range(1, 7)]
    assert [r['global_step'] for r in records if 'val_num_images' in r] == [1, 4, 7]
    assert 'level6/validation_grid' in tensorboard_tags(reference)  # worst and best images

    for kept in (4, 6):  # the stage boundary; inside the finetune stage
        workdir = str(tmp_path / f'killed_after_{kept}')
        shutil.copytree(reference, workdir)
        for step in steps:
            if step > kept:
                shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
        shutil.rmtree(os.path.join(workdir, 'params', 'level_6'))
        train.train_and_evaluate(_finetune_config(data_dir), workdir)
        resumed, _ = checkpoint.load_params(workdir, 6)
        assert_trees_equal(resumed, final, f'resumed after global step {kept}')
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            scored = [json.loads(line)['global_step'] for line in f if 'val_num_images' in line]
        assert scored == [1, 4, 7, 7]  # only the level's final score is added on resuming


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    config = tiny_config(data_dir, **{'train.order': (7,), 'train.level7.steps': 20,
                                      'train.level7.learning_rate': 1e30,
                                      'train.checkpoint_every': 1})
    workdir = str(tmp_path / 'work')
    with pytest.raises(FloatingPointError, match=r'Level 7 step \d+: loss is nan'):
        train.train_and_evaluate(config, workdir)
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
    assert steps and steps[-1] < 20
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        logged = [json.loads(line) for line in f]
    assert all(np.isfinite(r['loss']) for r in logged)
    assert checkpoint.saved_levels(workdir) == []  # the level never finished


def test_nan_between_log_steps_stops_before_the_next_checkpoint(tmp_path, data_dir, monkeypatch):
    """Metrics are fetched only at log steps and before checkpoints: a NaN at level step 7 (log
    every 50, checkpoints every 5) still stops the run before the checkpoint of step 10, and the
    one of step 5 holds finite parameters."""
    real = input_pipeline.train_iterator

    def poisoned(data, seed, level, start, **kwargs):
        for step, batch in enumerate(real(data, seed, level, start, **kwargs), start):
            if step == 7:
                batch = {**batch, 'input': np.full_like(batch['input'], np.nan)}
            yield batch

    monkeypatch.setattr(input_pipeline, 'train_iterator', poisoned)
    config = tiny_config(data_dir, **{'train.order': (7,), 'train.level7.steps': 20,
                                      'train.log_every': 50, 'train.checkpoint_every': 5,
                                      'train.keep_checkpoints': 10})
    workdir = str(tmp_path / 'work')
    with pytest.raises(FloatingPointError, match=r'Level 7 step 7: loss is nan.*level step 5'):
        train.train_and_evaluate(config, workdir)
    manager = checkpoints_lib.checkpoint_manager(workdir, config)
    assert manager.all_steps() == [5]
    like = train.TrainState(step=np.int32(0), params=model_lib.init_params(
        model_lib.PyNET(4), jax.random.key(0)), opt_state=None)
    like = like.replace(opt_state=optimizer_lib.make_optimizer(config, 7).init(like.params))
    restored = checkpoints_lib.restore_state(manager, 5, like)
    manager.close()
    assert int(restored.step) == 5
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))
    assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or all(
        'loss' not in line for line in open(os.path.join(workdir, 'metrics.jsonl')))


def _poison(monkeypatch, data_steps):
    """The input pipeline serves NaN inputs at these data steps."""
    real = input_pipeline.train_iterator

    def poisoned(data, seed, level, start, **kwargs):
        for step, batch in enumerate(real(data, seed, level, start, **kwargs), start):
            if step in data_steps:
                batch = {**batch, 'input': np.full_like(batch['input'], np.nan)}
            yield batch

    monkeypatch.setattr(input_pipeline, 'train_iterator', poisoned)


def _rollback_config(data_dir: str, **overrides):
    return tiny_config(data_dir, **{
        'train.order': (7,), 'train.level7.steps': 12, 'train.log_every': 50,
        'train.checkpoint_every': 5, 'train.keep_checkpoints': 10, 'train.final_eval': False,
        'eval.max_images': 1, 'train.val_grid_tile': 0, 'train.on_divergence': 'rollback',
        **overrides})


def test_rollback_skips_the_window_and_equals_a_run_that_skipped_it(tmp_path, data_dir,
                                                                    monkeypatch):
    """A NaN at data step 7 (checkpoints every 5, metrics fetched at 10) rolls back to level step
    5 and skips data steps 5..7; the result is finite, logged, recorded in the checkpoints, and
    bit-identical to a run told to skip that window from the start."""
    _poison(monkeypatch, {7})
    rolled = str(tmp_path / 'rolled')
    train.train_and_evaluate(_rollback_config(data_dir), rolled)
    params, _ = checkpoint.load_params(rolled, 7)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    with open(os.path.join(rolled, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    [rollback] = [r for r in records if 'rollback' in r]
    assert rollback['rollback_loss'] == 'nan' and rollback['rollback_to_step'] == 5
    assert (rollback['skipped_data_first'], rollback['skipped_data_last']) == (5, 7)
    assert 'level7/rollback' in tensorboard_tags(rolled)
    manager = checkpoints_lib.checkpoint_manager(rolled, _rollback_config(data_dir))
    meta = checkpoints_lib.latest_meta(manager)
    manager.close()
    assert meta['skip_windows'] == [[5, 7]] and len(meta['rollbacks']) == 1

    skipped = str(tmp_path / 'skipped')
    train.train_and_evaluate(_rollback_config(data_dir, **{
        'train.level7.skip_windows': ((5, 7),), 'train.on_divergence': 'stop'}), skipped)
    assert_trees_equal(params, checkpoint.load_params(skipped, 7)[0], 'rolled back vs skipped')


def test_rollbacks_give_up_after_max_rollbacks_listing_them(tmp_path, data_dir, monkeypatch):
    _poison(monkeypatch, {7, 9})  # the second one is level step 6 once 5..7 are skipped
    config = _rollback_config(data_dir, **{'train.max_rollbacks': 1})
    with pytest.raises(FloatingPointError, match=r'Level 7 step 6: loss is nan.*gave up after 1 '
                                                 r'rollbacks.*step 7 loss nan.*data steps 5\.\.7'):
        train.train_and_evaluate(config, str(tmp_path / 'work'))


# ----------------------------------------------------------------------------- launch.py runs

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


def tensorboard_tags(workdir: str) -> set[str]:
    import tensorflow as tf  # only to read the event files
    tags = set()
    for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


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


def test_two_processes_match_one_process_on_two_devices(data_dir, uninterrupted, tmp_path):
    workdir = str(tmp_path / 'multihost')
    port = _free_port()
    processes, logs = [], []
    for process_id in (0, 1):
        args = _two_process_args(data_dir, workdir, port, process_id)
        # Output goes to files: a full pipe would block one process inside a collective.
        logs.append(open(tmp_path / f'process{process_id}.log', 'w+'))
        processes.append(subprocess.Popen(
            launch_command(*args), cwd=ROOT, env=launch_env(1), stdout=logs[-1],
            stderr=subprocess.STDOUT, text=True))
    try:
        for p in processes:
            p.wait(timeout=500)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, log in zip(processes, logs):
        log.seek(0)
        assert p.returncode == 0, log.read()[-4000:]
        log.close()
    # Only process 0 logs.
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        assert sum(1 for line in f if '"loss"' in line) == sum(RUN_STEPS.values())
    for level in (7, 6):
        multi, _ = checkpoint.load_params(workdir, level)
        single, _ = checkpoint.load_params(uninterrupted, level)
        assert_trees_equal(multi, single, f'level {level}')




def test_sigterm_to_one_of_two_processes_stops_both_at_one_checkpoint(data_dir, uninterrupted,
                                                                      tmp_path):
    """A SIGTERM to process 1 alone reaches process 0 through JAX's preemption sync point: both
    save one checkpoint at the same step and exit 75; it resumes (here on one process with two
    devices) to the uninterrupted run's parameters."""
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

    launch(*train_args(data_dir, workdir), devices=2)
    for level in (7, 6):
        resumed, _ = checkpoint.load_params(workdir, level)
        reference, _ = checkpoint.load_params(uninterrupted, level)
        assert_trees_equal(resumed, reference, f'level {level}')


def test_half_written_checkpoints_are_set_aside_not_deleted(tmp_path, caplog):
    workdir = tmp_path / 'work'
    for folder in ('checkpoints/4/state', 'checkpoints/4/meta', 'checkpoints/8/state',
                   'checkpoints/12.orbax-checkpoint-tmp/state', 'params/level_7/params',
                   'params/level_7/meta', 'params/level_6/meta',
                   'params/level_5.orbax-checkpoint-tmp/params'):
        os.makedirs(workdir / folder)
    (workdir / 'checkpoints' / '8' / 'state' / 'data').write_text('kept')
    moved = checkpoints_lib.set_aside_incomplete(str(workdir))
    assert sorted(os.path.basename(os.path.dirname(p)) + '/' + os.path.basename(p).split('.')[0]
                  for p in moved) == ['checkpoints/12', 'checkpoints/8', 'params/level_5',
                                      'params/level_6']
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['4']
    assert sorted(os.listdir(workdir / 'params')) == ['level_7']
    [step8] = [p for p in moved if os.path.basename(p).startswith('8.')]
    assert open(os.path.join(step8, 'state', 'data')).read() == 'kept'
    assert f'Half-written {workdir}/checkpoints/12.orbax-checkpoint-tmp' in caplog.text


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
