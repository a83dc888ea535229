// swapper's web UI: pages chosen by the URL's hash, live data from /api/events.
// Plain ES modules, no build step: each page module exports mount(root) -> unmount().

import { runEvents } from './core.js';
import * as models from './models.js';
import * as logs from './logs.js';
import * as activity from './activity.js';
import * as playground from './playground.js';
import * as status from './status.js';

const pages = { models, logs, activity, playground, status };
let unmount = null;

function show() {
  const name = location.hash.replace(/^#\/?/, '').split('/')[0] || 'models';
  const page = pages[name] || models;
  if (unmount) unmount();
  const root = document.getElementById('page');
  root.replaceChildren();
  root.dataset.page = name in pages ? name : 'models';
  for (const link of document.querySelectorAll('nav a')) {
    link.classList.toggle('active', link.dataset.page === root.dataset.page);
  }
  document.title = `swapper · ${root.dataset.page}`;
  unmount = page.mount(root);
}

window.addEventListener('hashchange', show);
show();
runEvents();
