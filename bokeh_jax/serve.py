"""A local web page for bokeh rendering (`launch.py --mode=serve`): drop a photo, compare, download.

The page (bokeh_jax/serve_page/) uploads a photo and optionally its depth map, and shows side by
side: the photo, the depth map used, the PyNET render of WORKDIR's level-1 parameters (full
resolution, `render.render_full_resolution`, tiled) and the classical thin-lens render
(`classical.render_bokeh`) whose focus is a click on the photo and whose blur is a slider. A model
trained with aperture/focus control (meta 'condition', control.py) gets an f-number slider, and
the focus click drives it too: its control maps are appended to the model input before tiling. A
before/after slider compares either render with the photo; both download at full resolution as
PNG or JPEG with the photo's EXIF (orientation reset, since the pixels are stored upright).

Served by the standard library (`http.server.ThreadingHTTPServer`); docs/serve.md says why not
Gradio. One process holds the parameters once; each compiled shape is reused (render.py caches its
jitted functions). Every upload is a session under a random id: its photo, depth map and results
live only there, so concurrent users never see each other's images. Renders run on two worker
threads, one for JAX (depth estimation and PyNET, one job at a time) and one for the classical
renderer, so a request thread never runs a render and two renders never share the model at once.

HTTP API (JSON unless an image; errors are {"error": message} with status 4xx/5xx):
  GET  /api/info                           model, limits, whether depth can be estimated
  POST /api/sessions?photo_name=N&photo_bytes=K[&depth_name=M]
                                           body: the photo's K bytes, then the depth map's bytes
  GET  /api/sessions/ID                    state and progress of the depth map and both renders
  POST /api/sessions/ID/classical          {"x": 0..1 | null, "y": 0..1 | null, "strength": s}
  POST /api/sessions/ID/pynet              {"x": 0..1 | null, "y": 0..1 | null, "fnumber": N}
                                           (conditioned models only)
  GET  /api/sessions/ID/image/WHAT[?size=full&format=png|jpeg&download=1]
                                           WHAT: input, depth, pynet or classical

Uploads and downloads (decoding, encoding) are in serve_files.py, the page itself in serve_page/.
Length: the HTTP handler and the sessions are one job (the page's server side).
"""

from collections.abc import Callable
import concurrent.futures
import dataclasses
import http.server
import json
import os
import re
import secrets
import threading
import time
from typing import Any
import urllib.parse

from absl import logging
import jax
import ml_collections
import numpy as np

from bokeh_jax import checkpoint
from bokeh_jax import classical
from bokeh_jax import control
from bokeh_jax import image_ops
from bokeh_jax import render
# The page's files; UserError carries an HTTP status. Re-exported for the page's users.
from bokeh_jax.serve_files import (  # noqa: F401
    FOCUS_WINDOW, PHOTO_FORMATS, UserError, safe_name, decode_depth, decode_photo, encode, fit_size,
    focus_at, to_uint8)

# A depth estimator: photo uint8 [H, W, 3] -> depth map [h, w] of it (any resolution with the
# photo's aspect ratio, any real dtype, near = bright), or None when it cannot make one.
DepthEstimator = Callable[[np.ndarray], np.ndarray | None]

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve_page')
PAGE_FILES = {'/': 'index.html', '/app.js': 'app.js', '/style.css': 'style.css'}
CONTENT_TYPES = {'.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
                 '.css': 'text/css; charset=utf-8'}
IMAGES = ('input', 'depth', 'pynet', 'classical')
# Classical blur strength accepted from the page (disc diameter per unit of disparity / height).
MAX_STRENGTH = 0.3
_SESSION_PATH = re.compile(
    r'^/api/sessions/([A-Za-z0-9_-]{16,64})(/classical|/pynet|/image/(\w+))?$')
RENDER_REQUESTS = ('/classical', '/pynet')


def depth_estimator(config: ml_collections.ConfigDict, workdir: str) -> DepthEstimator | None:
    """MegaDepth with the weights imported into `workdir` (`--mode=import_depth`), or None when
    it has none: the page then asks for a depth map when the model takes one."""
    from bokeh_jax import depth_maps

    try:
        return depth_maps.load_estimator(config, workdir)
    except depth_maps.DepthError as e:
        logging.info('No depth estimator: %s', e)
        return None


# ----------------------------------------------------------------------------------------------
# Sessions and renders.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One render of a session: state is 'waiting' (for the depth map), 'queued', 'running',
    'done', 'error' or 'unavailable' (with `message` saying why)."""

    state: str = 'queued'
    stage: str = ''
    progress: float = 0.0  # fraction of the render done, for the progress bar
    message: str = ''
    seconds: float = 0.0
    started: float = 0.0
    version: int = 0  # bumped by every new focus/strength (classical) or f-number request
    image: np.ndarray | None = None  # uint8 [H, W, 3]
    image_version: int = 0  # the version `image` was rendered for
    settings: dict = dataclasses.field(default_factory=dict)

    def status(self) -> dict:
        elapsed = time.monotonic() - self.started if self.state == 'running' else self.seconds
        return {'state': self.state, 'stage': self.stage, 'progress': round(self.progress, 3),
                'message': self.message, 'seconds': round(elapsed, 1), 'version': self.version,
                'image_version': self.image_version, 'ready': self.image is not None,
                **self.settings}


@dataclasses.dataclass
class Session:
    """One uploaded photo and everything derived from it; fields change under `App.lock`."""

    id: str
    name: str  # the upload's file name, for messages and download names
    photo: np.ndarray  # uint8 [H, W, 3], upright
    exif: bytes | None
    depth_map: np.ndarray | None  # as uploaded or estimated, [h, w]; None: none (yet)
    depth_source: str  # 'uploaded', 'estimating', 'estimated', or 'none'
    depth: np.ndarray | None = None  # uint8 [H // 2, W // 2], near = bright: the map shown/used
    pynet: Result = dataclasses.field(default_factory=Result)
    classical: Result = dataclasses.field(default_factory=Result)
    notes: list = dataclasses.field(default_factory=list)  # shown on the page


class App:
    """The server's state: the model (loaded once), the sessions and the two render workers."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, meta: dict,
                 estimate_depth: DepthEstimator | None = None, *, workdir: str = ''):
        self.config = config
        self.params = jax.device_put(params)
        self.meta = meta
        self.workdir = workdir
        self.estimate_depth = estimate_depth
        self.input_channels = int(meta['input_channels'])
        self.condition = str(meta.get('condition', 'none'))
        self.lock = threading.Lock()
        self.sessions: dict[str, Session] = {}  # insertion order = age: the oldest goes first
        self.compiled: set[tuple[int, ...]] = set()
        # One thread per engine: JAX (depth estimation + PyNET) and the classical renderer.
        self.model_worker = concurrent.futures.ThreadPoolExecutor(1, 'serve-model')
        self.classical_worker = concurrent.futures.ThreadPoolExecutor(1, 'serve-classical')

    def close(self) -> None:
        self.model_worker.shutdown(wait=False, cancel_futures=True)
        self.classical_worker.shutdown(wait=False, cancel_futures=True)

    # ---- what the page asks ------------------------------------------------------------------

    def info(self) -> dict:
        cfg = self.config.serve
        return {
            'channels': int(self.meta['channels']),
            'input_channels': self.input_channels,
            'needs_depth': self.input_channels == 4,
            'can_estimate_depth': self.estimate_depth is not None,
            'source': str(self.meta.get('source', '')),
            'workdir': self.workdir,
            'max_pixels': int(cfg.max_pixels),
            'max_upload_bytes': int(cfg.max_upload_mb * 2**20),
            'default_strength': classical.DEFAULT_STRENGTH,
            'max_strength': MAX_STRENGTH,
            'condition': self.condition,
            'fnumbers': list(control.FULL_STOPS),
            'default_fnumber': control.REFERENCE_FNUMBER,
        }

    def session(self, session_id: str) -> Session:
        with self.lock:
            found = self.sessions.get(session_id)
        if found is None:
            raise UserError('this photo is no longer on the server (it was replaced by newer '
                            'uploads or the server restarted): upload it again', status=404)
        return found

    def create_session(self, photo_data: bytes, photo_name: str, depth_data: bytes | None,
                       depth_name: str) -> Session:
        """Decodes and checks an upload, stores it and queues its renders; raises UserError."""
        cfg = self.config.serve
        photo_name = safe_name(photo_name, 'photo')
        photo, exif = decode_photo(photo_data, photo_name, cfg.max_pixels)
        depth_map, source, notes = None, 'none', []
        if depth_data is not None:
            depth_map = decode_depth(depth_data, safe_name(depth_name, 'depth'),
                                     photo.shape[:2], cfg.max_pixels)
            source = 'uploaded'
            if self.input_channels == 3:
                notes.append('This PyNET model takes no depth (RGB only): the depth map is used '
                             'by the classical render only.')
        elif self.estimate_depth is not None:
            source = 'estimating'
        elif self.input_channels == 4:
            raise UserError(
                'This PyNET model takes RGB + depth, and no depth map was given. Add the photo\'s '
                'depth map (grayscale PNG, 8 or 16 bit, near = bright, any resolution with the '
                'photo\'s aspect ratio, or a .npy array): there are no MegaDepth weights in the '
                'workdir to estimate one.')
        else:
            notes.append('No depth map: the classical render needs one (upload it with the '
                         'photo); the PyNET model here takes RGB only.')
        item = Session(secrets.token_urlsafe(16), photo_name, photo, exif, depth_map, source,
                       notes=notes)
        if depth_map is not None:
            item.depth = image_ops.normalize_depth(depth_map, photo.shape[:2])
        if source == 'none':
            item.classical.state = 'unavailable'
            item.classical.message = 'needs a depth map: upload one with the photo'
        elif source == 'estimating':
            item.classical.state = 'waiting'
        item.classical.settings = {'strength': classical.DEFAULT_STRENGTH, 'focus': None,
                                   'point': None}
        item.pynet.version = 1
        if self.condition != 'none':
            item.pynet.settings = {'fnumber': control.REFERENCE_FNUMBER, 'focus': None,
                                   'point': None}
        with self.lock:
            self.sessions[item.id] = item
            while len(self.sessions) > max(1, cfg.max_sessions):
                del self.sessions[next(iter(self.sessions))]
        self.model_worker.submit(self._run_model, item, 1)
        if item.depth is not None:
            self.request_classical(item, None, None, classical.DEFAULT_STRENGTH)
        return item

    def status(self, item: Session) -> dict:
        h, w = item.photo.shape[:2]
        with self.lock:
            return {'id': item.id, 'name': item.name, 'width': w, 'height': h,
                    'depth': {'source': item.depth_source, 'ready': item.depth is not None},
                    'notes': list(item.notes),
                    'pynet': item.pynet.status(), 'classical': item.classical.status()}

    def request_classical(self, item: Session, x: float | None, y: float | None,
                          strength: float) -> int:
        """Queues a classical render focused at (x, y) (fractions; None = auto focus)."""
        if not 0 <= strength <= MAX_STRENGTH:
            raise UserError(f'blur strength must lie in 0..{MAX_STRENGTH}; got {strength}')
        if (x is None) != (y is None) or (x is not None and not (0 <= x <= 1 and 0 <= y <= 1)):
            raise UserError(f'the focus point must be two fractions in 0..1; got ({x}, {y})')
        with self.lock:
            if item.depth is None:
                raise UserError('the classical render needs a depth map, which this photo does '
                                'not have (yet)', status=409)
            focus = focus_at(item.depth, x, y)
            result = item.classical
            result.version += 1
            result.state, result.stage, result.message = 'queued', '', ''
            result.settings = {'strength': strength, 'focus': round(focus, 4),
                               'point': None if x is None else [x, y]}
            version = result.version
        self.classical_worker.submit(self._run_classical, item, version, focus, strength)
        return version

    def request_pynet(self, item: Session, x: float | None, y: float | None,
                      fnumber: float) -> int:
        """Queues a render of a conditioned model at `fnumber`, focused at (x, y) (fractions of
        the photo; None = auto focus, the classical render's)."""
        if self.condition == 'none':
            raise UserError('this PyNET model is unconditioned: it renders one fixed look (the '
                            'EBB! f/1.8-like blur); the classical render takes a blur strength '
                            'and a focus point', status=409)
        try:
            fnumber = control.check_fnumber(fnumber, 'fnumber')
        except ValueError as e:
            raise UserError(str(e)) from None
        if (x is None) != (y is None) or (x is not None and not (0 <= x <= 1 and 0 <= y <= 1)):
            raise UserError(f'the focus point must be two fractions in 0..1; got ({x}, {y})')
        with self.lock:
            result = item.pynet
            result.version += 1
            result.state, result.stage, result.message, result.progress = 'queued', '', '', 0.0
            result.settings = {'fnumber': fnumber, 'focus': None,
                               'point': None if x is None else [x, y]}
            version = result.version
        self.model_worker.submit(self._run_model, item, version)
        return version

    def _focus(self, item: Session, point: list | None) -> float | None:
        """The focal disparity of a conditioned render: at the clicked point (fractions) or the
        auto focus, read from the depth map shown (the model's depth channel, at half size)."""
        if self.condition != 'aperture_focus':
            return None
        return focus_at(item.depth, *(point or ()))

    def image(self, item: Session, what: str) -> tuple[np.ndarray, bool]:
        """(uint8 image, keeps EXIF) of `what`; the depth map is shown at the photo's size."""
        with self.lock:
            image = {'input': item.photo, 'depth': item.depth, 'pynet': item.pynet.image,
                     'classical': item.classical.image}[what]
        if image is None:
            raise UserError(f'the {what} image is not ready', status=409)
        return image, what != 'depth'

    # ---- the workers -------------------------------------------------------------------------

    def _set(self, result: Result, **fields) -> None:
        with self.lock:
            for key, value in fields.items():
                setattr(result, key, value)

    def _run_model(self, item: Session, version: int) -> None:
        """Model worker: the depth estimate when needed, then the PyNET render (skipped when a
        newer f-number/focus request replaced it while it waited)."""
        result = item.pynet
        with self.lock:
            if result.version != version:
                return
            if item.id not in self.sessions:  # dropped for newer uploads while it waited
                result.state, result.message = 'error', 'dropped for newer uploads'
                return
        self._set(result, state='running', started=time.monotonic(), stage='starting')
        try:
            if item.depth_source == 'estimating':
                self._estimate(item)
            if self.input_channels == 4 and item.depth_map is None:
                raise UserError('no depth map: the model takes RGB + depth')
            self._render_pynet(item, version)
        except UserError as e:
            self._set(result, state='error', message=str(e))
        except Exception as e:  # a failed render must not stop the worker or the server
            logging.exception('PyNET render of %s failed', item.name)
            self._set(result, state='error', message=f'the render failed: {type(e).__name__}: {e}')
        finally:
            self._set(result, seconds=time.monotonic() - result.started)

    def _estimate(self, item: Session) -> None:
        self._set(item.pynet, stage='estimating the depth map')
        try:
            depth = self.estimate_depth(item.photo)
            if depth is not None:
                depth = np.asarray(depth, np.float32)
                if depth.ndim != 2 or not np.all(np.isfinite(depth)):
                    raise ValueError(f'the estimate is not a finite [h, w] map: {depth.shape}')
                render.check_depth_aspect(depth.shape, item.photo.shape[:2])
        except Exception as e:  # the estimator is someone else's code: report, carry on
            logging.exception('depth estimation of %s failed', item.name)
            depth, failure = None, f'{type(e).__name__}: {e}'
        else:
            failure = 'the estimator returned no map'
        with self.lock:
            if depth is None:
                item.depth_source = 'none'
                item.notes.append(f'The depth map could not be estimated ({failure}); upload '
                                  f'one with the photo.')
                item.classical.state = 'unavailable'
                item.classical.message = 'needs a depth map: upload one with the photo'
                return
            item.depth_map, item.depth_source = depth, 'estimated'
            item.depth = image_ops.normalize_depth(depth, item.photo.shape[:2])
            item.notes.append('Depth map estimated by MegaDepth (no depth map was uploaded).')
        self.request_classical(item, None, None, classical.DEFAULT_STRENGTH)

    def _render_pynet(self, item: Session, version: int) -> None:
        config, result = self.config, item.pynet
        self._set(result, stage='preparing the model input')
        try:
            x, out_hw = render.model_input(
                item.photo, item.depth_map if self.input_channels == 4 else None,
                input_channels=self.input_channels, pad_mode=config.render.pad_mode,
                depth_far_is_bright=config.render.depth_far_is_bright)
            if self.condition != 'none':
                with self.lock:
                    settings = dict(result.settings)
                focus = self._focus(item, settings['point'])
                # Before tiling: every tile reads the maps of the whole input.
                x = control.append_condition(x[None], self.condition, settings['fnumber'],
                                             focus)[0]
                with self.lock:
                    if result.version == version:
                        result.settings['focus'] = None if focus is None else round(focus, 4)
        except ValueError as e:
            raise UserError(str(e)) from None
        first = x.shape not in self.compiled
        self._set(result, stage='global pass: encoder and levels 7-4' +
                  (' (first photo of this size: compiling, which can take a minute)' if first
                   else ''))

        def progress(done: int, total: int) -> None:
            stage = (f'levels 3-1: tile {done - 1} of {total - 1} done' if done < total
                     else 'finishing')
            self._set(result, progress=0.05 + 0.95 * done / total, stage=stage)

        image = render.render_model_input(
            self.params, x, out_hw, channels=int(self.meta['channels']),
            max_tile=config.render.max_tile, dtype=config.model.dtype,
            conv_impl=config.model.conv_impl, residual=self.meta.get('residual', False),
            progress=progress)
        if self.condition == 'aperture_focus' and config.render.focus_detail:
            image = render.with_focus_detail(image, item.photo, x,
                                             control.px_per_defocus(config, self.meta))
        self.compiled.add(x.shape)
        with self.lock:
            result.image, result.image_version = to_uint8(image), version
            if result.version == version:  # else a newer request is queued: it stays 'queued'
                result.state, result.stage, result.progress = 'done', '', 1.0

    def _run_classical(self, item: Session, version: int, focus: float, strength: float) -> None:
        result = item.classical
        with self.lock:
            if result.version != version:  # a newer request replaced this one while it waited
                return
            result.state, result.started, result.stage = 'running', time.monotonic(), 'rendering'
        try:
            image = classical.render_bokeh(image_ops.to_float(item.photo), item.depth,
                                           focus=focus, strength=strength)
        except Exception as e:  # a failed render must not stop the worker or the server
            logging.exception('classical render of %s failed', item.name)
            with self.lock:
                if result.version == version:
                    result.state, result.message = 'error', f'{type(e).__name__}: {e}'
            return
        with self.lock:
            if result.version == version:
                result.image, result.image_version = to_uint8(image), version
                result.state, result.stage = 'done', ''
                result.seconds = time.monotonic() - result.started
            elif result.image is None or result.image_version < version:
                result.image, result.image_version = to_uint8(image), version  # better than none


# ----------------------------------------------------------------------------------------------
# HTTP.
# ----------------------------------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to the App; every failure becomes a JSON message, never a traceback."""

    app: App  # set on the subclass made by `make_server`
    server_version = 'bokeh_jax'
    protocol_version = 'HTTP/1.1'

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        logging.debug('%s %s', self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._post)

    def _handle(self, route: Callable[[str, dict], None]) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            route(url.path, query)
        except UserError as e:
            self._send_json({'error': str(e)}, e.status)
        except Exception as e:  # keep serving; the page shows a one-line message
            logging.exception('%s %s failed', self.command, self.path)
            self._send_json({'error': f'internal error: {type(e).__name__}: {e}'}, 500)

    # ---- routes ------------------------------------------------------------------------------

    def _get(self, path: str, query: dict) -> None:
        if path in PAGE_FILES:
            name = PAGE_FILES[path]
            with open(os.path.join(PAGE_DIR, name), 'rb') as f:
                self._send(f.read(), CONTENT_TYPES[os.path.splitext(name)[1]])
            return
        if path == '/api/info':
            self._send_json(self.app.info())
            return
        match = _SESSION_PATH.match(path)
        if not match or match.group(2) in RENDER_REQUESTS:
            raise UserError(f'no such page: {path}', status=404)
        item = self.app.session(match.group(1))
        if match.group(3) is None:
            self._send_json(self.app.status(item))
        else:
            self._send_image(item, match.group(3), query)

    def _post(self, path: str, query: dict) -> None:
        body = self._read_body()
        if path == '/api/sessions':
            try:
                photo_bytes = int(query.get('photo_bytes', len(body)))
            except ValueError:
                raise UserError('photo_bytes must be an integer') from None
            if not 0 <= photo_bytes <= len(body):
                raise UserError(f'photo_bytes={photo_bytes} but {len(body)} bytes were sent')
            has_depth = 'depth_name' in query
            item = self.app.create_session(
                body[:photo_bytes], query.get('photo_name', ''),
                body[photo_bytes:] if has_depth else None, query.get('depth_name', ''))
            self._send_json(self.app.status(item), 201)
            return
        match = _SESSION_PATH.match(path)
        if not match or match.group(2) not in RENDER_REQUESTS:
            raise UserError(f'no such endpoint: POST {path}', status=404)
        item = self.app.session(match.group(1))
        what = match.group(2)[1:]
        try:
            request = json.loads(body or b'{}')
            x, y = request.get('x'), request.get('y')
            x, y = (None if v is None else float(v) for v in (x, y))
            if what == 'classical':
                strength = float(request.get('strength', classical.DEFAULT_STRENGTH))
            else:
                fnumber = request.get('fnumber', control.REFERENCE_FNUMBER)
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f'bad {what} render request: {e}') from None
        if what == 'classical':
            version = self.app.request_classical(item, x, y, strength)
        else:
            version = self.app.request_pynet(item, x, y, fnumber)
        self._send_json({'version': version}, 202)

    # ---- bodies ------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        limit = int(self.app.config.serve.max_upload_mb * 2**20)
        try:
            length = int(self.headers.get('Content-Length', 0))
        except ValueError:
            raise UserError('bad Content-Length') from None
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for a request
            raise UserError(f'the upload is {length / 2**20:.3g} MiB; this server takes at most '
                            f'{self.app.config.serve.max_upload_mb:g} MiB '
                            f'(config.serve.max_upload_mb)', status=413)
        body = self.rfile.read(length)
        if len(body) != length:
            raise UserError(f'the upload was cut off ({len(body)} of {length} bytes arrived)')
        return body

    def _send_image(self, item: Session, what: str, query: dict) -> None:
        if what not in IMAGES:
            raise UserError(f'no image {what!r}; expected one of {IMAGES}', status=404)
        fmt = {'png': 'PNG', 'jpeg': 'JPEG', 'jpg': 'JPEG'}.get(query.get('format', 'jpeg'))
        if fmt is None:
            raise UserError(f'format must be png or jpeg; got {query.get("format")!r}')
        full = query.get('size') == 'full'
        image, keeps_exif = self.app.image(item, what)
        h, w = item.photo.shape[:2]
        size = (h, w) if full else fit_size(h, w, self.app.config.serve.preview_side)
        quality = self.app.config.render.jpeg_quality if full else 85
        data = encode(image, fmt, size=size, exif=item.exif if (full and keeps_exif) else None,
                      jpeg_quality=quality)
        headers = {}
        if query.get('download'):
            stem = os.path.splitext(item.name)[0]
            extension = 'png' if fmt == 'PNG' else 'jpg'
            headers['Content-Disposition'] = f'attachment; filename="{stem}_{what}.{extension}"'
        self._send(data, f'image/{fmt.lower()}', headers)

    def _send_json(self, payload: dict, status: int = 200) -> None:
        self._send(json.dumps(payload).encode(), 'application/json', status=status)

    def _send(self, data: bytes, content_type: str, headers: dict | None = None,
              status: int = 200) -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Cache-Control', 'no-store')
        self.send_header('X-Content-Type-Options', 'nosniff')
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def make_server(app: App, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server for `app` bound to host:port (port 0: any free one), not yet serving."""
    handler = type('BoundHandler', (Handler,), {'app': app})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def load_model(workdir: str) -> tuple[Any, dict]:
    """WORKDIR's level-1 parameters and meta; raises UserError when there are none."""
    try:
        params, meta = checkpoint.load_params(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if meta.get('level') != 1:
        raise UserError(
            f'{checkpoint.params_dir(workdir, meta.get("level"))}: the finest parameters saved in '
            f'{workdir} are of level {meta.get("level")}; the page needs level 1 (finish training, '
            f'or --mode=convert the released model)')
    return params, meta


def serve(config: ml_collections.ConfigDict, workdir: str, port: int | None = None,
          estimate_depth: DepthEstimator | None = None) -> None:
    """`--mode=serve`: loads the model once and serves the page until interrupted.

    Prints the URL it listens on (port 0 picks a free one). Raises UserError when `workdir` has no
    level-1 parameters or the port cannot be had.
    """
    cfg = config.serve
    params, meta = load_model(workdir)
    app = App(config, params, meta, estimate_depth, workdir=os.path.abspath(workdir))
    port = cfg.port if port is None else port
    try:
        server = make_server(app, cfg.host, port)
    except OSError as e:  # e.g. the port is taken
        app.close()
        raise UserError(f'cannot listen on {cfg.host}:{port} (--port, config.serve.host): {e}'
                        ) from None
    host, bound = server.server_address[:2]
    print(f'bokeh_jax serve: http://{host}:{bound}/ (PyNET width {meta["channels"]}, '
          f'{meta["input_channels"]} input channels; Ctrl-C stops)', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()

