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
from bokeh_jax import model as model_lib
from configs import default
from tfds_ebb import prepare
from helpers import ROOT, assert_trees_equal, launch, launch_command, launch_env


def tiny_config(data_dir: str, **overrides):
    config = default.get_config('tiny')
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split('.')
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config


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
    tx = train.make_optimizer(config, level)
    state = train.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params))
    mask = train.trainable_mask(params, level, mode)
    step = jax.pmap(train.make_train_step(model, level, {'mae': 100.0}, tx, mask),
                    axis_name=train.AXIS)
    replicated = train.replicate(state)
    for _ in range(2):
        replicated, metrics = step(replicated, _random_batch(level), {})
    after = train.unreplicate(replicated.params)
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
        new_state, _ = step(train.replicate(sgd_state), _random_batch(level), {})
        updated.append(train.unreplicate(new_state.params))
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


def test_trainable_groups_by_name():
    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    mask = train.trainable_mask(params, 1, 'level2,level1')
    trained = {jax.tree_util.keystr(path[:1]) for path, t in
               jax.tree_util.tree_leaves_with_path(mask) if t}
    assert trained == {"['level1']", "['level2']"}
    # Only what is on the path: level 3's side head never feeds level 1.
    mask = train.trainable_mask(params, 1, 'level3')
    assert mask['level3']['f']['k3a']['conv']['kernel']
    assert not mask['level3']['head']['conv']['kernel']


def test_optimizer_state_has_the_same_structure_at_every_level():
    config = default.get_config('tiny')
    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    structures = {jax.tree.structure(train.make_optimizer(config, k).init(params))
                  for k in model_lib.LEVELS}
    assert len(structures) == 1  # so fresh_optimizer_per_level=False can carry Adam moments


def test_learning_rate_schedules_and_carrying_keeps_only_the_adam_moments():
    config = default.get_config('tiny')
    cfg = config.train.level3
    cfg.update({'steps': 100, 'learning_rate': 1e-3, 'lr_schedule': 'cosine', 'warmup_steps': 10})
    schedule = train.learning_rate(cfg)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(5e-4, rel=1e-5)  # half-way down the cosine
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    cfg.update({'steps': 1, 'warmup_steps': 0})  # the shortest level: no warm-up, one step
    assert float(train.learning_rate(cfg)(0)) == pytest.approx(1e-3)
    cfg.update({'steps': 100, 'lr_schedule': 'linear_decay', 'decay_steps': 40})
    decay = train.learning_rate(cfg)
    assert float(decay(0)) == float(decay(60)) == pytest.approx(1e-3)
    assert float(decay(80)) == pytest.approx(5e-4)
    assert float(decay(100)) == pytest.approx(0.0, abs=1e-12)
    cfg.warmup_steps = 20  # warm-up, constant, then the decay: 0 -> 1e-3 (step 20) .. 60 -> 0
    decay = train.learning_rate(cfg)
    assert float(decay(0)) == 0.0 and float(decay(10)) == pytest.approx(5e-4)
    assert float(decay(20)) == float(decay(60)) == pytest.approx(1e-3)
    assert float(decay(80)) == pytest.approx(5e-4) and float(decay(100)) == 0.0
    cfg.lr_schedule = 'constant'
    assert float(train.learning_rate(cfg)(10)) == pytest.approx(5e-4)
    cfg.warmup_steps = 0
    assert float(train.learning_rate(cfg)(0)) == float(train.learning_rate(cfg)(99)) == 1e-3

    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    tx = train.make_optimizer(config, 3)
    previous = tx.update(jax.tree.map(np.ones_like, params), tx.init(params), params)[1]
    carried = train.carry_moments(previous, tx.init(params))
    assert_trees_equal(carried[0], previous[0])  # Adam moments and their count
    assert int(carried[1].count) == 0 and int(previous[1].count) == 1  # the schedule restarts


@pytest.mark.parametrize('variant', ['', 'demo', 'tiny'])
def test_shipped_configs_are_valid(variant):
    train.validate_config(default.get_config(variant or None), device_count=1)


@pytest.mark.parametrize('field, value, message', [
    ('train.order', (7, 8), 'config.train.order must list levels'),
    ('train.order', (6, 7), 'coarse to fine'),
    ('train.level7.steps', 0, 'config.train.level7.steps must be a positive integer'),
    ('train.level6.batch_size', 3, r'config.train.level6.batch_size=3 is not divisible by the 2'),
    ('train.level7.batch_size', -2, 'config.train.level7.batch_size must be a positive'),
    ('data.crop_size', 48, 'config.data.crop_size must be a positive multiple of 32'),
    ('train.trainable', 'all', 'config.train.trainable'),
    ('train.level6.trainable', 'everything', 'config.train.level6.trainable must be'),
    ('train.level6.trainable', 'level6,level9', 'config.train.level6.trainable must be'),
    ('model.conv_impl', 'fast', 'config.model.conv_impl must be one of'),
    ('model.init', 'xavier', 'config.model.init must be one of'),
    ('train.level1_start', 'bilinear', 'config.train.level1_start must be one of'),
    ('train.level7.learning_rate', 0.0, 'config.train.level7.learning_rate must be > 0'),
    ('train.level7.lr_schedule', 'linear', 'config.train.level7.lr_schedule must be one of'),
    ('train.level7.warmup_steps', 2, r'config.train.level7.warmup_steps must be an integer in'),
    ('train.level7.decay_steps', -1, r'config.train.level7.decay_steps must be an integer in'),
    ('train.level7.finetune.steps', -1, 'config.train.level7.finetune.steps must be an integer'),
    ('train.adam_b2', 1.0, r'config.train.adam_b2 must be in \[0, 1\)'),
    ('train.adam_b1', -0.1, r'config.train.adam_b1 must be in \[0, 1\)'),
    ('train.adam_eps', 0.0, 'config.train.adam_eps must be > 0'),
    ('data.cache_mb', -1, 'config.data.cache_mb must be a number >= 0'),
    ('train.val_grid_tile', -1, 'config.train.val_grid_tile must be an integer >= 0'),
])
def test_bad_config_is_rejected_naming_the_field(field, value, message):
    config = tiny_config('/nonexistent', **{field: value})
    with pytest.raises(ValueError, match=message):
        train.validate_config(config, device_count=2)


def test_warmup_and_decay_longer_than_the_level_are_rejected():
    config = tiny_config('/nonexistent', **{'train.level7.lr_schedule': 'linear_decay',
                                            'train.level7.warmup_steps': 1,
                                            'train.level7.decay_steps': 2})
    with pytest.raises(ValueError, match=r'config.train.level7.warmup_steps \+ decay_steps'):
        train.validate_config(config, device_count=2)


def test_bad_finetune_stage_is_rejected_naming_its_fields():
    for field, value, message in [
            ('learning_rate', 0.0, 'config.train.level7.finetune.learning_rate must be > 0'),
            ('trainable', 'all', 'config.train.level7.finetune.trainable must be'),
            ('decay_steps', 4, r'config.train.level7.finetune.decay_steps must be an integer in')]:
        config = tiny_config('/nonexistent', **{'train.level7.finetune.steps': 3,
                                                f'train.level7.finetune.{field}': value})
        with pytest.raises(ValueError, match=message):
            train.validate_config(config, device_count=2)


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
    manager = train.checkpoint_manager(reference, config)
    like = train.TrainState(step=np.int32(0), params=final,
                            opt_state=train.make_optimizer(config, 6).init(final))
    boundary = train.restore_state(manager, 4, like)  # level 6 step 3: stage 1 done
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


def test_two_processes_match_one_process_on_two_devices(data_dir, uninterrupted, tmp_path):
    workdir = str(tmp_path / 'multihost')
    port = _free_port()
    processes, logs = [], []
    for process_id in (0, 1):
        args = [*train_args(data_dir, workdir), '--config.train.distributed=yes',
                f'--config.dist.coordinator_address=127.0.0.1:{port}',
                '--config.dist.num_processes=2', f'--config.dist.process_id={process_id}',
                '--config.dist.cpu_collectives=gloo', '--config.dist.initialization_timeout=60',
                '--config.dist.heartbeat_timeout=30']
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
