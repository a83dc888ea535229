// Logs: swapper's own log, every child's, or one model's, live from /logs/stream, with a filter,
// pause (lines keep arriving and show on resume) and follow (stay at the newest line).

import { h, readStream, store, subscribe } from './core.js';

const KEEP = 5000; // lines kept in the page; the oldest go first

export function mount(root) {
  const source = h('select', { id: 'log-source', 'aria-label': 'log source' });
  const filter = h('input', { id: 'log-filter', type: 'search', placeholder: 'filter', 'aria-label': 'filter' });
  const pause = h('input', { id: 'log-pause', type: 'checkbox' });
  const follow = h('input', { id: 'log-follow', type: 'checkbox', checked: true });
  const clear = h('button', { id: 'log-clear' }, 'Clear');
  const view = h('pre', { id: 'log-lines', class: 'log' });
  let lines = [];
  let shown = 0; // lines[0..shown) are in the view (those that match the filter)
  let controller = null;
  let stopped = false;

  function options() {
    const current = source.value;
    const ids = [['', 'all (swapper and models)'], ['swapper', 'swapper'], ['upstream', 'all models'],
      ...store.models.filter((m) => !m.peerID).map((m) => [m.id, `model: ${m.id}`])];
    source.replaceChildren(...ids.map(([value, label]) => h('option', { value }, label)));
    source.value = ids.some(([value]) => value === current) ? current : '';
  }

  function matches(line) {
    const needle = filter.value.trim().toLowerCase();
    return !needle || line.toLowerCase().includes(needle);
  }

  function redraw() {
    view.textContent = lines.filter(matches).map((l) => `${l}\n`).join('');
    shown = lines.length;
    scroll();
  }

  function flush() {
    if (pause.checked) return;
    const fresh = lines.slice(shown).filter(matches);
    shown = lines.length;
    if (fresh.length) view.append(fresh.map((l) => `${l}\n`).join(''));
    scroll();
  }

  function scroll() {
    if (follow.checked) view.scrollTop = view.scrollHeight;
  }

  function add(newLines) {
    lines.push(...newLines);
    if (lines.length > KEEP) {
      lines = lines.slice(-KEEP);
      if (!pause.checked) redraw();
      return;
    }
    flush();
  }

  async function start() {
    if (controller) controller.abort();
    const mine = (controller = new AbortController());
    lines = [];
    redraw();
    const id = source.value;
    const path = id ? `/logs/stream/${id.split('/').map(encodeURIComponent).join('/')}` : '/logs/stream';
    while (!stopped && !mine.signal.aborted) {
      let partial = '';
      try {
        await readStream(path, (text) => {
          const parts = (partial + text).split('\n');
          partial = parts.pop();
          if (parts.length) add(parts);
        }, { signal: mine.signal });
      } catch (err) {
        if (mine.signal.aborted) return;
      }
      // The stream ended (a restart, a reload): start over with the history.
      await new Promise((resolve) => setTimeout(resolve, 1000));
      if (!mine.signal.aborted) { lines = []; redraw(); }
    }
  }

  source.addEventListener('change', start);
  filter.addEventListener('input', redraw);
  pause.addEventListener('change', () => (pause.checked ? null : redraw()));
  follow.addEventListener('change', scroll);
  clear.addEventListener('click', () => { lines = []; redraw(); });

  root.append(
    h('div', { class: 'toolbar' }, h('h1', null, 'Logs'),
      h('div', { class: 'controls' },
        source, filter,
        h('label', null, pause, ' Pause'),
        h('label', null, follow, ' Follow'),
        clear)),
    view);
  options();
  start();
  const off = subscribe((kind) => { if (kind === 'modelStatus') options(); });
  return () => { stopped = true; off(); if (controller) controller.abort(); };
}
