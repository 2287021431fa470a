"""The training library: trainable subsets, the optimizer and its schedules, config checks."""

import jax
import numpy as np
import pytest

from bokeh_jax import model as model_lib
from bokeh_jax.training import config_checks
from bokeh_jax.training import optimizer as optimizer_lib
from configs import default
from helpers import assert_trees_equal, tiny_config


def test_trainable_groups_by_name():
    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    mask = optimizer_lib.trainable_mask(params, 1, 'level2,level1')
    trained = {jax.tree_util.keystr(path[:1]) for path, t in
               jax.tree_util.tree_leaves_with_path(mask) if t}
    assert trained == {"['level1']", "['level2']"}
    # Only what is on the path: level 3's side head never feeds level 1.
    mask = optimizer_lib.trainable_mask(params, 1, 'level3')
    assert mask['level3']['f']['k3a']['conv']['kernel']
    assert not mask['level3']['head']['conv']['kernel']


def test_optimizer_state_has_the_same_structure_at_every_level():
    config = default.get_config('tiny')
    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    structures = {jax.tree.structure(optimizer_lib.make_optimizer(config, k).init(params))
                  for k in model_lib.LEVELS}
    assert len(structures) == 1  # so fresh_optimizer_per_level=False can carry Adam moments


def test_learning_rate_schedules_and_carrying_keeps_only_the_adam_moments():
    config = default.get_config('tiny')
    cfg = config.train.level3
    cfg.update({'steps': 100, 'learning_rate': 1e-3, 'lr_schedule': 'cosine', 'warmup_steps': 10})
    schedule = optimizer_lib.learning_rate(cfg)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(5e-4, rel=1e-5)  # half-way down the cosine
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    cfg.update({'steps': 1, 'warmup_steps': 0})  # the shortest level: no warm-up, one step
    assert float(optimizer_lib.learning_rate(cfg)(0)) == pytest.approx(1e-3)
    cfg.update({'steps': 100, 'lr_schedule': 'linear_decay', 'decay_steps': 40})
    decay = optimizer_lib.learning_rate(cfg)
    assert float(decay(0)) == float(decay(60)) == pytest.approx(1e-3)
    assert float(decay(80)) == pytest.approx(5e-4)
    assert float(decay(100)) == pytest.approx(0.0, abs=1e-12)
    cfg.warmup_steps = 20  # warm-up, constant, then the decay: 0 -> 1e-3 (step 20) .. 60 -> 0
    decay = optimizer_lib.learning_rate(cfg)
    assert float(decay(0)) == 0.0 and float(decay(10)) == pytest.approx(5e-4)
    assert float(decay(20)) == float(decay(60)) == pytest.approx(1e-3)
    assert float(decay(80)) == pytest.approx(5e-4) and float(decay(100)) == 0.0
    cfg.lr_schedule = 'constant'
    assert float(optimizer_lib.learning_rate(cfg)(10)) == pytest.approx(5e-4)
    cfg.warmup_steps = 0
    assert float(optimizer_lib.learning_rate(cfg)(0)) == float(
        optimizer_lib.learning_rate(cfg)(99)) == 1e-3

    params = model_lib.init_params(model_lib.PyNET(4), jax.random.key(0))
    tx = optimizer_lib.make_optimizer(config, 3)
    previous = tx.update(jax.tree.map(np.ones_like, params), tx.init(params), params)[1]
    carried = optimizer_lib.carry_moments(previous, tx.init(params))
    assert_trees_equal(carried[0], previous[0])  # Adam moments and their count
    assert int(carried[1].count) == 0 and int(previous[1].count) == 1  # the schedule restarts


@pytest.mark.parametrize('variant', ['', 'demo', 'tiny'])
def test_shipped_configs_are_valid(variant):
    config_checks.validate_config(default.get_config(variant or None), device_count=1)


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
        config_checks.validate_config(config, device_count=2)


def test_warmup_and_decay_longer_than_the_level_are_rejected():
    config = tiny_config('/nonexistent', **{'train.level7.lr_schedule': 'linear_decay',
                                            'train.level7.warmup_steps': 1,
                                            'train.level7.decay_steps': 2})
    with pytest.raises(ValueError, match=r'config.train.level7.warmup_steps \+ decay_steps'):
        config_checks.validate_config(config, device_count=2)


def test_bad_finetune_stage_is_rejected_naming_its_fields():
    for field, value, message in [
            ('learning_rate', 0.0, 'config.train.level7.finetune.learning_rate must be > 0'),
            ('trainable', 'all', 'config.train.level7.finetune.trainable must be'),
            ('decay_steps', 4, r'config.train.level7.finetune.decay_steps must be an integer in')]:
        config = tiny_config('/nonexistent', **{'train.level7.finetune.steps': 3,
                                                f'train.level7.finetune.{field}': value})
        with pytest.raises(ValueError, match=message):
            config_checks.validate_config(config, device_count=2)


