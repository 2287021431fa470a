"""Training in process: trainable subsets, config checks, finetune stages, divergence, half-written
checkpoints. Real launch.py runs (interrupted, resumed, two processes): test_train_processes.py."""

import json
import os
import shutil

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
from helpers import assert_trees_equal, tensorboard_tags, tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('tfds'))
    prepare.prepare_dataset(tiny_config(path).data)
    return path



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
    parameters (here at a negligible rate, so that its saved parameters are still that start).

    Level 2 is a finished level the run finds in the workdir (as a resumed run does): the loop
    hands its parameters to level 1 through the same variable as after training it, and level
    2's train step (the costliest to compile but level 1's) is not needed to show the start."""
    config = tiny_config(data_dir, **{
        'train.order': (2, 1), 'train.level1_start': 'upsample', 'train.level1.trainable': 'level',
        'train.level1.learning_rate': 1e-12, 'train.final_eval': False})
    workdir = str(tmp_path / 'work')
    finished = model_lib.init_params(model_lib.PyNET(4), jax.random.key(2), scheme='he')
    checkpoint.save_params(workdir, 2, finished, {
        'channels': 4, 'input_channels': 4, 'condition': 'none', 'condition_method': 'input',
        'residual': False, 'source': 'train', 'steps': 2})
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        trained = {json.loads(line)['level'] for line in f if '"loss"' in line}
    assert trained == {1}  # level 2 was skipped as finished, level 1 trained
    level2, _ = checkpoint.load_params(workdir, 2)
    assert_trees_equal(level2, finished, 'level 2 as saved')
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
