"""launch.py --mode=estimate: the schedule's wall time and peak memory, on the tiny config."""

import json
import os

from helpers import launch


def test_estimate_prints_each_level_and_the_total(tmp_path):
    workdir = str(tmp_path / 'work')
    # Level 7 only; a zero step budget makes it time one image per device and scale to the batch.
    result = launch('--mode=estimate', '--config=configs/default.py:tiny', f'--workdir={workdir}',
                    '--config.train.order=(7,)', '--config.train.level7.steps=1000',
                    '--config.train.level7.batch_size=4', '--estimate_step_budget=0', devices=2)
    assert 'level 7 main' in result.stdout and 'Total:' in result.stdout
    assert 'timed at batch 2, scaled linearly' in result.stdout
    saved = json.load(open(os.path.join(workdir, 'estimate.json')))
    [stage] = saved['stages']
    assert stage['level'] == 7 and stage['steps'] == 1000 and stage['timed_batch'] == 2
    assert 0 < stage['step_s'] < 60 and stage['peak_bytes'] > 2**20
    assert abs(saved['total_s'] - 1000 * stage['step_s']) < 1e-6 * saved['total_s']
