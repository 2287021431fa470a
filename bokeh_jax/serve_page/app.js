// The page of `launch.py --mode=serve` (bokeh_jax/serve.py documents the HTTP API it calls).
'use strict';

const $ = (id) => document.getElementById(id);
const DONE_STATES = ['done', 'error', 'unavailable'];
let info = null;          // GET /api/info
let session = null;       // the current upload's id
let last = null;          // its last status
let uploadToken = 0;      // bumped per upload: replies for an older upload are dropped
let polling = false;
const shown = { pynet: 0, classical: 0 };  // image versions on screen

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error('The server cannot be reached (' + e.message + '). Is launch.py --mode=serve still running?');
  }
  const text = await response.text();
  let payload;
  try { payload = JSON.parse(text); } catch (e) { payload = { error: text.slice(0, 300) }; }
  if (!response.ok) throw new Error(payload.error || ('HTTP ' + response.status));
  return payload;
}

function megapixels(pixels) { return `${Number((pixels / 1e6).toPrecision(3))} megapixels`; }
function showError(message) { const box = $('error'); box.textContent = message; box.hidden = false; }
function clearError() { $('error').hidden = true; $('error').textContent = ''; }
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function imageUrl(what, version, extra) {
  return `/api/sessions/${session}/image/${what}?v=${version || 0}${extra || ''}`;
}

async function init() {
  try {
    info = await api('/api/info');
  } catch (e) { showError(e.message); return; }
  const kind = info.input_channels === 4 ? 'RGB + depth' : 'RGB only';
  $('model-info').textContent = `PyNET level-1 parameters of ${info.workdir} (width ${info.channels}, ` +
    `${kind} input). Photos up to ${megapixels(info.max_pixels)}.`;
  let hint;
  if (info.needs_depth && !info.can_estimate_depth) {
    hint = 'This model needs a depth map of the photo (grayscale PNG, near = bright, or .npy); ' +
      'there are no MegaDepth weights in the workdir to estimate one.';
  } else if (info.can_estimate_depth) {
    hint = 'Without a depth map, one is estimated with MegaDepth.';
  } else {
    hint = 'The PyNET model takes no depth; the classical render needs a depth map.';
  }
  $('depth-hint').textContent = hint;
  $('strength').max = Math.min(info.max_strength, 0.15);
  $('strength').value = info.default_strength;
  $('strength-value').textContent = Number(info.default_strength).toFixed(3);
  if (conditioned()) {
    // A model trained with aperture (and focus) control: the f-number slider drives it, and the
    // classical render follows at the same aperture (blur strength = default * 2 / N).
    $('model-info').textContent += ` Trained with ${info.condition.replace('_', ' + ')} control.`;
    $('pynet-fixed').hidden = true;
    $('pynet-controls').hidden = false;
    $('fnumber').max = info.fnumbers.length - 1;
    $('fnumber').value = Math.max(0, info.fnumbers.indexOf(info.default_fnumber));
    showFnumber();
    if (info.condition === 'aperture_focus') $('focus-hint').textContent = '— click to set the focus of both renders';
  }
}

function conditioned() { return info && info.condition && info.condition !== 'none'; }
function fnumber() { return info.fnumbers[Number($('fnumber').value)]; }
function showFnumber() { $('fnumber-value').textContent = `f/${fnumber()}`; }

async function upload() {
  clearError();
  const photo = $('photo').files[0];
  const depth = $('depth').files[0];
  if (!photo) { showError('Choose or drop a photo first.'); return; }
  const bytes = photo.size + (depth ? depth.size : 0);
  if (info && bytes > info.max_upload_bytes) {
    showError(`The upload is ${(bytes / 2 ** 20).toFixed(1)} MiB; this server takes at most ` +
      `${(info.max_upload_bytes / 2 ** 20).toFixed(0)} MiB.`);
    return;
  }
  const query = new URLSearchParams({ photo_name: photo.name, photo_bytes: photo.size });
  if (depth) query.set('depth_name', depth.name);
  const token = ++uploadToken;
  $('render').disabled = true;
  $('render').textContent = 'Uploading…';
  let status;
  try {
    status = await api('/api/sessions?' + query, { method: 'POST', body: depth ? new Blob([photo, depth]) : photo });
  } catch (e) {
    if (token === uploadToken) showError(e.message);
    return;
  } finally {
    $('render').disabled = false;
    $('render').textContent = 'Render';
  }
  if (token !== uploadToken) return;
  session = status.id;
  shown.pynet = shown.classical = 0;
  for (const id of ['pynet-img', 'classical-img', 'depth-img']) { $(id).hidden = true; delete $(id).dataset.version; }
  $('focus-marker').hidden = true;
  $('input-img').src = imageUrl('input');
  $('compare-before').src = imageUrl('input');
  $('panels').hidden = false;
  $('compare-section').hidden = false;
  update(status);
  poll();
}

async function poll() {
  if (polling) return;
  polling = true;
  try {
    while (session) {
      await sleep(250);
      const id = session;
      let status;
      try { status = await api(`/api/sessions/${id}`); } catch (e) { showError(e.message); break; }
      if (id !== session) continue;
      update(status);
      if (DONE_STATES.includes(status.pynet.state) && DONE_STATES.includes(status.classical.state)) break;
    }
  } finally { polling = false; }
}

function describe(result, size) {
  switch (result.state) {
    case 'queued': return 'Waiting for the renderer…';
    case 'waiting': return 'Waiting for the depth map…';
    case 'running': return `${result.stage || 'Rendering'} — ${result.seconds} s`;
    case 'done': return `Done in ${result.seconds} s at ${size}.`;
    default: return result.message;
  }
}

function update(status) {
  last = status;
  const size = `${status.width}×${status.height}`;
  $('notes').replaceChildren(...status.notes.map((note) => {
    const li = document.createElement('li'); li.textContent = note; return li;
  }));
  // Depth map.
  const sources = { uploaded: '(uploaded)', estimated: '(estimated by MegaDepth)', estimating: '(estimating…)', none: '' };
  $('depth-source').textContent = sources[status.depth.source] || '';
  if (status.depth.ready && $('depth-img').hidden) {
    $('depth-img').src = imageUrl('depth');
    $('depth-img').hidden = false;
    $('depth-status').textContent = '';
  } else if (!status.depth.ready) {
    $('depth-status').textContent = status.depth.source === 'estimating' ? 'Estimating the depth map…' : 'No depth map.';
  }
  // PyNET.
  const pynet = status.pynet;
  if (conditioned() && pynet.fnumber !== undefined) {
    const focus = pynet.focus === null || pynet.focus === undefined ? '' : `, focus disparity ${pynet.focus.toFixed(3)}`;
    $('pynet-focus-info').textContent = `Rendered at f/${pynet.fnumber}${focus}` +
      (pynet.point ? ' (clicked point).' : (pynet.focus === null ? '.' : ' (automatic focus).'));
  }
  $('pynet-progress').value = pynet.progress;
  $('pynet-status').textContent = describe(pynet, size);
  $('pynet-status').classList.toggle('error', pynet.state === 'error');
  if (pynet.ready && shown.pynet !== pynet.image_version) {
    shown.pynet = pynet.image_version;
    setImage('pynet-img', imageUrl('pynet', shown.pynet), shown.pynet);
  }
  // Classical.
  const cl = status.classical;
  $('classical-status').textContent = describe(cl, size);
  $('classical-status').classList.toggle('error', cl.state === 'error' || cl.state === 'unavailable');
  if (cl.ready && shown.classical !== cl.image_version) {
    shown.classical = cl.image_version;
    setImage('classical-img', imageUrl('classical', shown.classical), shown.classical);
  }
  if (cl.focus !== null && cl.focus !== undefined) {
    $('focus-info').textContent = cl.point
      ? `Focus: disparity ${cl.focus.toFixed(3)} at the clicked point (near = 1).`
      : `Focus: automatic, disparity ${cl.focus.toFixed(3)} at the centre of the photo (click the photo to change it).`;
  }
  updateDownloads();
  updateCompare();
}

function setImage(id, url, version) {
  const img = $(id);
  img.onload = () => { img.hidden = false; img.dataset.version = String(version); updateCompare(); };
  img.src = url;
}

function updateDownloads() {
  const format = $('format').value;
  for (const what of ['pynet', 'classical']) {
    const link = $('download-' + what);
    if (session && shown[what]) {
      link.href = imageUrl(what, shown[what], `&size=full&format=${format}&download=1`);
      link.classList.remove('disabled');
    } else {
      link.removeAttribute('href');
      link.classList.add('disabled');
    }
  }
}

function updateCompare() {
  const which = document.querySelector('input[name="compare-which"]:checked').value;
  const after = $('compare-after');
  if (session && shown[which]) {
    const url = imageUrl(which, shown[which]);
    if (after.dataset.src !== url) { after.dataset.src = url; after.src = url; }
    after.hidden = false;
  } else {
    after.hidden = true;
  }
  const split = Number($('compare-slider').value);
  after.style.clipPath = `inset(0 0 0 ${split}%)`;
  $('compare-line').style.left = `${split}%`;
}

async function requestClassical(point) {
  if (!session || !last) return;
  if (!last.depth.ready) {
    showError('The classical render needs a depth map: upload the photo again with its depth map.');
    return;
  }
  clearError();
  const current = last.classical;
  const body = {
    x: point ? point.x : (current.point ? current.point[0] : null),
    y: point ? point.y : (current.point ? current.point[1] : null),
    strength: Number($('strength').value),
  };
  try {
    await api(`/api/sessions/${session}/classical`, { method: 'POST', body: JSON.stringify(body),
      headers: { 'Content-Type': 'application/json' } });
  } catch (e) { showError(e.message); return; }
  poll();
}

async function requestPynet(point) {
  if (!session || !last || !conditioned()) return;
  const current = last.pynet;
  const body = {
    x: point ? point.x : (current.point ? current.point[0] : null),
    y: point ? point.y : (current.point ? current.point[1] : null),
    fnumber: fnumber(),
  };
  try {
    await api(`/api/sessions/${session}/pynet`, { method: 'POST', body: JSON.stringify(body),
      headers: { 'Content-Type': 'application/json' } });
  } catch (e) { showError(e.message); return; }
  poll();
}

// ---- wiring ----
$('render').addEventListener('click', upload);
$('input-img').addEventListener('click', (event) => {
  const img = event.currentTarget;
  const x = Math.min(Math.max(event.offsetX / img.clientWidth, 0), 1);
  const y = Math.min(Math.max(event.offsetY / img.clientHeight, 0), 1);
  const marker = $('focus-marker');
  marker.style.left = `${100 * x}%`;
  marker.style.top = `${100 * y}%`;
  marker.hidden = false;
  requestClassical({ x, y });
  if (conditioned() && info.condition === 'aperture_focus') requestPynet({ x, y });
});
$('fnumber').addEventListener('input', showFnumber);
$('fnumber').addEventListener('change', () => {
  requestPynet(null);
  const strength = Math.min(info.default_strength * info.default_fnumber / fnumber(), Number($('strength').max));
  $('strength').value = strength;
  $('strength-value').textContent = strength.toFixed(3);
  if (last && last.depth.ready) requestClassical(null);
});
$('strength').addEventListener('input', () => { $('strength-value').textContent = Number($('strength').value).toFixed(3); });
$('strength').addEventListener('change', () => requestClassical(null));
$('compare-slider').addEventListener('input', updateCompare);
for (const radio of document.querySelectorAll('input[name="compare-which"]')) radio.addEventListener('change', updateCompare);
$('format').addEventListener('change', updateDownloads);

const zone = $('dropzone');
zone.addEventListener('dragover', (event) => { event.preventDefault(); zone.classList.add('over'); });
zone.addEventListener('dragleave', () => zone.classList.remove('over'));
zone.addEventListener('drop', (event) => {
  event.preventDefault();
  zone.classList.remove('over');
  const files = [...event.dataTransfer.files];
  if (!files.length) return;
  // Two files: the one named like a depth map (or .npy) is the depth map.
  const isDepth = (f) => /depth|\.npy$/i.test(f.name);
  const photo = files.find((f) => !isDepth(f)) || files[0];
  const depth = files.find((f) => f !== photo);
  const set = (input, file) => { const dt = new DataTransfer(); if (file) dt.items.add(file); input.files = dt.files; };
  set($('photo'), photo);
  if (files.length > 1) set($('depth'), depth);
  upload();
});

init();
