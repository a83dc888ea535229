// Playground: chat (streamed token by token), transcription (an audio upload) and embeddings,
// sent through the same routes any client uses.

import { api, errorText, h, modelOptions, postJSON, sseParser, subscribe } from './core.js';

function chat() {
  const model = h('select', { id: 'chat-model', 'aria-label': 'model' });
  const maxTokens = h('input', { id: 'chat-max-tokens', type: 'number', min: 1, value: 64, 'aria-label': 'max tokens' });
  const prompt = h('textarea', { id: 'chat-prompt', rows: 3, placeholder: 'Say something…', 'aria-label': 'prompt' });
  const send = h('button', { id: 'chat-send', type: 'submit' }, 'Send');
  const stop = h('button', { id: 'chat-stop', type: 'button', disabled: true }, 'Stop');
  const reset = h('button', { type: 'button' }, 'New chat');
  const log = h('div', { id: 'chat-log', class: 'chat' });
  let messages = [];
  let controller = null;

  async function submit(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    messages.push({ role: 'user', content: text });
    log.append(h('div', { class: 'bubble user' }, text));
    const reply = h('div', { class: 'bubble assistant', 'data-role': 'reply', 'data-chunks': 0 });
    const stats = h('div', { class: 'stats' });
    log.append(reply, stats);
    prompt.value = '';
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    let answer = '';
    let chunks = 0;
    try {
      const resp = await api('/v1/chat/completions', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ model: model.value, messages, stream: true, max_tokens: Number(maxTokens.value) || 64 }),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      const feed = sseParser((data) => {
        if (data === '[DONE]') return;
        const event = JSON.parse(data);
        const delta = event.choices?.[0]?.delta || {};
        const piece = (delta.reasoning_content || '') + (delta.content || '');
        if (piece) {
          reply.append(piece); // one text node per token: the reply grows as it streams
          answer += piece;
          reply.dataset.chunks = ++chunks;
        }
        const timings = event.timings;
        if (timings) stats.textContent = `${timings.predicted_n} tokens, ${timings.predicted_per_second.toFixed(0)} tokens/s`;
        else if (event.usage) stats.textContent = `${event.usage.completion_tokens} tokens`;
        log.scrollTop = log.scrollHeight;
      });
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(decoder.decode(value, { stream: true }));
      }
      reply.dataset.done = 'true';
    } catch (err) {
      if (err.name !== 'AbortError') reply.append(h('span', { class: 'error' }, ` [${err.message}]`));
    } finally {
      messages.push({ role: 'assistant', content: answer });
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
  }

  stop.addEventListener('click', () => controller?.abort());
  reset.addEventListener('click', () => { messages = []; log.replaceChildren(); });
  const form = h('form', { class: 'stack', onsubmit: submit },
    h('div', { class: 'row' }, h('label', null, 'Model ', model), h('label', null, 'Max tokens ', maxTokens)),
    log, prompt, h('div', { class: 'row' }, send, stop, reset));
  return { element: form, models: () => modelOptions(model) };
}

function transcription() {
  const model = h('select', { id: 'stt-model', 'aria-label': 'model' });
  const file = h('input', { id: 'stt-file', type: 'file', accept: 'audio/*', required: true });
  const out = h('pre', { id: 'stt-out', class: 'result' });
  async function submit(event) {
    event.preventDefault();
    if (!file.files.length) return;
    const body = new FormData();
    body.append('model', model.value);
    body.append('file', file.files[0]);
    out.textContent = 'Transcribing…';
    const resp = await api('/v1/audio/transcriptions', { method: 'POST', body });
    out.textContent = resp.ok ? (await resp.json()).text ?? '' : `Error: ${await errorText(resp)}`;
  }
  const form = h('form', { class: 'stack', onsubmit: submit },
    h('div', { class: 'row' }, h('label', null, 'Model ', model), file, h('button', { type: 'submit' }, 'Transcribe')), out);
  return { element: form, models: () => modelOptions(model, (m) => /whisper|audio|speech/i.test(`${m.id} ${m.name} ${m.description}`)) };
}

function embeddings() {
  const model = h('select', { id: 'emb-model', 'aria-label': 'model' });
  const input = h('input', { id: 'emb-input', type: 'text', value: 'hello world', 'aria-label': 'text' });
  const out = h('pre', { id: 'emb-out', class: 'result' });
  async function submit(event) {
    event.preventDefault();
    out.textContent = 'Embedding…';
    const resp = await postJSON('/v1/embeddings', { model: model.value, input: input.value });
    if (!resp.ok) { out.textContent = `Error: ${await errorText(resp)}`; return; }
    const vector = (await resp.json()).data[0].embedding;
    out.textContent = `${vector.length} dimensions: [${vector.slice(0, 8).map((x) => x.toFixed(4)).join(', ')}, …]`;
  }
  const form = h('form', { class: 'stack', onsubmit: submit },
    h('div', { class: 'row' }, h('label', null, 'Model ', model), input, h('button', { type: 'submit' }, 'Embed')), out);
  return { element: form, models: () => modelOptions(model) };
}

export function mount(root) {
  const tools = { Chat: chat(), Transcription: transcription(), Embeddings: embeddings() };
  const body = h('div', { class: 'panel' });
  const tabs = h('div', { class: 'tabs', role: 'tablist' });
  function select(name) {
    for (const button of tabs.children) button.setAttribute('aria-selected', String(button.textContent === name));
    body.replaceChildren(tools[name].element);
  }
  for (const name of Object.keys(tools)) {
    tabs.append(h('button', { type: 'button', role: 'tab', onclick: () => select(name) }, name));
  }
  const refresh = () => { for (const tool of Object.values(tools)) tool.models(); };
  root.append(h('div', { class: 'toolbar' }, h('h1', null, 'Playground')), tabs, body);
  refresh();
  select('Chat');
  return subscribe((kind) => { if (kind === 'modelStatus') refresh(); });
}
