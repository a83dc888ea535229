// Activity: requests in flight (live from /api/events) and the last finished ones (/api/metrics,
// fetched again whenever a request ends), with their timings and token counts.

import { count, getJSON, h, ms, rate, store, subscribe, table } from './core.js';

function decode(b64) {
  const raw = atob(b64 || '');
  return new TextDecoder().decode(Uint8Array.from(raw, (c) => c.charCodeAt(0)));
}

async function showCapture(id) {
  const capture = await getJSON(`/api/captures/${id}`);
  const headers = (obj) => Object.entries(obj).map(([k, v]) => `${k}: ${v}`).join('\n');
  const dialog = h('dialog', { class: 'capture' },
    h('h2', null, `Capture #${id}: ${capture.req_path}`),
    h('h3', null, 'Request'), h('pre', null, headers(capture.req_headers), '\n\n', decode(capture.req_body)),
    h('h3', null, `Response ${capture.resp_status_code}${capture.resp_body_truncated ? ' (body cut: captureBuffer)' : ''}`),
    h('pre', null, headers(capture.resp_headers), '\n\n', decode(capture.resp_body)),
    h('form', { method: 'dialog' }, h('button', null, 'Close')));
  dialog.addEventListener('close', () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

function statusCell(entry) {
  const code = entry.resp_status_code;
  const cls = !code ? 'status bad' : code >= 400 ? 'status bad' : 'status ok';
  return h('td', { class: cls, title: entry.error_msg || null }, code || 'none');
}

function row(entry) {
  const t = entry.tokens;
  return h('tr', { 'data-id': entry.id, 'data-model': entry.model },
    h('td', null, new Date(entry.timestamp).toLocaleTimeString()),
    h('td', null, entry.model),
    h('td', { class: 'path' }, entry.req_path),
    statusCell(entry),
    h('td', { class: 'num' }, ms(entry.queue_wait_ms)),
    h('td', { class: 'num' }, ms(entry.ttfb_ms)),
    h('td', { class: 'num' }, ms(entry.duration_ms)),
    h('td', { class: 'num', 'data-role': 'prompt' }, count(t.input_tokens)),
    h('td', { class: 'num' }, count(t.cache_tokens)),
    h('td', { class: 'num', 'data-role': 'completion' }, count(t.output_tokens)),
    h('td', { class: 'num', 'data-role': 'speed' }, rate(t.tokens_per_second)),
    h('td', null, entry.has_capture ? h('button', { class: 'small', onclick: () => showCapture(entry.id) }, 'view') : ''));
}

export function mount(root) {
  const live = h('div', { id: 'inflight' });
  const done = h('div', { id: 'activity' });
  const message = h('p', { class: 'message', role: 'status' });
  let timer = null;

  function renderLive() {
    const requests = [...store.inflight.values()];
    live.replaceChildren(requests.length
      ? table(['Since', 'Model', 'Path', 'State', 'Waited', 'Elapsed'], requests.map((r) =>
        h('tr', null,
          h('td', null, new Date(r.timestamp).toLocaleTimeString()),
          h('td', null, r.model), h('td', { class: 'path' }, r.req_path), h('td', null, r.state),
          h('td', { class: 'num' }, ms(r.wait_ms)), h('td', { class: 'num' }, ms(r.elapsed_ms)))))
      : h('p', { class: 'muted' }, 'No request in flight.'));
  }

  async function refresh() {
    try {
      const entries = await getJSON('/api/metrics');
      entries.reverse();
      done.replaceChildren(entries.length
        ? table(['Time', 'Model', 'Path', 'Status', 'Queue wait', 'TTFB', 'Duration', 'Prompt', 'Cached',
          'Completion', 'Gen tok/s', ''], entries.map(row), { id: 'activity-table' })
        : h('p', { class: 'muted' }, 'No request yet.'));
      message.textContent = '';
    } catch (err) {
      message.textContent = `activity: ${err.message}`;
    }
  }

  root.append(
    h('div', { class: 'toolbar' }, h('h1', null, 'Activity'), h('button', { onclick: refresh }, 'Refresh')),
    message, h('h2', null, 'In flight'), live, h('h2', null, 'Recent requests'), done);
  renderLive();
  refresh();
  const off = subscribe((kind, data) => {
    if (kind !== 'inflight') return;
    renderLive();
    if (data.operation === 'remove' && !timer) {
      timer = setTimeout(() => { timer = null; refresh(); }, 250);
    }
  });
  return () => { off(); clearTimeout(timer); };
}
