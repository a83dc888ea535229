// Status: swapper itself, GPU and RAM samples and the memory ledger (/v1/status), and the planner
// in use with its groups, matrix or memory settings (/api/routing).

import { bytes, getJSON, h, seconds, table } from './core.js';

function section(title, ...content) {
  return h('section', { class: 'panel' }, h('h2', null, title), ...content);
}

function planner(routing) {
  const parts = [h('p', null, 'Planner in use: ', h('strong', { id: 'planner-use' }, routing.use))];
  if (routing.groups) {
    parts.push(table(['Group', 'Members', 'Swap', 'Exclusive', 'Persistent'], routing.groups.map((g) =>
      h('tr', null, h('td', null, g.name), h('td', null, g.members.join(', ')), h('td', null, g.swap ? 'yes' : 'no'),
        h('td', null, g.exclusive ? 'yes' : 'no'), h('td', null, g.persistent ? 'yes' : 'no')))));
  }
  if (routing.matrix) {
    const m = routing.matrix;
    parts.push(table(['Set', 'Rule'], m.sets.map((s) => h('tr', null, h('td', null, s.name), h('td', null, h('code', null, s.dsl))))));
    const vars = Object.entries(m.vars);
    if (vars.length) parts.push(h('p', null, 'Variables: ', vars.map(([k, v]) => `${k} = ${v}`).join(', ')));
    const costs = Object.entries(m.evict_costs);
    if (costs.length) parts.push(h('p', null, 'Eviction costs: ', costs.map(([k, v]) => `${k}: ${v}`).join(', ')));
  }
  if (routing.memory) {
    const m = routing.memory;
    parts.push(h('p', null, `GPU budget ${m.gpu_budget === null ? 'the device total' : bytes(m.gpu_budget)}, `
      + `RAM budget ${m.ram_budget === null ? 'the system total' : bytes(m.ram_budget)}, reserve ${bytes(m.reserve)}, `
      + `release timeout ${m.release_timeout} s`));
  }
  return section('Planner', ...parts);
}

function ledger(memory) {
  if (!memory) return null;
  // RAM, then each GPU on its own (the planner plans them apart; the pooled "gpu" row is a sum).
  const rows = [
    ...Object.entries(memory.devices).filter(([name]) => name === 'ram' || !memory.gpus?.length)
      .map(([name, d]) => [name, { ...d, models: null }]),
    ...(memory.gpus || []).map((g) => [`GPU ${g.index}`, { ...g, reserve: g.reserved }]),
  ];
  const devices = rows.map(([name, d]) => h('tr', null,
    h('td', null, name), h('td', { class: 'num' }, bytes(d.total)), h('td', { class: 'num' }, bytes(d.used)),
    h('td', { class: 'num' }, bytes(d.free)), h('td', { class: 'num' }, bytes(d.budget)),
    h('td', { class: 'num' }, bytes(d.reserve)), h('td', { class: 'num' }, bytes(d.usable)),
    h('td', null, d.models ? Object.keys(d.models).join(', ') || '—' : '')));
  const models = Object.entries(memory.models).map(([id, m]) => h('tr', null,
    h('td', null, id), h('td', null, m.gpus ? `gpu ${m.gpus.join('+')}` : m.device), h('td', { class: 'num' }, bytes(m.footprint)), h('td', null, m.source),
    h('td', { class: 'num' }, bytes(m.estimate)), h('td', { class: 'num' }, bytes(m.used))));
  return section('Memory ledger',
    memory.nvml ? null : h('p', { class: 'muted' }, `No GPU measured: ${memory.nvml_unavailable_reason || 'NVML unavailable'}`),
    table(['Device', 'Total', 'Used', 'Free', 'Budget', 'Reserve', 'Usable', 'Models'], devices),
    table(['Model', 'Device', 'Footprint', 'Source', 'Estimate', 'In use'], models));
}

export function mount(root) {
  const body = h('div', { id: 'status' });
  const message = h('p', { class: 'message', role: 'status' });

  async function refresh() {
    try {
      const [status, routing] = await Promise.all([getJSON('/v1/status'), getJSON('/api/routing')]);
      const me = status.swapper;
      body.replaceChildren(
        section('swapper', h('p', null, `version ${me.version} · pid ${me.pid} · up ${seconds(me.uptimeSeconds)} · RSS ${bytes(me.rssBytes)}`)),
        section('GPUs', status.gpus.length
          ? table(['#', 'Name', 'Used', 'Free', 'Reserved', 'Total'], status.gpus.map((g) => h('tr', null,
            h('td', null, g.index), h('td', null, g.name), h('td', { class: 'num' }, bytes(g.usedBytes)),
            h('td', { class: 'num' }, bytes(g.freeBytes)), h('td', { class: 'num' }, bytes(g.reservedBytes)),
            h('td', { class: 'num' }, bytes(g.totalBytes)))))
          : h('p', { class: 'muted' }, 'No GPU seen (NVML found none).')),
        section('Models', table(['Model', 'State', 'pid', 'RSS', 'VRAM', 'Requests', 'Starts', 'Last load', 'Last error'],
          status.models.map((m) => h('tr', null,
            h('td', null, m.id), h('td', null, h('span', { class: `badge ${m.state}` }, m.state)), h('td', null, m.pid ?? '—'),
            h('td', { class: 'num' }, bytes(m.rssBytes)), h('td', { class: 'num' }, bytes(m.vramBytes)),
            h('td', { class: 'num' }, m.requestsTotal), h('td', { class: 'num' }, m.starts),
            h('td', { class: 'num' }, seconds(m.lastLoadSeconds)), h('td', { class: 'error' }, m.lastError?.message || ''))))),
        ...[ledger(status.memory)].filter(Boolean),
        planner(routing));
      message.textContent = '';
    } catch (err) {
      message.textContent = `status: ${err.message}`;
    }
  }

  root.append(h('div', { class: 'toolbar' }, h('h1', null, 'Status')), message, body);
  refresh();
  const timer = setInterval(refresh, 3000);
  return () => clearInterval(timer);
}
