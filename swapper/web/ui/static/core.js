// What every page shares: API calls with the key, streams read with fetch, the live event store,
// and small DOM and formatting helpers.

const KEY = 'swapper.apiKey';
let keyPrompt = null;

function askKey(why) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      const dialog = document.getElementById('key-dialog');
      const input = dialog.querySelector('input');
      dialog.querySelector('.why').textContent = why;
      input.value = '';
      dialog.addEventListener('close', () => {
        if (dialog.returnValue === 'ok' && input.value.trim()) localStorage.setItem(KEY, input.value.trim());
        keyPrompt = null;
        resolve();
      }, { once: true });
      dialog.showModal();
    });
  }
  return keyPrompt;
}

// fetch() with the stored API key; asks for a key (once, whoever asks) when swapper answers 401.
export async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    headers.set('X-Requested-With', 'XMLHttpRequest'); // a 401 without a login prompt (see auth.py)
    const key = localStorage.getItem(KEY);
    if (key) headers.set('Authorization', `Bearer ${key}`);
    const resp = await fetch(path, { ...options, headers });
    if (resp.status !== 401) return resp;
    await askKey(key ? 'That key was refused: enter another.' : 'This swapper needs an API key.');
  }
}

export async function errorText(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    return body?.error?.message || text;
  } catch {
    return text || `${resp.status} ${resp.statusText}`;
  }
}

export async function getJSON(path) {
  const resp = await api(path);
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

export async function postJSON(path, body) {
  const options = { method: 'POST' };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { 'Content-Type': 'application/json' };
  }
  return api(path, options);
}

// Reads a streamed answer as text, calling onText with each piece as it arrives.
export async function readStream(path, onText, options = {}) {
  const resp = await api(path, options);
  if (!resp.ok) throw new Error(await errorText(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(decoder.decode(value, { stream: true }));
  }
}

// Splits SSE text into the data of each event, across pieces: feed(text) calls onData(data).
export function sseParser(onData) {
  let buffer = '';
  return (text) => {
    buffer += text.replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart());
      if (data.length) onData(data.join('\n'));
    }
  };
}

// ---- the live store, fed by /api/events ----

export const store = { models: [], inflight: new Map(), connected: false };
const listeners = new Set();

export function subscribe(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

function emit(kind, data) {
  for (const listener of listeners) listener(kind, data);
}

function onEvent(text) {
  const envelope = JSON.parse(text);
  const data = JSON.parse(envelope.data);
  if (envelope.type === 'modelStatus') {
    store.models = data;
  } else if (envelope.type === 'inflight') {
    if (data.operation === 'snapshot') {
      store.inflight = new Map(data.requests.map((r) => [r.id, r]));
    } else if (data.operation === 'upsert') {
      store.inflight.set(data.request.id, data.request);
    } else if (data.operation === 'remove') {
      store.inflight.delete(data.id);
    }
  }
  emit(envelope.type, data);
}

function setConnected(connected) {
  if (store.connected === connected) return;
  store.connected = connected;
  const dot = document.getElementById('conn');
  dot.textContent = connected ? 'live' : 'reconnecting';
  dot.className = connected ? 'conn live' : 'conn';
  dot.title = connected ? 'live updates: connected' : 'live updates: reconnecting';
  emit('connection', connected);
}

export async function runEvents() {
  let delay = 500;
  for (;;) {
    const feed = sseParser(onEvent);
    try {
      await readStream('/api/events', (text) => {
        setConnected(true);
        delay = 500;
        feed(text);
      });
    } catch (err) {
      console.warn('event stream:', err);
    }
    setConnected(false);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 5000);
  }
}

// ---- DOM and formatting ----

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'class') el.className = value;
    else if (name === 'value') el.value = value;
    else el.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// A table; each cell is labelled with its column's header, which narrow screens show beside it.
export function table(headers, rows, attrs = {}) {
  const numeric = new Set();
  for (const row of rows) {
    [...row.children].forEach((cell, i) => {
      cell.dataset.label = headers[i] || '';
      if (cell.classList.contains('num')) numeric.add(i);
    });
  }
  return h('div', { class: 'scroll' },
    h('table', attrs,
      h('thead', null, h('tr', null, headers.map((t, i) => h('th', { class: numeric.has(i) ? 'num' : null }, t)))),
      h('tbody', null, rows)));
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function seconds(s) {
  if (s === null || s === undefined) return '—';
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function ms(value) {
  if (value === null || value === undefined || value < 0) return '—';
  return value < 10 ? `${value.toFixed(1)} ms` : value < 10000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(1)} s`;
}

export function count(n) {
  return n === null || n === undefined || n < 0 ? '—' : String(n);
}

export function rate(n) {
  return n === null || n === undefined || n < 0 ? '—' : n.toFixed(1);
}

// Fills a model <select>, keeping its choice; the first model that ``prefer`` likes is the default.
export function modelOptions(select, prefer = () => true) {
  const current = select.value;
  select.replaceChildren(...store.models.map((m) => h('option', { value: m.id }, m.name ? `${m.id} — ${m.name}` : m.id)));
  if ([...select.options].some((o) => o.value === current)) select.value = current;
  else select.value = (store.models.find(prefer) || store.models[0] || {}).id || '';
}
