// Models: every model with its state (live from /api/events), its process figures (/v1/status,
// refreshed while the page is open), and Load / Unload / Unload all.

import { bytes, count, errorText, getJSON, h, postJSON, seconds, store, subscribe } from './core.js';

export function mount(root) {
  const grid = h('div', { class: 'cards', id: 'models' });
  const message = h('p', { class: 'message', role: 'status' });
  const pending = new Set(); // model ids with a load or unload under way
  let status = {};
  let memory = null;

  async function act(label, path, id) {
    message.textContent = '';
    if (id) pending.add(id);
    render();
    try {
      const resp = await postJSON(path);
      if (!resp.ok) message.textContent = `${label} failed: ${await errorText(resp)}`;
    } catch (err) {
      message.textContent = `${label} failed: ${err.message}`;
    } finally {
      if (id) pending.delete(id);
      render();
      refresh();
    }
  }

  const unloadAll = h('button', { id: 'unload-all', onclick: () => act('Unload all', '/api/models/unload') }, 'Unload all');

  function footprint(id) {
    const s = status[id];
    if (s && s.rssBytes !== null && s.rssBytes !== undefined) {
      const vram = s.vramBytes ? ` · VRAM ${bytes(s.vramBytes)}` : '';
      return `RSS ${bytes(s.rssBytes)}${vram} (measured)`;
    }
    const planned = memory?.models?.[id];
    if (planned) return `${bytes(planned.footprint)} (${planned.source === 'measured' ? 'last measured' : `estimated: ${planned.source}`})`;
    return '—';
  }

  // A service swapper does not run: pinned (never stopped) or swappable, and its last probe.
  function serviceText(svc) {
    const kind = svc.pinned ? 'external, pinned' : 'external, swappable';
    const health = svc.healthy === null ? 'not probed yet' : svc.healthy ? 'healthy' : `down: ${svc.lastProbeError}`;
    return `${kind} · ${health}`;
  }

  function card(model) {
    const s = status[model.id] || {};
    const state = model.state;
    const busy = pending.has(model.id);
    const uptime = state === 'stopped' ? '—' : seconds(s.uptimeSeconds);
    return h('article', { class: `card state-${state}`, 'data-model': model.id },
      h('header', null,
        h('h2', null, model.id),
        h('span', { class: `badge ${state}`, 'data-role': 'state' }, state)),
      model.name ? h('p', { class: 'name' }, model.name) : null,
      model.description ? h('p', { class: 'desc' }, model.description) : null,
      h('dl', null,
        h('dt', null, 'pid'), h('dd', { 'data-role': 'pid' }, s.pid ?? '—'),
        h('dt', null, 'uptime'), h('dd', null, uptime),
        h('dt', null, 'in flight'), h('dd', { 'data-role': 'inflight' }, count(s.inFlight)),
        h('dt', null, 'queued'), h('dd', null, count(s.queued)),
        h('dt', null, 'memory'), h('dd', null, footprint(model.id)),
        h('dt', null, 'aliases'), h('dd', null, model.aliases?.length ? model.aliases.join(', ') : '—'),
        s.service ? [h('dt', null, 'service'), h('dd', { 'data-role': 'service' }, serviceText(s.service))] : null,
        s.lastError ? [h('dt', null, 'last error'), h('dd', { class: 'error' }, s.lastError.message)] : null),
      h('div', { class: 'actions' },
        h('button', {
          class: 'load',
          disabled: busy || state === 'ready' || state === 'starting',
          onclick: () => act(`Load ${model.id}`, `/api/models/load/${encodeURIComponent(model.id)}`, model.id),
        }, busy && state !== 'ready' ? 'Loading…' : 'Load'),
        h('button', {
          class: 'unload',
          disabled: busy || state === 'stopped' || Boolean(s.service?.pinned),  // never stopped
          onclick: () => act(`Unload ${model.id}`, `/api/models/unload/${encodeURIComponent(model.id)}`, model.id),
        }, 'Unload')));
  }

  function render() {
    // Peer models (modelStatus lists them with a peerID) run elsewhere: nothing to load or unload here.
    grid.replaceChildren(...store.models.filter((m) => !m.peerID).map(card));
    if (!store.models.length) grid.append(h('p', { class: 'muted' }, 'Waiting for the model list…'));
  }

  let inFlight = false;
  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const body = await getJSON('/v1/status');
      status = Object.fromEntries(body.models.map((m) => [m.id, m]));
      memory = body.memory;
      render();
    } catch (err) {
      message.textContent = `status: ${err.message}`;
    } finally {
      inFlight = false;
    }
  }

  root.append(h('div', { class: 'toolbar' }, h('h1', null, 'Models'), unloadAll), message, grid);
  render();
  refresh();
  const off = subscribe((kind) => {
    if (kind === 'modelStatus') { render(); refresh(); }
  });
  const timer = setInterval(refresh, 2000);
  return () => { off(); clearInterval(timer); };
}
