"""Benchmark harness and its peers: the peers compute PyNET's function, the harness runs end to end.

Timings are never asserted (STYLE: benchmarks print figures); what is checked is that every
figure is there, consistent, and measured on the right function.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bokeh_jax import model as model_lib
from bokeh_jax.bench import breakdown, harness, peers, programs
from configs import default as default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANNELS = 4


@pytest.fixture(scope='module')
def tiny():
    model = model_lib.PyNET(CHANNELS)
    params = model_lib.init_params(model, jax.random.key(3))
    # Non-trivial instance-norm scales/shifts and biases, so that every parameter kind matters.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v if path[-1].key == 'kernel'
        else (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32),
        params,
    )
    x = np.random.default_rng(1).random((2, 64, 96, 4), dtype=np.float32)
    return model, params, x


def test_tf_peer_computes_pynet(tiny):
    tf = pytest.importorskip('tensorflow')
    from bokeh_jax.bench import tf_peer

    model, params, x = tiny
    expected = jax.jit(lambda p, x: model.apply({'params': p}, x, level=1))(params, x)
    peer = tf_peer.TFPyNET(params)
    got = tf.function(lambda x: peer.outputs(x, 1))(tf.constant(x))
    assert sorted(got) == list(range(1, 8))
    for level in range(1, 8):
        assert got[level].shape == expected[level].shape
        np.testing.assert_allclose(got[level], expected[level], atol=2e-5, err_msg=f'level {level}')
    # The benchmarked entry point returns the asked level's image.
    np.testing.assert_allclose(peer.forward_fn(4)(tf.constant(x)), expected[4], atol=2e-5)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _jax_loss_and_grads(model, params, level, x, target):
    def loss_fn(p):
        return 100.0 * jnp.mean(jnp.abs(model.apply({'params': p}, x, level=level)[level] - target))

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def _pre_norm_bias(params, path) -> bool:
    """A conv bias followed by instance norm: its true gradient is 0, both sides give rounding."""
    return path[-2:] == ('conv', 'bias') and 'norm' in _leaf(params, path[:-2])


def test_tf_peer_gradients_match_jax(tiny):
    level = 1  # the whole network: every kind of layer, fine levels included
    tf = pytest.importorskip('tensorflow')
    from bokeh_jax.bench import tf_peer

    model, params, x = tiny
    x = x[:1]
    s = model_lib.level_output_scale(level)
    rng = np.random.default_rng(2)
    target = rng.random((1, int(x.shape[1] * s), int(x.shape[2] * s), 3), dtype=np.float32)
    loss, grads = _jax_loss_and_grads(model, params, level, x, target)

    peer = tf_peer.TFPyNET(params)
    paths = peer.trainable_paths(level)
    tf_loss, tf_grads = peer.loss_and_grads_fn(level)(tf.constant(x), tf.constant(target))
    np.testing.assert_allclose(tf_loss, loss, rtol=1e-5)
    errors = {}
    for path, g in zip(paths, tf_grads):
        want, got = np.asarray(_leaf(grads, path)), np.asarray(g)
        if _pre_norm_bias(params, path):
            continue
        errors[path] = np.linalg.norm(got - want) / np.linalg.norm(want)
    # Levels 1, 2 and level 3's last block sit right before the loss: tight. Deeper, leaky-ReLU
    # kinks and instance norm over the few pixels of a width-4 model's coarse levels amplify float
    # rounding (JAX's own conv algorithms disagree with each other as much), so there only the
    # bulk must agree.
    near = {
        p: e for p, e in errors.items() if p[0] in ('level1', 'level2') or p[:2] == ('level3', 'f')
    }
    assert len(near) == 10 and max(near.values()) < 1e-3, near
    assert np.median(list(errors.values())) < 2e-2 and max(errors.values()) < 0.1, max(
        errors.items(), key=lambda kv: kv[1]
    )


def test_tf_peer_and_jax_train_steps_apply_adam(tiny):
    """One step of each moves every weight of the path by Adam's first update of its gradient."""
    tf = pytest.importorskip('tensorflow')
    from bokeh_jax.bench import tf_peer

    # Level 7 (encoder + level 7) keeps compilation short; the gradients are checked above.
    model, params, x = tiny
    level, x = 7, x[:1]
    rng = np.random.default_rng(4)
    target = rng.random((1, x.shape[1] // 32, x.shape[2] // 32, 3), dtype=np.float32)
    _, grads = _jax_loss_and_grads(model, params, level, x, target)
    peer = tf_peer.TFPyNET(params)
    paths = peer.trainable_paths(level)
    _, tf_grads = peer.loss_and_grads_fn(level)(tf.constant(x), tf.constant(target))

    # At step 1 Adam moves a weight by lr * g / (|g| + eps') with eps' = eps for optax and
    # eps / sqrt(1 - b2) for TF's ResourceApplyAdam (TF1's AdamOptimizer puts eps outside the
    # bias correction). The JAX step is the project's own (bokeh_jax.train), which the bench times.
    lr, eps, b2 = 5e-5, 1e-8, 0.999
    config = default_config.get_config()
    config.train[f'level{level}'].learning_rate = lr
    config.train.update(adam_b1=0.9, adam_b2=b2, adam_eps=eps)
    program = programs.train_program(config, model, level)
    state = program.init(params)
    before = {'/'.join(p): np.asarray(_leaf(params, p)) for p in paths}
    state, jax_loss = program.unpack(program.jitted(*program.pack(state, x, target)))
    tf_loss = peer.train_step_fn(level, learning_rate=lr)(tf.constant(x), tf.constant(target))
    np.testing.assert_allclose(tf_loss[()], np.asarray(jax_loss)[0], rtol=1e-5)
    after = jax.tree.map(lambda a: np.asarray(a)[0], state.params)
    moved = sorted('/'.join(k.key for k in path) for path, v in
                   jax.tree_util.tree_flatten_with_path(after)[0]
                   if not np.array_equal(v, np.asarray(_leaf(params, [k.key for k in path]))))
    # Off the path nothing moves (on it, the Adam check below covers every weight).
    assert moved and set(moved) <= set(before), sorted(set(moved) - set(before))
    agree = {'jax': [], 'tf': []}
    for path, variable, tf_grad in zip(paths, peer.trainable(level), tf_grads):
        if _pre_norm_bias(params, path):
            continue
        key = '/'.join(path)
        g, g_tf = np.asarray(_leaf(grads, path)), tf_grad.numpy()
        deltas = {
            'jax': (np.asarray(_leaf(after, path)) - before[key], -lr * g / (np.abs(g) + eps)),
            'tf': (variable.numpy() - before[key],
                   -lr * g_tf / (np.abs(g_tf) + eps / np.sqrt(1 - b2))),
        }
        for name, (delta, expected) in deltas.items():
            agree[name].append(np.isclose(delta, expected, atol=1e-9, rtol=1e-3).ravel())
    # Gradients within rounding of 0 (recomputed inside each step) may flip sign: allow 1%.
    for name, flags in agree.items():
        assert np.concatenate(flags).mean() > 0.99, name


def test_torch_peer_computes_pynet(tiny):
    torch = pytest.importorskip('torch', reason='torch is the GPU peer, not a project dependency')
    from bokeh_jax.bench import torch_peer

    model, params, x = tiny
    expected = jax.jit(lambda p, x: model.apply({'params': p}, x, level=1))(params, x)
    peer = torch_peer.TorchPyNET(params, device='cpu')
    with torch.no_grad():
        got = peer.outputs(peer.to_input(x), 1)
    for level in range(1, 8):
        np.testing.assert_allclose(
            got[level].permute(0, 2, 3, 1).cpu().numpy(), expected[level], atol=2e-5,
            err_msg=f'level {level}',
        )


def _tiny_bench_config(**bench):
    config = default_config.get_config()
    config.model.channels = CHANNELS
    config.bench.update(
        forward_size='64x64',
        patch=64,
        train_levels=(7,),
        train_batches=(1,),
        render=False,
        per_level=True,
        profile=True,
        profile_top=3,
        repeats=2,
        warmup=0,
        peers=('tf',),
    )
    config.bench.update(bench)
    return config


def test_harness_runs_and_reports_consistent_figures(tmp_path):
    pytest.importorskip('tensorflow')
    config = _tiny_bench_config()
    results = harness.run(config, str(tmp_path))

    with open(tmp_path / 'bench.json') as f:
        assert json.load(f)['rows'] == json.loads(json.dumps(results['rows']))
    rows = {(r['name'], r['impl']): r for r in results['rows']}
    peak = results['conv_peak_gflop_per_s']
    assert peak > 0
    forward = rows['forward 64x64 float32', 'jax']
    assert forward['repeats'] == 2 and len(forward['times_s']) == 2
    assert forward['gflop'] == pytest.approx(
        results['per_level'][-1]['gflop'] + sum(e['gflop'] for e in results['per_level'][:-1])
    )
    assert forward['gflop_per_s'] == pytest.approx(forward['gflop'] / forward['median_s'])
    assert forward['peak_fraction'] == pytest.approx(forward['gflop_per_s'] / peak)
    assert forward['compile_s'] > 0 and forward['peak_memory_mb'] > 0
    tf_forward = rows['forward 64x64 float32', 'tf']
    assert forward['vs']['tf'] == pytest.approx(
        np.median(np.array(forward['times_s']) / np.array(tf_forward['times_s']))
    )
    train = rows['train L7 b1 64px', 'jax']
    assert train['gflop'] > 0 and train['vs']['tf'] > 0 and 'make_train_step' in train['note']
    assert rows['train L7 b1 64px', 'tf']['images_per_s'] > 0

    levels = [e['level'] for e in results['per_level']]
    assert levels == list(model_lib.LEVELS)
    assert all(e['gflop'] > 0 for e in results['per_level'])

    # Every convolution of the forward pass is in the profile once per call: one per kernel, but
    # level 1's RGB head, which runs as shifted products (model.conv3x3_few_channels).
    shapes = model_lib.param_shapes(CHANNELS)
    kernels = sum(1 for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
                  if p[-1].key == 'kernel')
    profile = results['conv_profile']
    assert sum(e['count'] for e in profile) == kernels - 1
    assert all(e['jax_gflop_per_s'] > 0 for e in profile)
    assert all(('tf_s' in e) == e['plain'] for e in profile)
    totals = [e['jax_total_s'] for e in profile]
    assert totals == sorted(totals, reverse=True)


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('forward_size', '100x64', 'config.bench.forward_size'),
        ('render_size', '64', 'config.bench.render_size'),
        ('forward_dtypes', ('float16',), 'config.bench.forward_dtypes'),
        ('train_levels', (0,), 'config.bench.train_levels'),
        ('train_batches', (0,), 'config.bench.train_batches'),
        ('peers', ('caffe',), 'config.bench.peers'),
        ('patch', 100, 'config.bench.patch'),
    ],
)
def test_bad_bench_config_is_named(field, value, message):
    config = _tiny_bench_config(**{field: value})
    with pytest.raises(ValueError, match=message):
        harness.validate(config.bench)


def test_launch_bench_mode(tmp_path):
    env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
    result = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, 'launch.py'), '--mode=bench',
            f'--workdir={tmp_path}', f'--config.model.channels={CHANNELS}',
            '--config.bench.forward_size=32x64', '--config.bench.train_levels=()',
            '--config.bench.render=False', '--config.bench.per_level=False',
            '--config.bench.peers=()', '--config.bench.repeats=1',
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '| forward 32x64 float32 | jax |' in result.stdout
    with open(tmp_path / 'bench.json') as f:
        results = json.load(f)
    assert [r['name'] for r in results['rows']] == ['conv peak 9x9 16->4', 'forward 32x64 float32']
    assert results['environment']['backend'] == jax.default_backend()


def test_out_of_process_peer_matches_in_process(tiny):
    """The worker-process peer computes what the in-process one does, on the same weights."""
    pytest.importorskip('tensorflow')
    _, params, x = tiny
    x = x[:1]
    target = np.random.default_rng(5).random((1, 8, 12, 3), dtype=np.float32)  # level 5: 1/8
    inside = peers.InProcessPeer('tf', params)
    outside = peers.OutOfProcessPeer('tf', params)
    try:
        for peer in (inside, outside):
            peer.prepare('f', 'forward', 1, {'x': x})
            peer.prepare('t', 'train', 5, {'x': x, 'target': target})
        forward = outside.output('f')
        assert forward.shape == (1, 128, 192, 3)
        np.testing.assert_allclose(forward, inside.output('f'), atol=1e-6)
        # Two train steps: the same losses, so both applied the same first Adam update.
        for _ in range(2):
            np.testing.assert_allclose(outside.output('t'), inside.output('t'), rtol=1e-6)
        seconds = outside.timed('f')()
        assert isinstance(seconds, float) and seconds > 0
        assert outside.version() == inside.version()
    finally:
        outside.close()
    assert outside._process.returncode == 0


def test_breakdown_parts_of_both_frameworks(tmp_path):
    pytest.importorskip('tensorflow')
    config = _tiny_bench_config(forward_dtypes=(), per_level=False, profile=False,
                                breakdown=True, train_levels=(6,))
    # oneDNN's custom calls name each convolution's direction (XLA's backward convs do not).
    config.model.conv_impl = 'onednn'
    results = harness.run(config, str(tmp_path))
    entries = {e['impl']: e for e in results['breakdown']}
    assert sorted(entries) == ['jax', 'tf']
    for impl, entry in entries.items():
        parts = entry['parts']
        assert set(parts) <= set(breakdown.PARTS), impl
        # The parts every PyNET train step has, in both frameworks' traces.
        for part in ('conv forward', 'conv kernel gradient', 'instance norm', 'optimizer update',
                     'upsampling (transposed convs)', 'loss'):
            assert parts.get(part, 0) > 0, (impl, part, parts)
        assert entry['wall_s'] > 0
        # The traced ops span the step: what ran at once adds up to about the wall time.
        assert sorted(entry['running']) == sorted(breakdown.RUNNING), impl
        assert 0.5 * entry['wall_s'] < sum(entry['running'].values()) <= 1.01 * entry['wall_s'], \
            (impl, entry)


def test_running_counts_ops_at_once():
    # 0-2 s one op, 1-2 s a second one beside it, 2-3 s nothing, 3-4 s one op (start ns, s).
    found = breakdown.running([(0, 2.0), (1e9, 1.0), (3e9, 1.0)])
    assert found == pytest.approx({'no op running': 1.0, 'one op running': 2.0,
                                   'two or more ops running': 1.0})
    assert breakdown.running([]) == dict.fromkeys(breakdown.RUNNING, 0.0)


def test_jax_parts_from_hlo_names():
    stack = 'jit(_fun)/jvp(PyNET)/PyNET.fine/level3/d4/k5a'
    assert breakdown.jax_part('custom-call', f'{stack}/conv/ffi_call', 'DnnlConvBackwardWeights') \
        == 'conv kernel gradient'
    assert breakdown.jax_part('fusion', f'{stack}/norm/mul', '') == 'instance norm'
    assert breakdown.jax_part('fusion', f'{stack}/max', '') == 'bias + activation'
    assert breakdown.jax_part('fusion', 'jit(_fun)/transpose(jvp(PyNET))/PyNET.coarse/'
                              'level4.ups/up_a/conv_general_dilated', '') \
        == 'upsampling (transposed convs)'
    assert breakdown.jax_part('fusion', 'jit(_fun)/jvp(abs)', '') == 'loss'
    assert breakdown.jax_part('fusion', 'jit(_fun)/sqrt', '') == 'optimizer update'
    assert breakdown.tf_part('gradient_tape/level3/norm_3/moments/mean', 'Mean') == 'instance norm'
    assert breakdown.tf_part('Conv2D_7', 'Conv2DBackpropFilter') == 'conv kernel gradient'
