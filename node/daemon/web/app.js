// BlendNet status page: the mesh, its jobs, a job's live preview and statistics, and the cloud
// instances, drawn from the daemon's local JSON API (node/daemon/src/api.rs).
//
// How it stays current: the API's event stream (`GET /v1/events`, one `job` event per job
// change) says which job to read again; the peers, the job list and the cloud instances are also
// polled every POLL_MS, so a page that lost its stream still moves. Everything is read with the
// session cookie; a change (cancel) also carries `X-Requested-With: blendnet`, the header the
// server asks of cookie-authenticated changes.
//
// No framework and no build step: each page is a function that draws its data into `#view`.
// Elements the browser test looks for carry stable ids and data attributes (`data-peer-id`,
// `data-job-id`, `#job-progress`, `#preview`, …).

/** How often the peers, the jobs and the cloud instances are read again without an event. */
const POLL_MS = 5000;
/** Events for one job often come in bursts (a slice lands, its merge starts): read once per. */
const EVENT_DEBOUNCE_MS = 250;
/** The preview is merged on the server from every slice so far: at most one per this. */
const PREVIEW_MIN_INTERVAL_MS = 1000;
/** The longer side of the preview, in pixels. */
const PREVIEW_SIZE = 640;
/** Job views read at once in the list (the newest active jobs first): bounds the requests. */
const MAX_LIST_VIEWS = 12;
/** Progress samples kept per job to measure its rate, for the ETA. */
const RATE_WINDOW_MS = 60_000;
/** How long a Cancel button waits for its confirmation click. */
const CONFIRM_MS = 5000;
/** Frames shown one by one in a progress strip; more are grouped into this many buckets. */
const MAX_FRAME_SEGMENTS = 100;
/** Where the event stream is reconnected from after an error, at the latest. */
const RECONNECT_MS = 5000;

const PHASES = [
  ['wait_ms', 'Queue wait'],
  ['fetch_ms', 'Fetch inputs'],
  ['blender_start_ms', 'Blender start'],
  ['render_ms', 'Render'],
  ['upload_ms', 'Upload'],
  ['merge_ms', 'Merge'],
];

const state = {
  /** `GET /v1/status`: this node. */
  self: null,
  peers: [],
  peersError: null,
  /** Job summaries, newest first. */
  jobs: [],
  jobsError: null,
  /** Job id → full job view (the jobs shown in detail or in progress). */
  views: new Map(),
  /** Job id → error text of the last read of its view. */
  viewErrors: new Map(),
  /** Job id → [{t, done}] progress samples, for the ETA. */
  rates: new Map(),
  /** Peer id → {key, samples, t, sps}: samples per second measured from its activity. */
  peerRates: new Map(),
  /** `GET /v1/cloud`: undefined before the first read, null when the node has no provisioner. */
  cloud: undefined,
  cloudError: null,
  /** Job id → [{task, log}] from `GET /v1/jobs/{id}/logs`. */
  logs: new Map(),
  logsAt: new Map(),
  /** Task keys whose log is unfolded on the job page. */
  openLogs: new Set(),
  /** Job id → time until which its Cancel button waits for the confirmation. */
  confirming: new Map(),
  /** Job id → message of a cancellation the node refused. */
  cancelErrors: new Map(),
  /** The job page's preview. */
  preview: { job: null, frame: null, url: null, digest: null, updates: 0, at: 0, timer: null, signature: null },
  route: { page: 'mesh', id: null },
  live: 'connecting',
};

// ---------------------------------------------------------------------------------------------
// The API

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** A request to the node with the session cookie; throws HttpError for any answer but 2xx. */
async function api(path, options = {}) {
  const headers = { Accept: 'application/json', ...(options.headers || {}) };
  const method = options.method || 'GET';
  if (method !== 'GET' && method !== 'HEAD') headers['X-Requested-With'] = 'blendnet';
  let res;
  try {
    res = await fetch(path, { ...options, method, headers, credentials: 'same-origin', cache: 'no-store' });
  } catch (e) {
    showBanner('The node does not answer: is `blendnet up` still running?', 'offline');
    throw new HttpError(0, 'the node does not answer');
  }
  if (res.status === 401) {
    showBanner('This page is not signed in (or its session ended): run `blendnet web` for a new login link.', 'signed-out');
    throw new HttpError(401, 'not signed in');
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      if (body && body.error) message = body.error;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new HttpError(res.status, message);
  }
  clearBanner('offline');
  return res;
}

async function getJson(path) {
  return (await api(path)).json();
}

// ---------------------------------------------------------------------------------------------
// DOM helpers (no innerHTML: every text from the API goes in as text)

function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

function build(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.setAttribute('class', value);
    else if (key === 'dataset') for (const [k, v] of Object.entries(value)) { if (v !== null && v !== undefined) el.dataset[k] = v; }
    else if (key === 'style') for (const [k, v] of Object.entries(value)) el.style.setProperty(k, v);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function $(selector) {
  return document.querySelector(selector);
}

function showBanner(text, kind) {
  const banner = $('#banner');
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = false;
}

function clearBanner(kind) {
  const banner = $('#banner');
  if (!banner.hidden && banner.dataset.kind === kind) banner.hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Formatting

function fmtDuration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ${m - hours * 60} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

function fmtBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
}

function fmtMoney(x) {
  if (x === null || x === undefined || !Number.isFinite(x)) return '—';
  return `$${x.toFixed(x !== 0 && Math.abs(x) < 1 ? 4 : 2)}`;
}

function fmtNumber(x, digits = 0) {
  if (x === null || x === undefined || !Number.isFinite(x)) return '—';
  return x.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function fmtPercent(done, total) {
  if (!total) return '0%';
  const p = (100 * done) / total;
  return `${p >= 100 ? 100 : p < 99.5 ? Math.round(p) : 99}%`;
}

function fmtTime(unixSecs) {
  if (!unixSecs) return '—';
  return new Date(unixSecs * 1000).toLocaleString();
}

/** `1, 2, 3, 5` → `1–3, 5`. */
function fmtFrames(frames) {
  const sorted = [...frames].sort((a, b) => a - b);
  const parts = [];
  for (let i = 0; i < sorted.length; i++) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}–${sorted[j]}`);
    i = j;
  }
  return parts.join(', ');
}

/** A peer as people know it: its fingerprint when the node knows the peer, else a short id. */
function peerName(peerId) {
  if (!peerId) return '—';
  const peer = state.peers.find((p) => p.peer_id === peerId);
  if (peer) return peer.fingerprint;
  return `…${peerId.slice(-8)}`;
}

function peerLabel(peerId, tag = true) {
  const self = state.self && state.self.peer_id === peerId;
  return h('span', { class: 'peer-ref', title: self ? `${peerId} (this node)` : peerId, dataset: { peerId } },
    peerName(peerId), self ? (tag ? h('span', { class: 'tag' }, 'this node') : ' ✱') : null);
}

function shortId(id) {
  return id ? id.slice(0, 10) : '';
}

/** A job's state as one word, and its failure reason. */
function jobStatus(summary) {
  const s = summary.status;
  if (typeof s === 'string') return { word: s, reason: '' };
  if (s && typeof s === 'object') {
    const word = Object.keys(s)[0] || 'Unknown';
    return { word, reason: (s[word] && s[word].reason) || '' };
  }
  return { word: 'Unknown', reason: '' };
}

const STATE_SYMBOL = { Active: '▶', Done: '✓', Cancelled: '⊘', Failed: '✕' };

function stateBadge(word, extra) {
  return h('span', { class: `badge state-${word.toLowerCase()}`, dataset: { state: word } }, `${STATE_SYMBOL[word] || '•'} ${word}`, extra ? ` · ${extra}` : null);
}

function taskKey(task) {
  return `f${task.frame_start}+${task.frame_count}-s${task.sample_offset}+${task.samples}`;
}

/** `frame 3 · samples 0–15`, `frames 1–4` (a whole-frame task), `Merge frame 3`. */
function taskLabel(task, sliced = true) {
  const frames = task.frame_count > 1 ? `frames ${task.frame_start}–${task.frame_start + task.frame_count - 1}` : `frame ${task.frame_start}`;
  if (task.kind === 'merge') return `Merge ${frames}`;
  if (!sliced) return frames;
  return `${frames} · samples ${task.sample_offset}–${task.sample_offset + task.samples - 1}`;
}

function taskState(t) {
  const s = t.state;
  if (s === 'Pending' || !s) return { word: 'Pending', peer: null };
  if (s.Leased) return { word: s.Leased.backup ? 'Rendering (backup)' : 'Rendering', peer: s.Leased.worker };
  if (s.Done) {
    const renderer = (t.results || []).find((r) => r[1] === s.Done.result);
    return { word: 'Done', peer: renderer ? renderer[0] : null };
  }
  return { word: Object.keys(s)[0] || 'Unknown', peer: null };
}

// ---------------------------------------------------------------------------------------------
// Reading the node

async function refreshSelf() {
  try {
    state.self = await getJson('/v1/status');
    const el = $('#self-node');
    el.textContent = `${state.self.fingerprint} · ${state.self.state || ''}`;
    el.title = `This page talks to ${state.self.peer_id} (blendnet ${state.self.version || ''})`;
  } catch (_) { /* the banner says why */ }
}

async function refreshPeers() {
  try {
    state.peers = await getJson('/v1/peers');
    state.peersError = null;
    const now = performance.now();
    for (const peer of state.peers) measurePeer(peer, now);
  } catch (e) {
    state.peersError = e.message;
  }
  if (state.route.page === 'mesh') renderView();
}

/** Samples per second from two readings of the same task's progress. */
function measurePeer(peer, now) {
  const r = peer.rendering;
  if (!r || !r.task || r.task.kind === 'merge') return;
  const key = `${r.job}/${taskKey(r.task)}`;
  const done = r.frames_done * r.task.samples + r.samples_done;
  const last = state.peerRates.get(peer.peer_id);
  if (last && last.key === key && done > last.samples && now > last.t) {
    const sps = ((done - last.samples) * 1000) / (now - last.t);
    state.peerRates.set(peer.peer_id, { key, samples: done, t: now, sps });
  } else if (!last || last.key !== key) {
    state.peerRates.set(peer.peer_id, { key, samples: done, t: now, sps: last ? last.sps : null });
  }
}

async function refreshJobs(onlyIds) {
  try {
    const jobs = await getJson('/v1/jobs');
    state.jobs = jobs.slice().reverse();
    state.jobsError = null;
    const now = performance.now();
    for (const job of state.jobs) recordRate(job, now);
  } catch (e) {
    state.jobsError = e.message;
  }
  // Full views: the job shown, the active jobs (for their frames) and, once, each finished
  // one (for its frames and statistics); the newest first, at most MAX_LIST_VIEWS.
  const wanted = new Set();
  if (state.route.page === 'job' && state.route.id) wanted.add(state.route.id);
  for (const job of state.jobs) {
    if (wanted.size >= MAX_LIST_VIEWS) break;
    const active = jobStatus(job).word === 'Active';
    const changed = onlyIds && onlyIds.has(job.id);
    const seen = state.views.get(job.id);
    const outdated = seen && jobStatus(seen.summary).word !== jobStatus(job).word;
    if (active || changed || !seen || outdated) wanted.add(job.id);
  }
  await Promise.all([...wanted].map(refreshView));
  renderView();
}

async function refreshView(id) {
  try {
    const view = await getJson(`/v1/jobs/${encodeURIComponent(id)}`);
    state.views.set(id, view);
    state.viewErrors.delete(id);
    recordRate(view.summary, performance.now());
  } catch (e) {
    state.viewErrors.set(id, e.message);
  }
}

function recordRate(summary, now) {
  let samples = state.rates.get(summary.id);
  if (!samples) state.rates.set(summary.id, (samples = []));
  const last = samples[samples.length - 1];
  if (!last || last.done !== summary.done_units) samples.push({ t: now, done: summary.done_units });
  while (samples.length > 2 && now - samples[0].t > RATE_WINDOW_MS) samples.shift();
}

async function refreshCloud() {
  try {
    state.cloud = await getJson('/v1/cloud');
    state.cloudError = null;
  } catch (e) {
    if (e.status === 404) {
      state.cloud = null;
      state.cloudError = null;
    } else {
      state.cloudError = e.message;
    }
  }
  if (state.route.page === 'cloud') renderView();
}

async function refreshLogs(id, force) {
  const at = state.logsAt.get(id) || 0;
  if (!force && performance.now() - at < 3000) return;
  state.logsAt.set(id, performance.now());
  try {
    state.logs.set(id, await getJson(`/v1/jobs/${encodeURIComponent(id)}/logs`));
  } catch (_) {
    state.logs.set(id, []);
  }
}

/** Milliseconds to the job's end: from its measured progress rate, else from ms per sample. */
function etaMs(summary) {
  if (jobStatus(summary).word !== 'Active') return null;
  const remaining = summary.total_units - summary.done_units;
  if (remaining <= 0) return 0;
  const samples = state.rates.get(summary.id) || [];
  if (samples.length >= 2) {
    const first = samples[0];
    const last = samples[samples.length - 1];
    const dt = last.t - first.t;
    const units = last.done - first.done;
    if (dt >= 2000 && units > 0) {
      // Time since the last progress counts too, so a stalled job's ETA grows.
      const rate = units / Math.max(dt, performance.now() - first.t);
      return remaining / rate;
    }
  }
  if (summary.ms_per_unit) {
    const workers = state.peers.filter((p) => p.online && p.rendering && p.rendering.job === summary.id && p.rendering.task.kind !== 'merge').length;
    return (remaining * summary.ms_per_unit) / Math.max(1, workers);
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// Live updates

const dirtyJobs = new Set();
let dirtyTimer = null;

function onJobChange(id) {
  dirtyJobs.add(id);
  if (dirtyTimer) return;
  dirtyTimer = setTimeout(async () => {
    dirtyTimer = null;
    const ids = new Set(dirtyJobs);
    dirtyJobs.clear();
    await refreshJobs(ids);
    if (state.route.page === 'job' && ids.has(state.route.id)) schedulePreview(false);
  }, EVENT_DEBOUNCE_MS);
}

function setLive(live) {
  state.live = live;
  const el = $('#live');
  el.dataset.live = live;
  el.textContent = { live: 'live', connecting: 'connecting…', offline: 'updates paused' }[live] || live;
}

let events = null;

function connectEvents() {
  if (events) events.close();
  setLive('connecting');
  events = new EventSource('/v1/events', { withCredentials: true });
  events.addEventListener('open', () => setLive('live'));
  events.addEventListener('job', (e) => {
    try {
      const change = JSON.parse(e.data);
      if (change && change.job) onJobChange(change.job);
    } catch (_) { /* not a job change */ }
  });
  events.addEventListener('error', () => {
    setLive('offline');
    // EventSource retries by itself unless the server refused it (401): then try later.
    if (events.readyState === EventSource.CLOSED) setTimeout(connectEvents, RECONNECT_MS);
  });
}

// ---------------------------------------------------------------------------------------------
// Routing

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  if (parts[0] === 'jobs' && parts[1]) return { page: 'job', id: parts[1] };
  if (parts[0] === 'jobs') return { page: 'jobs', id: null };
  if (parts[0] === 'cloud') return { page: 'cloud', id: null };
  return { page: 'mesh', id: null };
}

async function onRoute() {
  state.route = parseRoute();
  for (const a of document.querySelectorAll('.tabs a')) {
    const on = a.dataset.tab === state.route.page || (a.dataset.tab === 'jobs' && state.route.page === 'job');
    a.classList.toggle('active', on);
    if (on) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.body.dataset.page = state.route.page;
  if (state.route.page === 'job' && state.preview.job !== state.route.id) resetPreview(state.route.id);
  renderView();
  if (state.route.page === 'job') {
    await Promise.all([refreshView(state.route.id), refreshLogs(state.route.id, true)]);
    renderView();
    schedulePreview(true);
  } else if (state.route.page === 'cloud') {
    await refreshCloud();
  }
}

/** Draws the current page from `state` into `#view`, keeping the elements that stay (see
 * `morph`), so a click in progress or an unfolded log survives an update. */
function renderView() {
  const view = $('#view');
  const route = state.route;
  let page;
  if (route.page === 'jobs') page = jobsPage();
  else if (route.page === 'cloud') page = cloudPage();
  else if (route.page === 'job') page = jobPage(route.id);
  else page = meshPage();
  const current = view.firstElementChild;
  if (current && view.childNodes.length === 1) morph(current, page);
  else view.replaceChildren(page);
  document.body.dataset.ready = 'true';
}

/** The element's identity: elements with different keys are replaced, not updated. */
function keyOf(el) {
  if (el.nodeType !== Node.ELEMENT_NODE) return '';
  return el.id || el.dataset.jobId || el.dataset.peerId || el.dataset.task || el.dataset.instanceId || el.dataset.key || '';
}

/** Updates `from` in place to look like `to` (attributes, text, children by position). An
 * element marked `data-keep` is left as it is: the preview, which changes on its own. */
function morph(from, to) {
  if (from.nodeType !== to.nodeType || from.nodeName !== to.nodeName || keyOf(from) !== keyOf(to)) {
    from.replaceWith(to);
    return;
  }
  if (from.nodeType !== Node.ELEMENT_NODE) {
    if (from.nodeValue !== to.nodeValue) from.nodeValue = to.nodeValue;
    return;
  }
  if (from.hasAttribute('data-keep')) return;
  for (const attr of [...from.attributes]) {
    if (!to.hasAttribute(attr.name)) from.removeAttribute(attr.name);
  }
  for (const attr of [...to.attributes]) {
    // Inline styles only through the CSSOM: the page's CSP refuses style attributes.
    if (attr.name === 'style') {
      if (from.style.cssText !== to.style.cssText) from.style.cssText = to.style.cssText;
    } else if (from.getAttribute(attr.name) !== attr.value) {
      from.setAttribute(attr.name, attr.value);
    }
  }
  const a = [...from.childNodes];
  const b = [...to.childNodes];
  for (let i = 0; i < b.length; i++) {
    if (i < a.length) morph(a[i], b[i]);
    else from.append(b[i]);
  }
  for (let i = b.length; i < a.length; i++) a[i].remove();
  if (from.nodeName === 'SELECT' && from.value !== to.value) from.value = to.value;
  if (from.nodeName === 'DETAILS') from.open = to.open;
}

/** Clicks, changes and unfolds in the page, wherever they come from (the elements are redrawn;
 * their `data-action` says what they do). */
function listen() {
  const view = $('#view');
  view.addEventListener('click', (e) => {
    const el = e.target.closest('[data-action]');
    if (!el || el.disabled) return;
    const id = el.dataset.jobId;
    if (el.dataset.action === 'cancel') {
      state.confirming.set(id, Date.now() + CONFIRM_MS);
      state.cancelErrors.delete(id);
      renderView();
      setTimeout(renderView, CONFIRM_MS + 50);
    } else if (el.dataset.action === 'confirm-cancel') {
      cancelJob(id);
    } else if (el.dataset.action === 'keep') {
      state.confirming.delete(id);
      renderView();
    }
  });
  view.addEventListener('change', (e) => {
    if (e.target.id === 'preview-frame') {
      state.preview.frame = Number(e.target.value);
      state.preview.signature = null;
      renderView();
      schedulePreview(true);
    }
  });
  // `toggle` does not bubble: listen while it goes down.
  view.addEventListener('toggle', (e) => {
    const el = e.target;
    if (!(el instanceof HTMLDetailsElement) || !el.dataset.task) return;
    if (el.open) state.openLogs.add(el.dataset.task);
    else state.openLogs.delete(el.dataset.task);
  }, true);
}

// ---------------------------------------------------------------------------------------------
// Mesh

function meshPage() {
  const peers = [...state.peers].sort((a, b) => (b.is_self - a.is_self) || (b.online - a.online) || a.fingerprint.localeCompare(b.fingerprint));
  const online = peers.filter((p) => p.online);
  const rendering = online.filter((p) => p.rendering);
  const cores = online.reduce((n, p) => n + ((p.capabilities && p.capabilities.cores) || 0), 0);
  const gpus = online.reduce((n, p) => n + ((p.capabilities && p.capabilities.gpus && p.capabilities.gpus.length) || 0), 0);
  return h('section', { class: 'page', id: 'mesh' },
    h('div', { class: 'page-head' }, h('h1', {}, 'Mesh'), h('p', { class: 'muted' }, state.self ? `Mesh ${shortId(state.self.mesh_id)}…` : '')),
    h('div', { class: 'kpis' },
      kpi('Peers online', `${online.length} of ${peers.length}`, 'peers-online'),
      kpi('Rendering now', `${rendering.length}`, 'peers-rendering'),
      kpi('CPU cores online', `${cores}`, 'cores-online'),
      kpi('GPUs online', `${gpus}`, 'gpus-online')),
    state.peersError ? h('p', { class: 'error' }, `Cannot read the peers: ${state.peersError}`) : null,
    h('div', { class: 'table-wrap' },
      h('table', { class: 'data', id: 'peers' },
        h('thead', {}, h('tr', {},
          h('th', {}, 'Peer'), h('th', {}, 'State'), h('th', {}, 'Roles'), h('th', {}, 'Blender'),
          h('th', {}, 'Hardware'), h('th', {}, 'Current task'), h('th', { class: 'num' }, 'Samples/s'),
          h('th', { class: 'num' }, 'In'), h('th', { class: 'num' }, 'Out'))),
        h('tbody', {}, peers.length ? peers.map(peerRow) : h('tr', {}, h('td', { colspan: 9, class: 'muted' }, 'No peers known yet.'))))));
}

function kpi(label, value, id) {
  return h('div', { class: 'kpi', id }, h('div', { class: 'kpi-value' }, value), h('div', { class: 'kpi-label' }, label));
}

function peerRow(peer) {
  const caps = peer.capabilities || {};
  const gpus = caps.gpus || [];
  const hardware = [
    caps.cores ? `${caps.cores} cores` : null,
    gpus.length ? `${gpus.length} GPU${gpus.length > 1 ? 's' : ''}: ${gpus.map((g) => (typeof g === 'string' ? g : g.name || g.kind || 'GPU')).join(', ')}` : 'no GPU',
    caps.ram_bytes ? `${fmtBytes(caps.ram_bytes)} RAM` : null,
  ].filter(Boolean).join(' · ');
  const lastSeen = peer.online ? 'online' : peer.last_seen ? `offline, seen ${fmtTime(peer.last_seen)}` : 'offline';
  return h('tr', { dataset: { peerId: peer.peer_id, online: String(peer.online) } },
    h('td', {}, h('div', { class: 'peer-name' }, peer.fingerprint, peer.is_self ? h('span', { class: 'tag' }, 'this node') : null),
      h('div', { class: 'mono muted small', title: peer.peer_id }, `${peer.peer_id.slice(0, 16)}…`)),
    h('td', {}, h('span', { class: `online ${peer.online ? 'on' : 'off'}` }, peer.online ? '● Online' : '○ Offline'),
      peer.online ? null : h('div', { class: 'small muted' }, lastSeen)),
    h('td', {}, (peer.roles || []).map((r) => h('span', { class: 'chip' }, r))),
    h('td', {}, peer.blender || h('span', { class: 'muted' }, 'none')),
    h('td', { class: 'small' }, caps.cores || gpus.length ? hardware : h('span', { class: 'muted' }, 'unknown')),
    h('td', { class: 'current-task' }, currentTask(peer)),
    h('td', { class: 'num', dataset: { field: 'sps' } }, samplesPerSecond(peer)),
    h('td', { class: 'num', dataset: { field: 'bytes-in' }, title: 'Blob bytes received from this peer' }, peer.is_self ? h('span', { class: 'muted' }, '—') : fmtBytes(peer.bytes_in)),
    h('td', { class: 'num', dataset: { field: 'bytes-out' }, title: 'Blob bytes sent to this peer' }, peer.is_self ? h('span', { class: 'muted' }, '—') : fmtBytes(peer.bytes_out)));
}

function currentTask(peer) {
  const r = peer.rendering;
  if (!r) return h('span', { class: 'muted' }, peer.online ? 'idle' : '—');
  const summary = state.jobs.find((j) => j.id === r.job);
  const name = summary ? summary.name : `job ${shortId(r.job)}`;
  const t = r.task;
  let progress = null;
  if (t.kind !== 'merge' && t.samples) {
    const done = r.frames_done * t.samples + r.samples_done;
    const total = t.frame_count * t.samples;
    progress = bar(done, total, 'task-bar', `${fmtNumber(done)} / ${fmtNumber(total)} samples`);
  }
  return h('div', {},
    h('a', { href: `#/jobs/${encodeURIComponent(r.job)}` }, name),
    h('div', { class: 'small muted' }, taskLabel(t, !state.views.has(r.job) || previewable(state.views.get(r.job)))),
    progress);
}

function samplesPerSecond(peer) {
  // The job's own statistics, when its node reports them; else measured from the peer's status.
  if (peer.rendering) {
    const view = state.views.get(peer.rendering.job);
    const entry = view && view.stats && (view.stats.peers || []).find((p) => p.peer === peer.peer_id);
    if (entry && Number.isFinite(entry.samples_per_second)) return fmtNumber(entry.samples_per_second, 1);
  }
  const measured = state.peerRates.get(peer.peer_id);
  if (peer.rendering && measured && Number.isFinite(measured.sps)) return h('span', { title: 'measured from its progress' }, `≈ ${fmtNumber(measured.sps, 1)}`);
  const best = bestKnownRate(peer.peer_id);
  return best === null ? h('span', { class: 'muted' }, '—') : h('span', { class: 'muted', title: 'in its last job' }, fmtNumber(best, 1));
}

function bestKnownRate(peerId) {
  for (const job of state.jobs) {
    const view = state.views.get(job.id);
    const entry = view && view.stats && (view.stats.peers || []).find((p) => p.peer === peerId);
    if (entry && Number.isFinite(entry.samples_per_second)) return entry.samples_per_second;
  }
  return null;
}

/** A progress bar with its text, readable without color. */
function bar(done, total, cls, text) {
  const frac = total ? Math.min(1, done / total) : 0;
  const fill = h('div', { class: 'bar-fill' });
  fill.style.width = `${(frac * 100).toFixed(2)}%`;
  return h('div', { class: `bar ${cls || ''}`, role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': total, 'aria-valuenow': done, dataset: { done: String(done), total: String(total), percent: String(Math.floor(frac * 100)) } },
    h('div', { class: 'bar-track' }, fill),
    h('div', { class: 'bar-text' }, text || fmtPercent(done, total)));
}

// ---------------------------------------------------------------------------------------------
// Jobs

function jobsPage() {
  const active = state.jobs.filter((j) => jobStatus(j).word === 'Active').length;
  return h('section', { class: 'page', id: 'jobs' },
    h('div', { class: 'page-head' }, h('h1', {}, 'Jobs'), h('p', { class: 'muted' }, `${active} active, ${state.jobs.length} in all`)),
    state.jobsError ? h('p', { class: 'error' }, `Cannot read the jobs: ${state.jobsError}`) : null,
    h('div', { class: 'table-wrap' },
      h('table', { class: 'data', id: 'jobs-table' },
        h('thead', {}, h('tr', {},
          h('th', {}, 'Job'), h('th', {}, 'State'), h('th', { class: 'wide' }, 'Progress per frame'),
          h('th', { class: 'num' }, 'Samples done'), h('th', { class: 'num' }, 'ETA'), h('th', {}, ''))),
        h('tbody', {}, state.jobs.length ? state.jobs.map(jobRow) : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No jobs yet: submit one from Blender or with `blendnet render`.'))))));
}

function jobRow(summary) {
  const view = state.views.get(summary.id);
  const { word, reason } = jobStatus(summary);
  const eta = etaMs(summary);
  return h('tr', { dataset: { jobId: summary.id, state: word } },
    h('td', {}, h('a', { href: `#/jobs/${encodeURIComponent(summary.id)}`, class: 'job-name' }, summary.name),
      h('div', { class: 'mono muted small' }, shortId(summary.id)),
      view ? h('div', { class: 'small muted' }, `${view.spec.frames.length} frame${view.spec.frames.length > 1 ? 's' : ''} × ${fmtNumber(view.spec.samples)} samples`) : null),
    h('td', {}, stateBadge(word), reason ? h('div', { class: 'small error' }, reason) : null),
    h('td', { class: 'wide' }, frameStrip(summary, view)),
    h('td', { class: 'num' }, `${fmtNumber(summary.done_units)} / ${fmtNumber(summary.total_units)}`),
    h('td', { class: 'num', dataset: { field: 'eta' } }, word === 'Active' ? (eta === null ? h('span', { class: 'muted' }, 'measuring…') : fmtDuration(eta)) : '—'),
    h('td', { class: 'actions' }, word === 'Active' ? cancelButton(summary) : null));
}

/** One bar per frame (grouped when there are many), with the whole job's percentage. */
function frameStrip(summary, view) {
  const total = summary.total_units;
  const done = summary.done_units;
  const frames = view ? view.frames : null;
  const strip = h('div', { class: 'frame-strip', dataset: { frames: frames ? String(frames.length) : '' } });
  if (frames && frames.length) {
    const groups = groupFrames(frames);
    for (const g of groups) {
      const seg = h('div', { class: 'frame-seg', title: g.label, dataset: { frame: g.first, done: String(g.done), total: String(g.total) } });
      const fill = h('div', { class: 'frame-fill' });
      fill.style.height = `${g.total ? (100 * g.done) / g.total : 0}%`;
      seg.append(fill);
      if (g.done >= g.total && g.total) seg.classList.add('complete');
      strip.append(seg);
    }
  }
  return h('div', { class: 'progress-cell' },
    frames && frames.length > 1 ? strip : null,
    bar(done, total, 'job-bar', `${fmtPercent(done, total)}${frames && frames.length > 1 ? ` · ${frames.filter((f) => f.samples_done >= f.samples).length}/${frames.length} frames` : ''}`));
}

function groupFrames(frames) {
  const per = Math.ceil(frames.length / MAX_FRAME_SEGMENTS);
  const out = [];
  for (let i = 0; i < frames.length; i += per) {
    const chunk = frames.slice(i, i + per);
    const done = chunk.reduce((n, f) => n + f.samples_done, 0);
    const total = chunk.reduce((n, f) => n + f.samples, 0);
    const first = chunk[0].frame;
    const last = chunk[chunk.length - 1].frame;
    const label = per === 1 ? `Frame ${first}: ${done}/${total} samples` : `Frames ${first}–${last}: ${fmtPercent(done, total)}`;
    out.push({ first, done, total, label });
  }
  return out;
}

function cancelButton(summary) {
  const until = state.confirming.get(summary.id) || 0;
  const own = !state.self || summary.submitter === state.self.peer_id;
  const error = state.cancelErrors.get(summary.id);
  if (!own) {
    return h('span', { class: 'confirm' }, h('button', { class: 'btn', disabled: true, title: 'Only the node that submitted a job can cancel it', dataset: { action: 'cancel', jobId: summary.id } }, 'Cancel'));
  }
  if (Date.now() < until) {
    return h('span', { class: 'confirm' },
      h('button', { class: 'btn danger', dataset: { action: 'confirm-cancel', jobId: summary.id } }, 'Confirm cancel'),
      h('button', { class: 'btn', dataset: { action: 'keep', jobId: summary.id } }, 'Keep'));
  }
  return h('span', { class: 'confirm' },
    h('button', { class: 'btn', title: 'Stop rendering this job (asks to confirm)', dataset: { action: 'cancel', jobId: summary.id } }, 'Cancel'),
    error ? h('div', { class: 'small error' }, error) : null);
}

async function cancelJob(id) {
  state.confirming.delete(id);
  state.cancelErrors.delete(id);
  try {
    await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: 'DELETE' });
  } catch (e) {
    state.cancelErrors.set(id, `Not cancelled: ${e.message}`);
  }
  await refreshJobs(new Set([id]));
}

// ---------------------------------------------------------------------------------------------
// One job

function resetPreview(id) {
  const p = state.preview;
  if (p.timer) clearTimeout(p.timer);
  if (p.url) URL.revokeObjectURL(p.url);
  state.preview = { job: id, frame: null, url: null, digest: null, updates: 0, at: 0, timer: null, signature: null };
  // The kept preview box belongs to the previous job: draw a fresh one.
  const box = $('#preview-box');
  if (box) box.remove();
}

function previewBox() {
  return h('div', { class: 'preview-box', id: 'preview-box', 'data-keep': true },
    h('img', { id: 'preview', alt: 'Merged preview of the frame so far', hidden: true, dataset: { updates: '0' } }),
    h('p', { id: 'preview-empty', class: 'muted' }, 'Waiting for the first slice…'),
    h('p', { id: 'preview-status', class: 'small muted' }));
}

function jobPage(id) {
  const view = state.views.get(id);
  const page = (...children) => h('section', { class: 'page', id: 'job', dataset: { jobId: id } },
    h('p', { class: 'crumbs' }, h('a', { href: '#/jobs' }, '← All jobs')), ...children);
  if (!view) {
    const error = state.viewErrors.get(id);
    return page(h('div', { id: 'job-head' }, h('h1', {}, 'Job'),
      h('p', { class: error ? 'error' : 'muted' }, error ? `Cannot read job ${id}: ${error}` : 'Loading…')));
  }
  const summary = view.summary;
  const { word, reason } = jobStatus(summary);
  document.title = `${summary.name} · BlendNet`;
  const eta = etaMs(summary);
  const progress = bar(summary.done_units, summary.total_units, 'big', `${fmtPercent(summary.done_units, summary.total_units)} · ${fmtNumber(summary.done_units)} / ${fmtNumber(summary.total_units)} frame-samples`);
  progress.id = 'job-progress';
  const inCover = view.tasks.filter((t) => t.in_cover && t.task.kind !== 'merge');
  if (word !== 'Active' || view.tasks.some((t) => (t.failures || []).length)) {
    const before = state.logs.get(id);
    refreshLogs(id, false).then(() => { if (state.logs.get(id) !== before && state.route.id === id) renderView(); });
  }
  return page(
    h('div', { id: 'job-head', dataset: { state: word } },
      h('div', { class: 'page-head' },
        h('div', {}, h('h1', {}, summary.name, ' ', stateBadge(word)), reason ? h('p', { class: 'error', id: 'job-reason' }, reason) : null),
        h('div', { class: 'actions' }, word === 'Active' ? cancelButton(summary) : null)),
      h('dl', { class: 'meta' },
        meta('Job', h('span', { class: 'mono', id: 'job-id' }, summary.id)),
        meta('Submitted', `${fmtTime(view.spec.submitted_at)} by `, peerLabel(summary.submitter)),
        meta('Coordinator', summary.coordinator ? peerLabel(summary.coordinator[1]) : '—'),
        meta('Scene', `${view.spec.blend_path} · ${engineName(view.spec.engine)} · Blender ${view.spec.blender || 'any'}`),
        meta('Frames', `${fmtFrames(view.spec.frames)} × ${fmtNumber(view.spec.samples)} samples, split by ${previewable(view) ? 'samples' : 'frames'}`),
        summary.inexact ? meta('Note', 'Some slices were cut at other sample counts: the merge is statistically, not bit-for-bit, equal to a single render.') : null)),
    h('div', { class: 'job-grid' },
      h('div', { class: 'card', id: 'job-progress-card' },
        h('h2', {}, 'Progress'),
        progress,
        h('div', { class: 'kpis compact' },
          kpi('ETA', word === 'Active' ? (eta === null ? 'measuring…' : fmtDuration(eta)) : '—', 'job-eta'),
          kpi('Render time per sample', summary.ms_per_unit ? `${fmtNumber(summary.ms_per_unit, 2)} ms` : '—', 'job-ms-per-unit'),
          kpi('Slices done', `${inCover.filter((t) => t.state && t.state.Done).length} / ${inCover.length}`, 'job-tasks-done')),
        h('div', { class: 'frames', id: 'job-frames' }, view.frames.map((f) =>
          h('div', { class: 'frame-row', dataset: { frame: String(f.frame), key: `frame-${f.frame}` } },
            h('span', { class: 'frame-label' }, `Frame ${f.frame}`),
            bar(f.samples_done, f.samples, 'frame-bar', `${fmtNumber(f.samples_done)} / ${fmtNumber(f.samples)} samples`))))),
      h('div', { class: 'card', id: 'preview-card' },
        h('div', { class: 'card-head' }, h('h2', {}, 'Live preview'), previewControls(view)),
        previewable(view) ? previewBox() : h('p', { class: 'muted', id: 'preview-none' }, 'This job renders whole frames: each frame is in the output folder when it is done.'))),
    h('div', { class: 'card', id: 'job-stats' }, ...statsSection(view)),
    h('div', { class: 'card', id: 'job-tasks' }, h('h2', {}, 'Tasks'), tasksTable(view)));
}

function meta(label, ...value) {
  return h('div', { class: 'meta-item' }, h('dt', {}, label), h('dd', {}, ...value));
}

// The preview ---------------------------------------------------------------------------------

/** Whether the job's frames are cut into sample slices, which have a merged preview (the
 * daemon's `JobSpec::splits_samples`). */
function previewable(view) {
  if (!view || view.spec.engine !== 'Cycles') return false;
  if (view.spec.split === 'Samples') return true;
  return view.spec.split === 'Auto' && view.spec.frames.length === 1;
}

/** `Cycles`, `Eevee`, or another engine's identifier (`{"Other": "…"}` in the job's spec). */
function engineName(engine) {
  if (engine && typeof engine === 'object') return Object.values(engine)[0] || 'another engine';
  return String(engine);
}

function previewControls(view) {
  if (!previewable(view)) return h('div', { id: 'preview-controls' });
  const p = state.preview;
  if (p.frame === null || !view.frames.some((f) => f.frame === p.frame)) {
    const started = view.frames.find((f) => f.samples_done > 0 && f.samples_done < f.samples) || view.frames.find((f) => f.samples_done > 0);
    p.frame = (started || view.frames[0]).frame;
  }
  if (view.frames.length < 2) return h('div', { id: 'preview-controls' }, h('span', { class: 'small muted' }, `Frame ${p.frame}`));
  return h('div', { id: 'preview-controls' },
    h('select', { id: 'preview-frame', 'aria-label': 'Frame to preview' },
      view.frames.map((f) => h('option', { value: f.frame, selected: f.frame === p.frame }, `Frame ${f.frame} (${fmtPercent(f.samples_done, f.samples)})`))));
}

/** What the preview of the frame shows: its slices with a result. A new one → a new preview. */
function previewSignature(view, frame) {
  return view.tasks
    .filter((t) => t.in_cover && t.task.kind !== 'merge' && t.task.frame_start === frame && ((t.state && t.state.Done) || (t.results || []).length))
    .map((t) => taskKey(t.task))
    .sort()
    .join(',');
}

function schedulePreview(force) {
  const p = state.preview;
  if (state.route.page !== 'job' || p.job !== state.route.id) return;
  const view = state.views.get(p.job);
  if (!previewable(view) || p.frame === null) return;
  const signature = previewSignature(view, p.frame);
  if (!force && signature === p.signature) return;
  if (p.timer) return;
  const wait = Math.max(0, p.at + PREVIEW_MIN_INTERVAL_MS - performance.now());
  p.timer = setTimeout(() => {
    p.timer = null;
    loadPreview(signature);
  }, wait);
}

async function loadPreview(signature) {
  const p = state.preview;
  const job = p.job;
  const frame = p.frame;
  p.at = performance.now();
  const current = () => state.preview === p && p.frame === frame && $('#preview');
  try {
    const res = await api(`/v1/jobs/${encodeURIComponent(job)}/preview?frame=${frame}&size=${PREVIEW_SIZE}`, { headers: { Accept: 'image/png' } });
    const bytes = new Uint8Array(await res.arrayBuffer());
    if (!current()) return;
    p.signature = signature;
    const digest = fnv1a(bytes);
    if (digest !== p.digest) {
      const url = URL.createObjectURL(new Blob([bytes], { type: 'image/png' }));
      const img = $('#preview');
      img.src = url;
      // Marked as shown (data-digest) only once decoded, so the old image is never the one on
      // screen under the new digest.
      await img.decode().catch(() => {});
      if (p.url) URL.revokeObjectURL(p.url);
      p.url = url;
      p.digest = digest;
      p.updates += 1;
      img.hidden = false;
      img.alt = `Merged preview of frame ${frame}`;
      img.dataset.frame = String(frame);
      img.dataset.digest = digest;
      img.dataset.updates = String(p.updates);
      $('#preview-empty').hidden = true;
    }
    const slices = signature ? signature.split(',').length : 0;
    $('#preview-status').textContent = `Frame ${frame}: merged from ${slices} slice${slices === 1 ? '' : 's'} · updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (!current()) return;
    if (e.status === 404 || e.status === 409) {
      p.signature = signature;
      $('#preview').hidden = true;
      $('#preview-empty').hidden = false;
      $('#preview-empty').textContent = e.message || 'No slice of this frame has landed yet.';
      p.digest = null;
    } else {
      $('#preview-status').textContent = `Preview unavailable: ${e.message}`;
    }
  }
  // Slices that landed while this one loaded.
  const view = state.views.get(job);
  if (state.preview === p && view && previewSignature(view, frame) !== p.signature) schedulePreview(false);
}

/** FNV-1a (32 bits) of the preview's bytes: tells a changed image from the same one. */
function fnv1a(bytes) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) {
    hash ^= bytes[i];
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash.toString(16).padStart(8, '0');
}

// Tasks ---------------------------------------------------------------------------------------

/** The report of the run whose result the job kept, else the latest one. */
function keptReport(t) {
  const reports = t.reports || [];
  if (!reports.length) return null;
  const done = t.state && t.state.Done;
  return (done && reports.find((r) => r.result === done.result)) || reports[reports.length - 1];
}

function tasksTable(view) {
  const logs = state.logs.get(view.summary.id) || [];
  const logByTask = new Map(logs.map((l) => [l.task, l.log]));
  const tasks = [...view.tasks].sort((a, b) =>
    (a.task.frame_start - b.task.frame_start) || ((a.task.kind === 'merge') - (b.task.kind === 'merge')) || (a.task.sample_offset - b.task.sample_offset));
  const hasStats = tasks.some((t) => t.reports);
  const rows = [];
  for (const t of tasks) {
    const key = taskKey(t.task);
    const st = taskState(t);
    const report = keptReport(t);
    const stats = (report && report.stats) || {};
    const peer = (report && report.worker) || st.peer;
    const failures = t.failures || [];
    const retries = Number.isFinite(t.retries) ? t.retries : failures.length;
    const log = logByTask.get(key);
    const phase = (k) => h('td', { class: 'num', dataset: { field: k } }, stats[k] === undefined ? h('span', { class: 'muted' }, '—') : fmtDuration(stats[k]));
    rows.push(h('tr', { dataset: { task: key, kind: t.task.kind, state: st.word }, class: t.in_cover ? '' : 'orphan' },
      h('td', {}, taskLabel(t.task, previewable(view)), t.in_cover ? null : h('div', { class: 'small muted' }, 'superseded')),
      h('td', {}, st.word),
      h('td', {}, peer ? peerLabel(peer, false) : h('span', { class: 'muted' }, '—')),
      h('td', { class: 'num' }, t.task.kind === 'merge' ? '—' : fmtNumber(stats.samples !== undefined ? stats.samples : t.task.samples * t.task.frame_count)),
      phase('wait_ms'), phase('fetch_ms'), phase('blender_start_ms'), phase('render_ms'), phase('upload_ms'), phase('merge_ms'),
      h('td', { class: 'num', dataset: { field: 'peak_memory_bytes' } }, stats.peak_memory_bytes ? fmtBytes(stats.peak_memory_bytes) : h('span', { class: 'muted' }, '—')),
      h('td', { class: 'num', dataset: { field: 'retries' } }, String(retries)),
      h('td', { class: 'failures' },
        failures.length ? failures.map(([worker, why]) => h('div', { class: 'failure' }, h('strong', {}, peerName(worker)), `: ${why}`)) : h('span', { class: 'muted' }, 'none'),
        log ? logToggle(key, log) : null)));
  }
  return h('div', { class: 'table-wrap' },
    hasStats ? null : h('p', { class: 'small muted' }, 'This node reports no per-task timings for this job.'),
    h('p', { class: 'small muted table-note' }, 'Start: Blender start and scene load (0 when a loaded Blender was reused). ✱ this node.'),
    h('table', { class: 'data tasks', id: 'tasks' },
      h('thead', {}, h('tr', {},
        h('th', {}, 'Task'), h('th', {}, 'State'), h('th', {}, 'Peer'), h('th', { class: 'num' }, 'Samples'),
        h('th', { class: 'num', title: 'Queue wait: the lease held before the task started' }, 'Wait'), h('th', { class: 'num', title: 'Fetching the inputs' }, 'Fetch'),
        h('th', { class: 'num', title: 'Starting Blender and loading the scene' }, 'Start'),
        h('th', { class: 'num' }, 'Render'), h('th', { class: 'num', title: 'Storing and announcing the outputs' }, 'Upload'), h('th', { class: 'num' }, 'Merge'),
        h('th', { class: 'num', title: "Blender's peak memory" }, 'Memory'),
        h('th', { class: 'num' }, 'Retries'), h('th', {}, 'Failures, log'))),
      h('tbody', {}, rows)));
}

function logToggle(key, log) {
  const details = h('details', { class: 'log', open: state.openLogs.has(key), dataset: { task: key } },
    h('summary', {}, 'Log'),
    h('pre', {}, log));
  details.addEventListener('toggle', () => {
    if (details.open) state.openLogs.add(key);
    else state.openLogs.delete(key);
  });
  return details;
}

// Statistics ----------------------------------------------------------------------------------

function statsSection(view) {
  const stats = view.stats;
  const { word } = jobStatus(view.summary);
  const title = h('h2', {}, 'Where the time went');
  if (!stats) {
    return [title, h('p', { class: 'muted' }, word === 'Active' ? 'Shown when the job is finished.' : 'This node reports no statistics for this job.')];
  }
  const phases = stats.phases || {};
  const total = PHASES.reduce((n, [k]) => n + (phases[k] || 0), 0);
  const peers = [...(stats.peers || [])].sort((a, b) => (b.render_ms || 0) - (a.render_ms || 0));
  const cost = Number.isFinite(stats.cost) ? fmtMoney(stats.cost) : '—';
  const unpriced = stats.unpriced_peers ? (Array.isArray(stats.unpriced_peers) ? stats.unpriced_peers.length : stats.unpriced_peers) : 0;
  return [
    title,
    h('div', { class: 'kpis compact' },
      kpi('Whole job', fmtDuration(stats.wall_ms), 'job-wall'),
      kpi('Render time, all peers', fmtDuration(stats.render_ms), 'job-render'),
      kpi('Cost', cost, 'job-cost'),
      kpi('Peers', `${peers.length}`, 'job-peers')),
    unpriced ? h('p', { class: 'small muted' }, `${unpriced} peer${unpriced === 1 ? '' : 's'} without a price (own machines) counted at no cost.`) : null,
    word === 'Active' ? h('p', { class: 'small muted' }, 'So far; the job is still running.') : null,
    h('h3', {}, 'Task time by phase, summed over tasks'),
    total > 0 ? phaseChart(phases, total) : h('p', { class: 'muted' }, 'No task time measured.'),
    h('h3', {}, 'Render time per peer'),
    peers.length ? peerChart(peers) : h('p', { class: 'muted' }, 'No peer rendered.'),
  ];
}

/** Fill patterns, so the charts read without color (and in print); one per phase. */
const PATTERNS = [null, 'M0,8 L8,0', 'M0,0 L8,8', null, 'M4,0 L4,8', 'M0,4 L8,4'];

function patternDefs(prefix) {
  const defs = svg('defs', {});
  PATTERNS.forEach((d, i) => {
    if (!d) return;
    defs.append(svg('pattern', { id: `${prefix}-${i}`, width: 8, height: 8, patternUnits: 'userSpaceOnUse' },
      svg('path', { d, stroke: 'rgba(0,0,0,0.45)', 'stroke-width': 1.4 })));
  });
  return defs;
}

/** A colored, patterned rectangle; lengths may be percentages of the chart. */
function patternRect(prefix, i, x, y, width, height) {
  return [
    svg('rect', { x, y, width, height, class: `fill-${i}` }),
    PATTERNS[i] ? svg('rect', { x, y, width, height, fill: `url(#${prefix}-${i})` }) : null,
  ];
}

/** The phase totals as one stacked bar (widths in percent, so text keeps its size), with a
 * legend that gives every value in text. */
function phaseChart(phases, total) {
  const height = 40;
  const chart = svg('svg', { id: 'time-chart', class: 'chart', width: '100%', height, role: 'img', 'aria-label': 'Task time by phase' }, patternDefs('pat'));
  let x = 0;
  PHASES.forEach(([key, label], i) => {
    const ms = phases[key] || 0;
    if (!ms) return;
    const w = (100 * ms) / total;
    const text = `${label} ${fmtPercent(ms, total)}`;
    chart.append(svg('g', { class: 'phase', dataset: { phase: key } },
      svg('title', {}, `${label}: ${fmtDuration(ms)} (${fmtPercent(ms, total)})`),
      patternRect('pat', i, `${x}%`, 0, `${w}%`, height),
      // A label only where it fits (about 7 px a character in a chart about 1100 px wide).
      w * 11 > text.length * 7 + 14 ? svg('text', { x: `${x + w / 2}%`, y: height / 2 + 4, class: 'seg-label', 'text-anchor': 'middle' }, text) : null));
    x += w;
  });
  const legend = h('table', { class: 'legend', id: 'time-legend' },
    h('tbody', {}, PHASES.map(([key, label], i) => h('tr', { dataset: { phase: key } },
      h('td', {}, swatch(i)), h('td', {}, label),
      h('td', { class: 'num' }, fmtDuration(phases[key] || 0)),
      h('td', { class: 'num' }, fmtPercent(phases[key] || 0, total))))));
  return h('div', { class: 'chart-block' }, chart, legend);
}

function swatch(i) {
  return svg('svg', { class: 'swatch', viewBox: '0 0 16 16', width: 16, height: 16, 'aria-hidden': 'true' },
    patternDefs(`sw${i}`), patternRect(`sw${i}`, i, 0, 0, 16, 16));
}

/** Each peer's render time as a bar, with its tasks, samples per second and price in text. */
function peerChart(peers) {
  const max = Math.max(1, ...peers.map((p) => p.render_ms || 0));
  return h('table', { class: 'peer-chart', id: 'peer-chart' },
    h('tbody', {}, peers.map((p) => {
      const w = Math.max(0.5, (100 * (p.render_ms || 0)) / max);
      const facts = [
        `${p.tasks} task${p.tasks === 1 ? '' : 's'}`,
        Number.isFinite(p.samples_per_second) ? `${fmtNumber(p.samples_per_second, 1)} samples/s` : null,
        Number.isFinite(p.price_per_hour) ? `${fmtMoney(p.price_per_hour)}/h` : 'own machine',
      ].filter(Boolean).join(' · ');
      return h('tr', { class: 'peer-bar', dataset: { peerId: p.peer } },
        h('td', { class: 'peer-ref' }, peerName(p.peer)),
        h('td', { class: 'bar-cell' },
          svg('svg', { width: '100%', height: 18, role: 'img', 'aria-label': `${peerName(p.peer)}: ${fmtDuration(p.render_ms)}` },
            svg('rect', { x: 0, y: 2, width: `${w}%`, height: 14, rx: 2, class: 'fill-3' }))),
        h('td', { class: 'num' }, fmtDuration(p.render_ms)),
        h('td', { class: 'small muted' }, facts));
    })));
}

// ---------------------------------------------------------------------------------------------
// Cloud

function cloudPage() {
  const head = h('div', { class: 'page-head' }, h('h1', {}, 'Cloud'));
  if (state.cloud === undefined && !state.cloudError) return h('section', { class: 'page', id: 'cloud' }, head, h('p', { class: 'muted' }, 'Loading…'));
  if (state.cloudError) return h('section', { class: 'page', id: 'cloud' }, head, h('p', { class: 'error' }, `Cannot read the cloud instances: ${state.cloudError}`));
  if (state.cloud === null) {
    return h('section', { class: 'page', id: 'cloud', dataset: { provisioner: 'none' } }, head,
      h('div', { class: 'card empty', id: 'no-provisioner' },
        h('h2', {}, 'No provisioner on this node'),
        h('p', {}, 'This node does not start cloud instances. A node with cloud credentials and a `[cloud]` table in its blendnet.toml starts spot instances when the mesh has more work than machines; its page lists them here with their cost.')));
  }
  const cloud = state.cloud;
  const instances = cloud.instances || [];
  const now = Date.now() / 1000;
  const running = instances.filter((i) => !/terminat|stopp/i.test(i.state || '')).length;
  return h('section', { class: 'page', id: 'cloud', dataset: { provisioner: cloud.provider || '' } }, head,
    h('div', { class: 'kpis' },
      kpi('Provider', cloud.provider || '—', 'cloud-provider'),
      kpi('Instances running', `${running}`, 'cloud-running'),
      kpi('Spent so far', fmtMoney(cloud.cost_so_far), 'cloud-cost')),
    h('div', { class: 'table-wrap' },
      h('table', { class: 'data', id: 'instances' },
        h('thead', {}, h('tr', {},
          h('th', {}, 'Instance'), h('th', {}, 'Type'), h('th', {}, 'Zone'), h('th', {}, 'State'), h('th', {}, 'Peer'),
          h('th', { class: 'num' }, 'Uptime'), h('th', { class: 'num' }, 'Price'), h('th', { class: 'num' }, 'Cost so far'))),
        h('tbody', {}, instances.length ? instances.map((i) => h('tr', { dataset: { instanceId: i.id } },
          h('td', { class: 'mono' }, i.id),
          h('td', {}, i.instance_type || '—'),
          h('td', {}, i.zone || '—'),
          h('td', {}, i.state || '—', i.idle_since ? h('div', { class: 'small muted' }, `idle for ${fmtDuration((now - i.idle_since) * 1000)}`) : null),
          h('td', {}, i.peer ? peerLabel(i.peer) : h('span', { class: 'muted' }, 'not joined yet')),
          h('td', { class: 'num' }, i.launched_at ? fmtDuration((now - i.launched_at) * 1000) : '—'),
          h('td', { class: 'num' }, Number.isFinite(i.per_hour) ? `${fmtMoney(i.per_hour)}/h` : '—'),
          h('td', { class: 'num' }, fmtMoney(i.cost_so_far)))) : h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No instances running: the provisioner starts them when jobs wait for machines.'))),
        h('tfoot', {}, h('tr', {}, h('td', { colspan: 7 }, 'Total'), h('td', { class: 'num', id: 'cloud-total' }, fmtMoney(cloud.cost_so_far)))))));
}

// ---------------------------------------------------------------------------------------------
// Start

async function start() {
  listen();
  window.addEventListener('hashchange', onRoute);
  if (!location.hash) history.replaceState(null, '', '#/mesh');
  await refreshSelf();
  await Promise.all([refreshPeers(), refreshJobs()]);
  onRoute();
  connectEvents();
  setInterval(() => {
    refreshPeers();
    refreshJobs();
    if (state.route.page === 'cloud') refreshCloud();
    if (state.route.page === 'job') schedulePreview(false);
  }, POLL_MS);
}

start();
