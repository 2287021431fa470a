"""Full-resolution rendering: exact tiling, preprocessing, job planning, `launch.py --mode=render`.

Tiny models (width 4). Photos whose half-resolution size pads to 64x64 share one compilation.
"""

import os

import jax
import numpy as np
import pytest
from PIL import Image

import helpers
from bokeh_jax import checkpoint, classical, control, image_io, image_ops, render, render_jobs
from bokeh_jax import model as model_lib
from configs import default
from helpers import random_photo, save_png

CHANNELS = 4
TINY_MAX_TILE = default.get_config('tiny').render.max_tile


def launch(*args):
    """`launch.py --mode=render ARGS`; callers check the exit code and the messages."""
    return helpers.launch('--mode=render', *args, check=False)


def make_params(input_channels: int, seed: int = 0):
    """Random tiny PyNET; He's init and a gain of 1.4 on the kernels so that the level-1 output
    varies across the image instead of sitting near 0.5."""
    params = model_lib.init_params(
        model_lib.PyNET(CHANNELS), jax.random.key(seed), input_channels=input_channels, scheme='he'
    )
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.float32(1.4) if path[-1].key == 'kernel' else x, params
    )


@pytest.fixture(scope='module')
def params():
    return make_params(4)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, params):
    path = str(tmp_path_factory.mktemp('work'))
    checkpoint.save_params(path, 1, params, {'channels': CHANNELS, 'input_channels': 4})
    return path


# ---- exact tiling ----------------------------------------------------------------------------


def test_halo_is_exactly_the_receptive_field_of_levels_3_to_1():
    """Autodiff footprint of one 4x4 block of level-1 pixels on the fine levels' inputs.

    All kernels are positive (1/fan_in) and biases 0, so no paths cancel and every input pixel in
    the receptive field gets a nonzero gradient; the cotangent is scaled up so that the weakest
    paths (products of ~25 kernel corner taps) stay far above float32's smallest normal number.
    """
    model = model_lib.PyNET(CHANNELS)

    def positive(path, leaf):
        names = [k.key for k in path]
        if names[-1] != 'kernel':
            return np.full(leaf.shape, names[-1] == 'scale', np.float32)
        fan_in = leaf.shape[0] * leaf.shape[1] * leaf.shape[3 if names[-3].startswith('up') else 2]
        return np.full(leaf.shape, 1 / fan_in, np.float32)

    params = jax.tree_util.tree_map_with_path(positive, model_lib.param_shapes(CHANNELS))
    size, a = 120, 58  # output block at level-3 pixel (a, a); its footprint fits with a margin
    rng = np.random.default_rng(0)
    features = [rng.random((1, size, size, CHANNELS), np.float32) for _ in range(3)]
    s = render.FINE_SCALE

    def block(features):
        out = model.apply({'params': params}, *features, stop_at=1, method=model_lib.PyNET.fine)
        return out[1][0, s * a : s * (a + 1), s * a : s * (a + 1)].sum() * 1e30

    grads = jax.jit(jax.grad(block))(features)
    touched = np.zeros((size, size), bool)
    for g in grads:
        touched |= np.any(np.asarray(g) != 0, axis=(0, 3))
    expected = np.zeros((size, size), bool)
    lo, hi = a - render.HALO_BEFORE, a + 1 + render.HALO_AFTER
    assert lo > 0 and hi < size
    expected[lo:hi, lo:hi] = True
    np.testing.assert_array_equal(touched, expected)


def test_tile_spans_cover_the_output_and_hold_their_halos():
    for size in (112, 113, 150, 176, 333):
        for needed in {size - 15, size - 1, size}:
            for crop in (112, 113, 140, 175, 400):
                spans = render.tile_spans(size, needed, crop)
                covered = np.zeros(needed, int)
                for start, stop, crop_start in spans:
                    covered[start:stop] += 1
                    length = min(crop, size)
                    assert 0 <= crop_start and crop_start + length <= size
                    assert crop_start <= max(start - render.HALO_BEFORE, 0)
                    assert crop_start + length >= min(stop + render.HALO_AFTER, size)
                np.testing.assert_array_equal(covered, 1)
    with pytest.raises(ValueError, match='halo'):
        render.tile_spans(200, 200, 111)
    # Balanced crops: the fewest tiles of at most max_crop, as small as they can be.
    cases = ((1008, 1000, 512), (1504, 1500, 512), (300, 290, 250), (90, 80, 200))
    for size, needed, max_crop in cases:
        crop = render.tile_crop(size, needed, max_crop)
        spans = render.tile_spans(size, needed, crop)
        assert crop <= max_crop or crop == size
        fewest = len(render.tile_spans(size, needed, min(max_crop, size)))
        assert len(spans) == fewest
        if len(spans) > 1:  # one pixel less and it takes another tile
            assert len(render.tile_spans(size, needed, crop - 1)) > fewest
    assert render.tile_crop(1008, 1000, 512) == 334 + 111  # 3 cores of 334 instead of 401+401+198


def test_tiled_render_matches_one_untiled_pass(params):
    rng = np.random.default_rng(1)
    photo = random_photo(rng, 651, 667)  # odd sizes: padded to a 352x352 model input
    depth = rng.random((217, 222)).astype(np.float32)  # any resolution, any scale

    # The model input, derived here from SPEC: x0.5 bicubic of the photo (made even by one
    # reflected row/column) + depth stretched to 0..255 at that size, reflect-padded to 32s.
    even = np.pad(photo, ((0, 1), (0, 1), (0, 0)), mode='reflect')
    small = image_ops.resize(depth, (326, 334))
    small = np.round((small - small.min()) / (small.max() - small.min()) * 255).astype(np.uint8)
    x = image_ops.make_model_input(even, small)
    x = np.pad(x, ((0, 352 - 326), (0, 352 - 334), (0, 0)), mode='reflect')
    got_x, out_hw = render.model_input(photo, depth, input_channels=4)
    np.testing.assert_array_equal(got_x[..., :3], x[..., :3])
    np.testing.assert_allclose(got_x[..., 3], x[..., 3], atol=1 / 255 + 1e-6)  # x.5 rounding
    assert out_hw == (651, 667)

    max_tile = 2 * (render.HALO_BEFORE + render.HALO_AFTER + 56)  # 56-pixel cores: 3 x 3 tiles
    grid, needed = 352 // 2, (-(-651 // 4), -(-667 // 4))
    crops = [render.tile_crop(grid, n, max_tile // 2) for n in needed]
    assert crops == [55 + 111, 56 + 111]  # 163 and 167 rows in 3 equal cores
    for n, crop in zip(needed, crops, strict=True):
        assert len(render.tile_spans(grid, n, crop)) == 3
    untiled = render.render_model_input(params, got_x, out_hw, channels=CHANNELS, max_tile=0)
    tiled = render.render_full_resolution(
        params, photo, depth, channels=CHANNELS, max_tile=max_tile
    )
    assert tiled.shape == untiled.shape == (651, 667, 3) and tiled.dtype == np.float32
    assert untiled.std() > 0.02  # a real image, not a constant the tiles trivially agree on
    np.testing.assert_allclose(tiled, untiled, atol=1e-4, rtol=0)


def test_rgb_only_model_needs_no_depth():
    params = make_params(3)
    photo = random_photo(np.random.default_rng(2), 45, 61)
    out = render.render_full_resolution(params, photo, None, max_tile=TINY_MAX_TILE)
    assert out.shape == (45, 61, 3) and out.min() >= 0 and out.max() <= 1 and out.std() > 0.01
    with pytest.raises(ValueError, match='RGB-only'):
        render.render_full_resolution(params, photo, np.zeros((22, 30)), max_tile=TINY_MAX_TILE)


# ---- model input -----------------------------------------------------------------------------


def test_depth_is_brought_to_the_papers_convention():
    rng = np.random.default_rng(3)
    photo = random_photo(rng, 100, 140)
    # Already in the convention (half resolution, 8 bit, stretched to 0..255): unchanged.
    ebb = rng.integers(0, 256, (50, 70)).astype(np.uint8)
    ebb[0, 0], ebb[0, 1] = 0, 255
    x, _ = render.model_input(photo, ebb, input_channels=4)
    np.testing.assert_array_equal(x[:50, :70, 3], image_ops.to_float(ebb))
    # Full-resolution 16-bit metric depth (large = far), compressed range: resized to half size,
    # inverted and stretched.
    metric = 1000 + image_ops.resize(ebb.astype(np.float32), (100, 140)) * 3
    x, _ = render.model_input(photo, metric, input_channels=4, depth_far_is_bright=True)
    expected = image_ops.resize(metric, (50, 70))
    expected = np.round((expected.max() - expected) * 255 / np.ptp(expected)) / 255
    np.testing.assert_allclose(x[:50, :70, 3], expected, atol=1e-6)
    assert x.shape == (64, 96, 4)
    np.testing.assert_array_equal(x[50:64, :70], x[48:34:-1, :70])  # reflected, not zeros


def test_crop_mode_cuts_like_the_original():
    photo = random_photo(np.random.default_rng(4), 150, 203)
    x, out_hw = render.model_input(photo, None, input_channels=3, pad_mode='crop')
    np.testing.assert_array_equal(x, image_ops.make_model_input(photo, None)[:64, :96])
    assert out_hw == (128, 192)
    with pytest.raises(ValueError, match='at least 64x64'):
        render.model_input(photo[:60], None, input_channels=3, pad_mode='crop')
    with pytest.raises(ValueError, match='pad_mode'):
        render.model_input(photo, None, input_channels=3, pad_mode='zeros')


def test_model_input_rejects_bad_depth_and_photos():
    photo = random_photo(np.random.default_rng(5), 60, 80)
    with pytest.raises(ValueError, match=r'--depth=PATH.*builder_config=rgb'):
        render.model_input(photo, None, input_channels=4)
    with pytest.raises(ValueError, match='aspect'):  # the map of the photo before rotation
        render.model_input(photo, np.zeros((40, 30)), input_channels=4)
    render.model_input(photo, np.zeros((31, 40)), input_channels=4)  # rounding is fine
    with pytest.raises(ValueError, match='at least 2x2'):
        render.model_input(photo[:1], None, input_channels=3)
    with pytest.raises(ValueError, match='uint8'):
        render.model_input(photo.astype(np.float32), None, input_channels=3)
    with pytest.raises(ValueError, match='max_tile'):
        x = np.zeros((32, 32, 3), np.float32)
        render.render_model_input({}, x, (64, 64), channels=CHANNELS, max_tile=100)


# ---- aperture and focus control (config.model.condition) -------------------------------------


def test_control_maps_follow_the_focus_pixel_on_depth_of_any_resolution():
    """--focus X,Y is a pixel of the photo: its disparity is read from the model input's depth
    channel (the map brought to half resolution), whatever the map's own resolution."""
    photo = random_photo(np.random.default_rng(6), 90, 130)  # pads to a 64x96 model input
    # Far on the left half of the photo, near on the right, as a 3x-coarser map.
    depth = np.where(np.arange(130 // 3)[None, :] < 130 // 6, 50, 230).astype(np.uint8)
    depth = np.repeat(depth, 90 // 3, axis=0)
    x, _ = render.model_input(photo, depth, input_channels=4)
    for (col, row), near in (((10, 80), False), ((120, 5), True)):
        got, focus = render.control_input(x, (90, 130), condition='aperture_focus', fnumber=4.0,
                                          focus=(col, row))
        # Stretched to 0..255 (bicubic ringing at the step keeps the flat sides off 0 and 1).
        assert (focus > 0.9) if near else (focus < 0.1), focus
        assert got.shape == (64, 96, 6)
        np.testing.assert_array_equal(got[..., :4], x)
        np.testing.assert_allclose(got[..., 4], 0.5)  # s = 2 / 4
        np.testing.assert_allclose(got[..., 5], 0.5 * (x[..., 3] - focus), atol=1e-6)
    # No focus pixel: the classical renderer's auto focus over the photo's part of the input.
    _, focus = render.control_input(x, (90, 130), condition='aperture_focus', fnumber=2.0)
    assert focus == classical.auto_focus(x[:45, :65, 3])
    with pytest.raises(ValueError, match=r'--focus=130,5 lies outside the 130x90 photo'):
        render.control_input(x, (90, 130), condition='aperture_focus', fnumber=2.0,
                             focus=(130, 5))
    # 'aperture' appends s only; 'none' leaves the input as it is (the same array).
    got, focus = render.control_input(x, (90, 130), condition='aperture', fnumber=8.0)
    assert focus is None and got.shape == (64, 96, 5) and np.all(got[..., 4] == 0.25)
    assert render.control_input(x, (90, 130), condition='none', fnumber=8.0)[0] is x


def test_check_control_validates_the_flags_against_the_model():
    conditioned = {'condition': 'aperture_focus', 'condition_method': 'input'}
    settings = render_jobs.check_control(conditioned, 'W', '2.8', '12,34', folder=False)
    assert (settings.fnumber, settings.focus) == (2.8, (12.0, 34.0))
    default_settings = render_jobs.check_control(conditioned, 'W', None, None, folder=True)
    assert (default_settings.fnumber, default_settings.focus) == (control.REFERENCE_FNUMBER, None)
    for fnumber, focus, folder, message in (
        ('0.5', None, False, '--fnumber must be an f-number between 1 and 32'),
        ('wide', None, False, '--fnumber must be a number'),
        (None, '12', False, '--focus must be X,Y'),
        (None, '1,2', True, '--focus=1,2 is a pixel of one photo, but --input is a folder'),
    ):
        with pytest.raises(render_jobs.RenderError, match=message):
            render_jobs.check_control(conditioned, 'W', fnumber, focus, folder)
    with pytest.raises(render_jobs.RenderError, match="controls the aperture only"):
        render_jobs.check_control({'condition': 'aperture'}, 'W', None, '1,2', False)
    assert render_jobs.check_control({}, 'W', None, None, False) == render_jobs.Control()


def test_launch_says_an_unconditioned_model_has_one_look(tmp_path, workdir):
    photo = save_png(tmp_path / 'p.png', random_photo(np.random.default_rng(13), 40, 40))
    depth = save_png(tmp_path / 'd.png', np.zeros((20, 20), np.uint8))
    result = launch(f'--workdir={workdir}', f'--input={photo}', f'--depth={depth}',
                    f'--output={tmp_path}/o.png', '--fnumber=2.8', '--focus=10,10')
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith('error: render failed: --fnumber and --focus: the model in'), lines
    assert 'one fixed look' in lines[-1] and 'classical thin-lens renderer' in lines[-1]
    assert '--mode=serve' in lines[-1]
    assert not os.path.exists(tmp_path / 'o.png')


def test_conditioned_model_renders_tiled_at_an_fnumber_and_focus(tmp_path):
    """The control maps go into the whole model input before tiling: tiles agree with one pass.
    launch.py --fnumber --focus writes exactly that render; another f-number renders otherwise."""
    condition, method = 'aperture_focus', 'input'
    params = model_lib.init_params(
        model_lib.PyNET(CHANNELS, condition=condition, condition_method=method),
        jax.random.key(3), input_channels=4, scheme='he')
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.float32(1.4) if path[-1].key == 'kernel' else x, params)
    rng = np.random.default_rng(14)
    photo, depth = random_photo(rng, 301, 263), rng.random((150, 131)).astype(np.float32)
    x, out_hw = render.model_input(photo, depth, input_channels=4)
    x, focus = render.control_input(x, photo.shape[:2], condition=condition, fnumber=2.8,
                                    focus=(200, 40))
    kw = dict(channels=CHANNELS)
    untiled = render.render_model_input(params, x, out_hw, max_tile=0, **kw)
    tiled = render.render_model_input(params, x, out_hw, max_tile=render.MIN_TILE, **kw)
    np.testing.assert_allclose(tiled, untiled, atol=1e-4, rtol=0)

    workdir = str(tmp_path / 'work')
    checkpoint.save_params(workdir, 1, params, {'channels': CHANNELS, 'input_channels': 4,
                                                'condition': condition, 'condition_method': method})
    photo_path = save_png(tmp_path / 'p.png', photo)
    depth_path = str(tmp_path / 'd.npy')
    np.save(depth_path, depth)
    result = launch('--config=configs/default.py:tiny', f'--workdir={workdir}',
                    f'--input={photo_path}', f'--depth={depth_path}', f'--output={tmp_path}/o.png',
                    '--fnumber=2.8', '--focus=200,40')
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'(263x301, f/2.8, focus 200,40 (disparity {focus:.3f}))' in result.stdout
    expected = render.render_model_input(params, x, out_hw, max_tile=TINY_MAX_TILE, **kw)
    got = np.asarray(Image.open(tmp_path / 'o.png'), np.float32)
    assert np.abs(got - expected * 255).max() <= 0.5 + 1e-3
    other, _ = render.control_input(x[..., :4], photo.shape[:2], condition=condition,
                                    fnumber=16.0, focus=(200, 40))
    assert np.abs(render.render_model_input(params, other, out_hw, max_tile=0, **kw)
                  - untiled).mean() > 1e-3


def test_plan_jobs_pairs_files_and_refuses_bad_arguments(tmp_path):
    photos, depths, out = tmp_path / 'in', tmp_path / 'depth', tmp_path / 'out'
    photos.mkdir()
    depths.mkdir()
    for name in ('a.jpg', 'b.PNG', 'notes.txt'):
        (photos / name).write_bytes(b'')
    jobs = render_jobs.plan_jobs(str(photos), str(depths), str(out), input_channels=4)
    assert jobs == [
        render_jobs.Job(str(photos / 'a.jpg'), str(depths / 'a.png'), str(out / 'a.jpg')),
        render_jobs.Job(str(photos / 'b.PNG'), str(depths / 'b.png'), str(out / 'b.PNG')),
    ]
    one = str(photos / 'a.jpg')
    assert render_jobs.plan_jobs(one, None, str(tmp_path / 'o.png'), input_channels=3) == [
        render_jobs.Job(one, None, str(tmp_path / 'o.png'))
    ]

    def fails(match, *args, input_channels=4, **kwargs):
        with pytest.raises(render_jobs.RenderError, match=match):
            render_jobs.plan_jobs(*args, input_channels=input_channels, **kwargs)

    fails('no depth map was given', one, None, str(out))
    fails('RGB-only', one, str(depths), str(out), input_channels=3)
    missing = str(tmp_path / 'missing.jpg')
    fails('--input=.*missing.jpg: no such file', missing, None, 'o.png', input_channels=3)
    fails('--depth=.*: no such', one, str(tmp_path / 'nodepth.png'), str(out))
    fails(r'no depth map .*a\.png', one, str(depths), str(tmp_path / 'o.png'))
    fails('--depth=.* is a file', str(photos), str(photos / 'a.jpg'), str(out))
    fails('--output=.* is a file', str(photos), str(depths), str(photos / 'a.jpg'))
    gif2 = str(tmp_path / 'o.gif2')
    fails("unknown output image format '.gif2'", one, None, gif2, input_channels=3)
    fails(  # even with --overwrite
        'replace the input photo', str(photos), None, str(photos), input_channels=3, overwrite=True
    )
    (tmp_path / 'o.png').write_bytes(b'keep')
    fails('already exist.*--overwrite', one, None, str(tmp_path / 'o.png'), input_channels=3)
    render_jobs.plan_jobs(one, None, str(tmp_path / 'o.png'), input_channels=3, overwrite=True)
    (depths / 'x').mkdir()
    fails('no .jpg/.jpeg/.png photos', str(depths), None, str(out), input_channels=3)


# ---- launch.py --mode=render ------------------------------------------------------------------


def test_launch_renders_a_folder_and_lists_failures(tmp_path, params, workdir):
    """Odd sizes, grayscale, RGBA, an EXIF-rotated JPEG, an unreadable file, a missing depth map:
    the good photos are rendered at their exact size, the bad ones listed, the exit code non-zero.
    """
    rng = np.random.default_rng(9)
    photos, depths, out = tmp_path / 'photos', tmp_path / 'depths', tmp_path / 'out'
    photos.mkdir()
    depths.mkdir()
    shown = {  # name -> displayed (height, width); all pad to a 64x64 model input
        'a.png': (67, 91),
        'b.png': (90, 75),
        'c.png': (70, 101),
        'd.jpg': (99, 75),
        'f.png': (80, 80),
    }
    save_png(photos / 'a.png', random_photo(rng, 67, 91))
    save_png(photos / 'b.png', random_photo(rng, 90, 75)[..., 1])  # grayscale
    rgba = np.concatenate([random_photo(rng, 70, 101), np.full((70, 101, 1), 128, np.uint8)], -1)
    save_png(photos / 'c.png', rgba)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(random_photo(rng, 75, 99)).save(photos / 'd.jpg', exif=exif)  # shown 99x75
    (photos / 'e.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    save_png(photos / 'f.png', random_photo(rng, 80, 80))  # no depth map for this one
    (photos / 'notes.txt').write_text('not a photo')
    save_png(depths / 'a.png', rng.integers(0, 256, (33, 45)).astype(np.uint8))  # half res
    save_png(depths / 'b.png', rng.integers(0, 65536, (90, 75)).astype(np.uint16))  # full, 16 bit
    save_png(depths / 'c.png', rng.integers(0, 256, (14, 20)).astype(np.uint8))  # low res
    save_png(depths / 'd.png', rng.integers(0, 256, (49, 37)).astype(np.uint8))
    save_png(depths / 'e.png', rng.integers(0, 256, (40, 40)).astype(np.uint8))

    args = (
        '--config=configs/default.py:tiny',
        f'--workdir={workdir}',
        f'--input={photos}',
        f'--depth={depths}',
        f'--output={out}',
    )
    result = launch(*args)
    assert result.returncode != 0, result.stdout + result.stderr
    assert '2 of 6 photo(s) failed' in result.stderr, result.stderr[-3000:]
    assert f'{photos / "e.jpg"}: cannot read the photo' in result.stderr
    assert f'its depth map {depths / "f.png"} does not exist' in result.stderr
    assert 'notes.txt' in result.stderr  # named as not rendered
    assert sorted(os.listdir(out)) == ['a.png', 'b.png', 'c.png', 'd.jpg']
    for name in os.listdir(out):
        with Image.open(out / name) as image:
            assert image.mode == 'RGB' and image.size[::-1] == shown[name], name
        assert f'{photos / name} ({shown[name][1]}x{shown[name][0]}) -> {out / name}: ' in (
            result.stdout
        )
    # The file is the library's render of the same photo and depth, rounded to 8 bits.
    expected = render.render_full_resolution(
        params,
        image_io.read_photo(str(photos / 'a.png')),
        image_io.read_depth(str(depths / 'a.png')),
        max_tile=TINY_MAX_TILE,
    )
    got = np.asarray(Image.open(out / 'a.png'), np.float32)
    assert np.abs(got - expected * 255).max() <= 0.5 + 1e-3

    # A second run refuses to overwrite, before rendering anything.
    before = (out / 'a.png').read_bytes()
    result = launch(*args)
    assert result.returncode != 0 and '--overwrite' in result.stderr, result.stderr[-3000:]
    assert (out / 'a.png').read_bytes() == before


def test_launch_explains_missing_depth(tmp_path, workdir):
    photo = save_png(tmp_path / 'p.png', random_photo(np.random.default_rng(10), 40, 40))
    result = launch(f'--workdir={workdir}', f'--input={photo}', f'--output={tmp_path}/o.png')
    assert result.returncode != 0
    assert '--depth=PATH' in result.stderr and 'builder_config=rgb' in result.stderr
    assert not os.path.exists(tmp_path / 'o.png')


def test_render_paths_single_photo_with_overwrite(tmp_path, workdir):
    photo = save_png(tmp_path / 'p.png', random_photo(np.random.default_rng(11), 81, 97))
    depth = save_png(tmp_path / 'p_depth.png', np.full((40, 48), 7, np.uint8))  # constant map
    output = tmp_path / 'p_bokeh.jpg'
    output.write_bytes(b'old')
    config = default.get_config('tiny')
    render_jobs.render_paths(config, workdir, photo, depth, str(output), overwrite=True)
    with Image.open(output) as image:
        assert image.format == 'JPEG' and image.size == (97, 81)


def test_render_paths_refuses_bad_config_and_workdirs(tmp_path, params):
    photo = save_png(tmp_path / 'p.png', random_photo(np.random.default_rng(12), 40, 40))
    config = default.get_config('tiny')
    args = (photo, None, str(tmp_path / 'o.png'))
    with config.unlocked():
        config.render.max_tile = 100
    with pytest.raises(render_jobs.RenderError, match='config.render.max_tile'):
        render_jobs.render_paths(config, str(tmp_path), *args)
    config = default.get_config('tiny')
    with pytest.raises(render_jobs.RenderError, match='No trained parameters'):
        render_jobs.render_paths(config, str(tmp_path / 'empty'), *args)
    checkpoint.save_params(str(tmp_path), 3, params, {'channels': CHANNELS, 'input_channels': 4})
    with pytest.raises(render_jobs.RenderError, match='of level 3; rendering needs level 1'):
        render_jobs.render_paths(config, str(tmp_path), *args)
