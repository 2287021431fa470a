"""The web page of `launch.py --mode=serve`, driven by a real headless Chromium (Playwright).

The server runs as a real subprocess of launch.py with a tiny PyNET (width 4, RGB + depth) on small
photos of one size, so the model compiles once. `make test` installs Debian's chromium and the
Playwright package and sets BOKEH_JAX_TESTS_NEED_BROWSER=1, so these tests run there for real; a
bare `pytest` without a browser skips the browser tests. The page's screenshot is written to
tests/artifacts/serve.png (ignored by git) to be looked at.
The depth-estimator hook is tested in-process, without a browser.
"""

import contextlib
import io
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from PIL import ExifTags, Image

import helpers
from bokeh_jax import checkpoint, classical, image_io, render, serve
from bokeh_jax import model as model_lib
from configs import default

CHANNELS = 4
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']
PHOTOS = os.path.join(helpers.ROOT, 'tests', 'data', 'photos')
ARTIFACTS = os.path.join(helpers.ROOT, 'tests', 'artifacts')
# Upright photo size (W x H): both test photos are brought to it, so one compilation serves all.
SIZE = (106, 160)
# Below the test photos' 16,960 pixels times 1.5: a 200x200 upload is too large.
MAX_PIXELS = 25_000
TIMEOUT_MS = 120_000  # first render includes compiling the tiny model

try:
    from playwright.sync_api import sync_playwright
    _MISSING = '' if os.path.exists(CHROMIUM) else f'no Chromium at {CHROMIUM}'
except ImportError:
    _MISSING = 'the playwright package is not installed (requirements-test.txt)'
needs_browser = pytest.mark.skipif(
    bool(_MISSING) and os.environ.get('BOKEH_JAX_TESTS_NEED_BROWSER') != '1',
    reason=f'{_MISSING}; `make test` installs it')


def make_params(input_channels: int):
    """Random tiny PyNET with He's init and a gain of 1.4, so that its output varies."""
    params = model_lib.init_params(model_lib.PyNET(CHANNELS), jax.random.key(0),
                                   input_channels=input_channels, scheme='he')
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.float32(1.4) if path[-1].key == 'kernel' else x, params)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Test uploads: a cat stored sideways with EXIF orientation 6, a coffee cup, their depth map
    (near = bright, left to right), a wrong-sized depth map, a large photo, fake and cut files."""
    folder = tmp_path_factory.mktemp('uploads')
    paths = {}
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = 'bokeh_jax test camera'
    exif[ExifTags.Base.Orientation] = 6  # displayed rotated 90 degrees clockwise
    with Image.open(os.path.join(PHOTOS, 'chelsea.jpg')) as image:
        sideways = image.resize(SIZE).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
        paths['cat'] = str(folder / 'cat.jpg')
        sideways.save(paths['cat'], quality=92, exif=exif.tobytes())
    with Image.open(os.path.join(PHOTOS, 'coffee.jpg')) as image:
        paths['coffee'] = str(folder / 'coffee.png')
        image.resize(SIZE).save(paths['coffee'])
    ramp = np.linspace(0, 255, SIZE[0] // 2)[None, :].repeat(SIZE[1] // 2, axis=0)
    paths['depth'] = str(folder / 'depth.png')
    Image.fromarray(ramp.astype(np.uint8)).save(paths['depth'])
    paths['square_depth'] = str(folder / 'square_depth.png')
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(paths['square_depth'])
    paths['large'] = str(folder / 'large.png')
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(paths['large'])
    paths['text'] = str(folder / 'notes.jpg')
    with open(paths['text'], 'w') as f:
        f.write('not a photo, just text\n' * 20)
    paths['cut'] = str(folder / 'cut.jpg')
    with open(paths['cat'], 'rb') as f:
        data = f.read()
    with open(paths['cut'], 'wb') as f:
        f.write(data[: len(data) // 2])
    return paths


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('work'))
    checkpoint.save_params(path, 1, make_params(4), {'channels': CHANNELS, 'input_channels': 4})
    return path


@pytest.fixture(scope='module')
def server(workdir):
    with serving(workdir) as url:
        yield url


@contextlib.contextmanager
def serving(workdir):
    """`launch.py --mode=serve --port=0` as a subprocess: yields its URL, read from its stdout."""
    command = helpers.launch_command('--mode=serve', f'--workdir={workdir}', '--port=0',
                                     '--config=configs/default.py:tiny',
                                     f'--config.serve.max_pixels={MAX_PIXELS}')
    process = subprocess.Popen(command, cwd=helpers.ROOT, env=helpers.launch_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True).start()
    url, deadline = None, time.monotonic() + 120
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line.startswith('bokeh_jax serve: http://'):
            url = line.split()[2]
    if url is None:
        process.kill()
        pytest.fail(f'the server printed no URL:\n{"".join(stderr)[-3000:]}')
    yield url
    alive = process.poll() is None
    process.terminate()
    process.wait(timeout=30)
    assert alive, f'the server stopped:\n{"".join(stderr)[-3000:]}'
    assert 'Traceback' not in ''.join(stderr), ''.join(stderr)[-3000:]


@pytest.fixture(scope='module')
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True, base_url=server,
                                  viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    page.goto(server)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('width 4')")
    yield page
    context.close()


def upload(page, photo, depth=None):
    page.set_input_files('#photo', photo)
    page.set_input_files('#depth', depth or [])
    page.click('#render')


def drop(page, *paths):
    """Drops files on the page's drop zone, as a drag from the desktop does."""
    payload = [{'name': os.path.basename(p), 'bytes': list(open(p, 'rb').read())} for p in paths]
    transfer = page.evaluate_handle('''files => {
        const transfer = new DataTransfer();
        for (const f of files) transfer.items.add(new File([new Uint8Array(f.bytes)], f.name));
        return transfer;
    }''', payload)
    page.dispatch_event('#dropzone', 'drop', {'dataTransfer': transfer})


def wait_for_image(page, what: str, version: int = 1):
    try:
        page.wait_for_selector(f'#{what}-img[data-version="{version}"]', timeout=TIMEOUT_MS)
    except Exception:
        texts = {s: page.text_content(s) for s in ('#error', '#pynet-status', '#classical-status')}
        raise AssertionError(f'no {what} image version {version}; the page says {texts}') from None


def download(page, link: str) -> Image.Image:
    with page.expect_download() as info:
        page.click(link)
    with open(info.value.path(), 'rb') as f:
        image = Image.open(io.BytesIO(f.read()))
    image.load()
    image.suggested = info.value.suggested_filename
    return image


def session_status(page) -> dict:
    session = page.evaluate('session')
    return page.request.get(f'/api/sessions/{session}').json()


def read_image(page, what: str) -> np.ndarray:
    session = page.evaluate('session')
    data = page.request.get(f'/api/sessions/{session}/image/{what}?size=full&format=png').body()
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), np.int16)


@needs_browser
def test_page_renders_focuses_compares_and_downloads(page, files):
    upload(page, files['cat'], files['depth'])
    wait_for_image(page, 'pynet')
    wait_for_image(page, 'classical')
    assert 'Done' in page.text_content('#pynet-status')
    assert page.eval_on_selector('#pynet-progress', 'e => e.value') == 1
    assert page.is_visible('#depth-img') and 'uploaded' in page.text_content('#depth-source')
    assert 'no controls' in page.text_content('#panels')
    # The photo is shown upright (EXIF orientation applied): taller than wide.
    width, height = page.eval_on_selector('#input-img', 'e => [e.naturalWidth, e.naturalHeight]')
    assert (width, height) == SIZE
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, 'serve.png'), full_page=True)

    # Click near the left edge of the photo: the depth ramp is far (0) there, not the centre's 0.5.
    auto = session_status(page)['classical']
    before = read_image(page, 'classical')
    box = page.locator('#input-img').bounding_box()
    page.mouse.click(box['x'] + 0.05 * box['width'], box['y'] + 0.5 * box['height'])
    wait_for_image(page, 'classical', 2)
    clicked = session_status(page)['classical']
    assert clicked['point'][0] == pytest.approx(0.05, abs=0.02)
    assert clicked['focus'] < 0.1 < auto['focus']
    assert 'clicked point' in page.text_content('#focus-info')
    assert np.abs(read_image(page, 'classical') - before).mean() > 1

    # Drag the blur-strength slider towards its right end: a third render, stronger blur.
    box = page.locator('#strength').bounding_box()
    page.mouse.click(box['x'] + 0.9 * box['width'], box['y'] + box['height'] / 2)
    wait_for_image(page, 'classical', 3)
    assert session_status(page)['classical']['strength'] > 0.1

    # The before/after split follows the slider.
    box = page.locator('#compare-slider').bounding_box()
    page.mouse.click(box['x'] + 0.2 * box['width'], box['y'] + box['height'] / 2)
    split = float(page.input_value('#compare-slider'))
    assert 10 < split < 30
    clip = page.eval_on_selector('#compare-after', 'e => e.style.clipPath')
    assert clip == f'inset(0px 0px 0px {split:g}%)' or clip == f'inset(0 0 0 {split:g}%)'
    assert page.is_visible('#compare-after')

    # Full-resolution downloads: upright size, EXIF kept (orientation reset), not the photo.
    photo = image_io.read_photo(files['cat']).astype(np.int16)
    result = download(page, '#download-pynet')
    assert result.format == 'PNG' and result.size == SIZE
    assert result.suggested == 'cat_pynet.png'
    exif = result.getexif()
    assert exif.get(ExifTags.Base.Make) == 'bokeh_jax test camera'
    assert exif.get(ExifTags.Base.Orientation) == 1
    assert np.abs(np.asarray(result, np.int16) - photo).mean() > 5
    page.select_option('#format', 'jpeg')
    result = download(page, '#download-classical')
    assert result.format == 'JPEG' and result.size == SIZE
    assert result.getexif().get(ExifTags.Base.Make) == 'bokeh_jax test camera'
    assert np.abs(np.asarray(result, np.int16) - photo).mean() > 1


@needs_browser
def test_bad_uploads_show_a_message_and_the_server_keeps_serving(page, files):
    cases = [
        ((files['text'], files['depth']), 'notes.jpg: not an image'),
        ((files['cut'], files['depth']), 'cut.jpg: cannot read the photo'),
        ((files['large'], None), 'is 0.04 megapixels; this server takes at most 0.025 megapixels'),
        ((files['cat'], files['square_depth']), 'aspect ratios differ'),
        ((files['cat'], None), 'no depth map was given'),
        ((files['depth'], files['cat']), 'depth map is a colour'),
    ]
    for (photo, depth), message in cases:
        upload(page, photo, depth)
        page.wait_for_selector('#error:not([hidden])')
        text = page.text_content('#error')
        assert message in text, text
        assert 'Traceback' not in text and 'File "' not in text
    # Still serving: a good upload renders, this time dropped on the page as two files.
    drop(page, files['coffee'], files['depth'])
    wait_for_image(page, 'pynet')
    assert page.is_hidden('#error')
    assert page.text_content('#depth-source') == '(uploaded)'


@needs_browser
def test_two_users_at_once_get_their_own_results(browser, server, files, workdir):
    pages = []
    for _ in range(2):
        context = browser.new_context(accept_downloads=True, base_url=server)
        pages.append(context.new_page())
        pages[-1].goto(server)
    for page, photo in zip(pages, (files['cat'], files['coffee'])):
        page.wait_for_function("document.getElementById('model-info').textContent.length > 40")
        upload(page, photo, files['depth'])  # both queued before either finishes
    params, _ = checkpoint.load_params(workdir)
    depth = image_io.read_depth(files['depth'])
    for page, photo in zip(pages, (files['cat'], files['coffee'])):
        wait_for_image(page, 'pynet')
        got = np.asarray(download(page, '#download-pynet'), np.float32)
        expected = render.render_full_resolution(params, image_io.read_photo(photo), depth,
                                                 max_tile=default.get_config('tiny').render.max_tile)
        # The same renderer on the same photo, rounded to 8 bits.
        assert np.abs(got - np.round(expected * 255)).max() <= 1
        assert np.abs(got - image_io.read_photo(photo)).mean() > 5
    ids = [page.evaluate('session') for page in pages]
    assert ids[0] != ids[1]
    for page in pages:
        page.context.close()


# ---- the depth-estimator hook, in-process --------------------------------------------------


def _wait(app, item, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = app.status(item)
        if all(status[k]['state'] in ('done', 'error', 'unavailable') for k in ('pynet', 'classical')):
            return status
        time.sleep(0.1)
    raise AssertionError(f'renders did not finish: {app.status(item)}')


def test_estimated_depth_feeds_both_renders(files):
    calls = []

    def estimate(photo):
        calls.append(photo.shape)
        return np.linspace(1, 0, photo.shape[0] // 4)[:, None].repeat(photo.shape[1] // 4, 1)

    config = default.get_config('tiny')
    with open(files['coffee'], 'rb') as f:
        data = f.read()
    app = serve.App(config, make_params(4), {'channels': CHANNELS, 'input_channels': 4}, estimate)
    try:
        assert app.info()['can_estimate_depth']
        item = app.create_session(data, 'coffee.png', None, '')
        status = _wait(app, item)
        assert calls == [(SIZE[1], SIZE[0], 3)]
        assert status['depth']['source'] == 'estimated'
        assert status['pynet']['state'] == 'done' and status['classical']['state'] == 'done'
        assert any('estimated' in note for note in status['notes'])
        # Near = bright at the top, as the estimate said, stretched to 0..255.
        assert item.depth[0].min() == 255 and item.depth[-1].max() == 0
        # An estimator that fails: the page says so; the RGB + depth model cannot render.
        failing = serve.App(config, make_params(4), {'channels': CHANNELS, 'input_channels': 4},
                            lambda photo: None)
        status = _wait(failing, failing.create_session(data, 'coffee.png', None, ''))
        failing.close()
        assert status['classical']['state'] == 'unavailable'
        assert status['pynet']['state'] == 'error' and 'depth' in status['pynet']['message']
        assert any('could not be estimated' in note for note in status['notes'])
    finally:
        app.close()


def test_decode_errors_name_the_upload(files):
    with open(files['text'], 'rb') as f:
        with pytest.raises(serve.UserError, match='notes.jpg: not an image'):
            serve.decode_photo(f.read(), 'notes.jpg', 10**6)
    with open(files['cut'], 'rb') as f:
        with pytest.raises(serve.UserError, match='cut.jpg: cannot read the photo') as e:
            serve.decode_photo(f.read(), 'cut.jpg', 10**6)
    assert '/tmp' not in str(e.value)  # the temporary path is not shown
    with open(files['cat'], 'rb') as f:
        photo, exif = serve.decode_photo(f.read(), 'cat.jpg', 10**6)
    assert photo.shape == (SIZE[1], SIZE[0], 3)
    kept = Image.Exif()
    kept.load(exif)
    assert kept[ExifTags.Base.Make] == 'bokeh_jax test camera'
    assert kept[ExifTags.Base.Orientation] == 1  # the pixels are upright
    with open(files['square_depth'], 'rb') as f:
        with pytest.raises(serve.UserError, match='square_depth.png: depth map is 40x40'):
            serve.decode_depth(f.read(), 'square_depth.png', photo.shape[:2], 10**6)
    assert serve.fit_size(3000, 4000, 1280) == (960, 1280)
    assert serve.fit_size(100, 50, 1280) == (100, 50)
    depth = np.zeros((10, 20), np.uint8)
    depth[:, 15:] = 200
    assert serve.focus_at(depth, 0.9, 0.5) == pytest.approx(200 / 255)
    assert serve.focus_at(depth, 0.1, 0.5) == 0


def test_launch_without_params_says_what_is_missing(tmp_path):
    result = helpers.launch('--mode=serve', f'--workdir={tmp_path}', '--port=0', check=False)
    assert result.returncode != 0
    assert 'serve failed: No trained parameters' in result.stderr
    assert 'Traceback' not in result.stderr



def test_http_errors_are_json_messages(files):
    """Over-large uploads, unknown sessions and bad requests get a message; serving goes on."""
    config = default.get_config('tiny')
    with config.unlocked():
        config.serve.max_upload_mb = 0.01  # 10 KiB
    app = serve.App(config, make_params(4), {'channels': CHANNELS, 'input_channels': 4})
    server = serve.make_server(app, '127.0.0.1', 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = 'http://127.0.0.1:%d' % server.server_address[1]

    def call(path, body=None):
        request = urllib.request.Request(url + path, data=body, method='POST' if body else 'GET')
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        # An unconditioned model renders one look: a request for an f-number is refused.
        with open(files['coffee'], 'rb') as f, open(files['depth'], 'rb') as g:
            item = app.create_session(f.read(), 'coffee.png', g.read(), 'depth.png')
        status, reply = call(f'/api/sessions/{item.id}/pynet', b'{"fnumber": 4}')
        assert status == 409 and 'one fixed look' in reply['error'], reply
        status, reply = call(f'/api/sessions/{item.id}/pynet')  # GET
        assert status == 404
        status, reply = call('/api/sessions?photo_name=big.png', b'x' * 20_000)
        assert status == 413 and 'at most 0.01 MiB (config.serve.max_upload_mb)' in reply['error']
        status, reply = call('/api/sessions/' + 'a' * 22)
        assert status == 404 and 'upload it again' in reply['error']
        status, reply = call('/api/nothing')
        assert status == 404 and 'no such page' in reply['error']
        status, reply = call('/api/sessions?photo_name=a.jpg&photo_bytes=99', b'abc')
        assert status == 400 and 'photo_bytes=99 but 3 bytes' in reply['error']
        status, reply = call('/api/info')
        assert status == 200 and reply['needs_depth'] and not reply['can_estimate_depth']
        assert reply['condition'] == 'none'
    finally:
        server.shutdown()
        server.server_close()
        app.close()


def test_render_reports_progress_per_tile():
    """render_model_input's progress callback, which drives the page's progress bar: once after
    the global pass, then once per tile of levels 3-1."""
    params = make_params(3)
    photo = np.random.default_rng(0).integers(0, 256, (1024, 64, 3), np.uint8)
    x, out_hw = render.model_input(photo, None, input_channels=3)
    calls = []
    # A 512 x 32 model input: level 3's grid is 256 rows; crops of at most 200 make 3 tiles.
    tiled = render.render_model_input(params, x, out_hw, channels=CHANNELS, max_tile=400,
                                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert tiled.shape == (1024, 64, 3)


# ---- a model trained with aperture and focus control -----------------------------------------


def make_conditioned_params(condition: str = 'aperture_focus'):
    model = model_lib.PyNET(CHANNELS, condition=condition, condition_method='input')
    params = model_lib.init_params(model, jax.random.key(0), input_channels=4, scheme='he')
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.float32(1.4) if path[-1].key == 'kernel' else x, params)


@needs_browser
def test_page_drives_a_conditioned_model_with_the_aperture_and_the_click(browser, files,
                                                                         tmp_path_factory):
    """The f-number slider and the focus click re-render the conditioned model (the classical
    render follows at the same aperture); the page shows what each render was made with."""
    workdir = str(tmp_path_factory.mktemp('conditioned'))
    checkpoint.save_params(workdir, 1, make_conditioned_params(), {
        'channels': CHANNELS, 'input_channels': 4, 'condition': 'aperture_focus',
        'condition_method': 'input'})
    with serving(workdir) as url:
        context = browser.new_context(base_url=url, viewport={'width': 1280, 'height': 900})
        page = context.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('model-info').textContent.includes("
                               "'aperture + focus control')")
        assert page.is_visible('#fnumber') and page.is_hidden('#pynet-fixed')
        upload(page, files['cat'], files['depth'])
        wait_for_image(page, 'pynet')
        first = session_status(page)['pynet']
        assert first['fnumber'] == 2.0 and first['point'] is None
        assert 0.3 < first['focus'] < 0.7  # auto focus: the middle of the left-right ramp
        assert 'f/2, focus disparity' in page.text_content('#pynet-focus-info')
        wide = read_image(page, 'pynet')

        # The slider to its right end: f/16, for the model and (as strength) the classical render.
        box = page.locator('#fnumber').bounding_box()
        page.mouse.click(box['x'] + box['width'] - 2, box['y'] + box['height'] / 2)
        wait_for_image(page, 'pynet', 2)
        status = session_status(page)
        assert status['pynet']['fnumber'] == 16.0 and page.text_content('#fnumber-value') == 'f/16'
        assert np.abs(read_image(page, 'pynet') - wide).mean() > 0.5  # s reached the model
        wait_for_image(page, 'classical', 2)
        assert session_status(page)['classical']['strength'] == pytest.approx(
            classical.DEFAULT_STRENGTH * 2 / 16)

        # A click near the left edge (far): both renders focus there.
        box = page.locator('#input-img').bounding_box()
        page.mouse.click(box['x'] + 0.05 * box['width'], box['y'] + 0.5 * box['height'])
        wait_for_image(page, 'pynet', 3)
        clicked = session_status(page)['pynet']
        assert clicked['point'][0] == pytest.approx(0.05, abs=0.02) and clicked['fnumber'] == 16.0
        assert clicked['focus'] < 0.1 and 'clicked point' in page.text_content('#pynet-focus-info')
        assert session_status(page)['classical']['focus'] == pytest.approx(clicked['focus'])
        context.close()


def test_conditioned_render_is_the_library_render_with_the_maps(files):
    """In-process: the page's render at f/4 focused at a point is render_model_input of the model
    input with control.append_condition's maps (the same focus the classical render uses)."""
    from bokeh_jax import control

    config = default.get_config('tiny')
    params = make_conditioned_params()
    meta = {'channels': CHANNELS, 'input_channels': 4, 'condition': 'aperture_focus',
            'condition_method': 'input'}
    app = serve.App(config, params, meta)
    try:
        with open(files['coffee'], 'rb') as f, open(files['depth'], 'rb') as g:
            item = app.create_session(f.read(), 'coffee.png', g.read(), 'depth.png')
        _wait(app, item)
        app.request_pynet(item, 0.9, 0.5, 4.0)
        status = _wait(app, item)['pynet']
        assert status['state'] == 'done' and status['image_version'] == 2
        focus = serve.focus_at(item.depth, 0.9, 0.5)
        assert status['focus'] == pytest.approx(focus, abs=1e-4) and focus > 0.8
        x, out_hw = render.model_input(item.photo, item.depth_map, input_channels=4)
        x = control.append_condition(x[None], 'aperture_focus', 4.0, focus)[0]
        expected = render.render_model_input(params, x, out_hw, channels=CHANNELS,
                                             max_tile=config.render.max_tile)
        assert np.abs(item.pynet.image.astype(np.float32) - expected * 255).max() <= 0.5 + 1e-3
        with pytest.raises(serve.UserError, match='fnumber must be an f-number'):
            app.request_pynet(item, None, None, 0.5)
    finally:
        app.close()
