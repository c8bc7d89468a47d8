// The live page: a quote grid, a trade blotter and the pipeline's health, all
// driven by the api's own GraphQL subscriptions over graphql-transport-ws.
// A plain ES module: no framework, no build step. Text reaches the DOM only
// through textContent and setAttribute.

const GRAPHQL_URL = '/graphql';
// With authentication on, open the page as /live#token=<JWT>: the fragment
// never reaches the server's logs or other sites' Referer headers.
const TOKEN = new URLSearchParams(location.hash.slice(1)).get('token');
const AUTH = TOKEN ? { authorization: `Bearer ${TOKEN}` } : {};
const WS_URL = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/graphql/ws`;
const QUOTE_FIELDS = ['bid', 'ask', 'mid', 'spread', 'bidSize', 'askSize', 'venue', 'ts'];
const DEFAULT_FIELDS = ['bid', 'ask', 'mid', 'spread', 'ts'];
const NUMERIC = new Set(['bid', 'ask', 'mid', 'spread', 'bidSize', 'askSize']);
const TRADE_FIELDS = ['ts', 'instrument', 'side', 'price', 'qty', 'venue'];
const DEFAULT_MAX_RATE = 4;
const DEFAULT_PICK = 5;
const BLOTTER_ROWS = 200;
const HEALTH_WINDOW_MS = 1000;
const FLASH = { up: '#1d4d2b', down: '#5c1f1f', chg: '#4d3d12' };

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- GraphQL over WebSocket (graphql-transport-ws) ----------------------

class GraphQLSocket {
  constructor(url, onStatus) {
    this.url = url;
    this.onStatus = onStatus;
    this.subs = new Map();
    this.nextId = 1;
    this.ready = false;
    this.retries = 0;
    this.connect();
  }

  connect() {
    this.onStatus('connecting', 'connecting');
    const ws = new WebSocket(this.url, 'graphql-transport-ws');
    this.ws = ws;
    this.ready = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: 'connection_init', payload: AUTH }));
    ws.onmessage = (event) => this.receive(JSON.parse(event.data));
    ws.onclose = (event) => {
      this.ready = false;
      const delay = Math.min(500 * 2 ** this.retries++, 5000);
      const why = `closed (${event.code}${event.reason ? `: ${event.reason}` : ''})`;
      this.onStatus('reconnecting', `${why}, reconnecting in ${delay / 1000} s`);
      setTimeout(() => this.connect(), delay);
    };
  }

  receive(msg) {
    const sub = this.subs.get(msg.id);
    switch (msg.type) {
      case 'connection_ack':
        this.ready = true;
        this.retries = 0;
        this.onStatus('open', 'live');
        // After a reconnect every subscription starts again on the new socket.
        for (const [id, s] of this.subs) this.sendSubscribe(id, s);
        break;
      case 'ping':
        this.ws.send(JSON.stringify({ type: 'pong' }));
        break;
      case 'next':
        if (sub) sub.onNext(msg.payload);
        break;
      case 'error':
        if (sub) { this.subs.delete(msg.id); sub.onError(msg.payload); }
        break;
      case 'complete':
        if (sub) { this.subs.delete(msg.id); sub.onComplete(); }
        break;
    }
  }

  // Messages for an id no longer subscribed are dropped by receive(), so after
  // a resubscribe nothing of the old selection reaches the screen.
  subscribe(query, variables, handlers) {
    const id = String(this.nextId++);
    const sub = { query, variables, ...handlers };
    this.subs.set(id, sub);
    if (this.ready) this.sendSubscribe(id, sub);
    return id;
  }

  unsubscribe(id) {
    if (this.subs.delete(id) && this.ready) this.ws.send(JSON.stringify({ id, type: 'complete' }));
  }

  sendSubscribe(id, { query, variables }) {
    this.ws.send(JSON.stringify({ id, type: 'subscribe', payload: { query, variables } }));
  }
}

async function graphql(query, variables = {}) {
  const res = await fetch(GRAPHQL_URL, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...AUTH },
    body: JSON.stringify({ query, variables }),
  });
  const body = await res.json();
  if (body.errors) throw new Error(body.errors.map((e) => e.message).join('; '));
  return body.data;
}

// ---- Values --------------------------------------------------------------

// RFC 3339 with up to nanoseconds -> fractional milliseconds since the epoch
// (Date.parse alone would drop or refuse the digits past milliseconds).
function parseTime(text) {
  const m = /^(.+T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/i.exec(text ?? '');
  if (!m) return NaN;
  return Date.parse(m[1] + m[3]) + (m[2] ? Number(`0.${m[2]}`) * 1000 : 0);
}

function display(field, value) {
  if (value === null || value === undefined) return '–';
  if (field === 'ts') {
    const m = /T(\d\d:\d\d:\d\d(?:\.\d{1,3})?)/.exec(value);
    return m ? m[1] : String(value);
  }
  return String(value);
}

// ---- Health --------------------------------------------------------------

const health = { quotes: { recent: [], total: 0 }, trades: { recent: [], total: 0 } };

function record(kind, event) {
  const now = Date.now();
  const ingested = parseTime(event.ingestedAt);
  const h = health[kind];
  h.total += 1;
  h.recent.push({ at: now, lag: now - ingested, enrich: parseTime(event.enrichedAt) - ingested });
}

function percentile(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] : NaN;
}

function setHealth(key, value, digits = 0) {
  const cell = document.querySelector(`[data-health="${key}"]`);
  cell.dataset.value = Number.isFinite(value) ? String(value) : '';
  cell.textContent = Number.isFinite(value) ? value.toFixed(digits) : '–';
}

function renderHealth() {
  const cutoff = Date.now() - HEALTH_WINDOW_MS;
  for (const [kind, h] of Object.entries(health)) {
    const keep = h.recent.findIndex((e) => e.at >= cutoff);
    h.recent.splice(0, keep < 0 ? h.recent.length : keep);
    const lags = h.recent.map((e) => e.lag).filter(Number.isFinite).sort((a, b) => a - b);
    const enrich = h.recent.map((e) => e.enrich).filter(Number.isFinite).sort((a, b) => a - b);
    setHealth(`${kind}-rate`, h.recent.length / (HEALTH_WINDOW_MS / 1000));
    setHealth(`${kind}-lag-p50`, percentile(lags, 0.5), 1);
    setHealth(`${kind}-lag-max`, lags[lags.length - 1], 1);
    setHealth(`${kind}-enrich-p50`, percentile(enrich, 0.5), 1);
    setHealth(`${kind}-enrich-max`, enrich[enrich.length - 1], 1);
    setHealth(`${kind}-total`, h.total);
  }
}

// ---- Grid and blotter ----------------------------------------------------

const gridRows = new Map();

function buildGrid(instruments, fields) {
  gridRows.clear();
  const head = el('tr');
  head.append(el('th', {}, 'instrument'));
  for (const f of fields) head.append(el('th', { 'data-field': f }, f));
  $('#grid thead').replaceChildren(head);
  $('#grid tbody').replaceChildren();
  for (const symbol of instruments) gridRow(symbol, fields);
}

// A row per instrument, in symbol order; one that was not picked would only
// appear if the server sent it, which the browser test checks never happens.
function gridRow(symbol, fields) {
  let row = gridRows.get(symbol);
  if (row) return row;
  const tr = el('tr', { 'data-instrument': symbol, 'data-updates': '0' });
  tr.append(el('th', { 'data-instrument': symbol, 'data-field': 'instrument' }, symbol));
  const cells = {};
  for (const f of fields) {
    cells[f] = el('td', { 'data-instrument': symbol, 'data-field': f }, '–');
    tr.append(cells[f]);
  }
  row = { tr, cells, updates: 0 };
  gridRows.set(symbol, row);
  const after = [...gridRows.keys()].sort().find((s) => s > symbol);
  $('#grid tbody').insertBefore(tr, after ? gridRows.get(after).tr : null);
  return row;
}

function onQuote(view, quote) {
  record('quotes', quote);
  const row = gridRow(quote.instrument, view.fields);
  for (const f of view.fields) {
    const cell = row.cells[f];
    const text = display(f, quote[f]);
    if (cell.textContent === text) continue;
    const before = cell.dataset.value;
    cell.textContent = text;
    cell.dataset.value = quote[f] ?? '';
    if (before === undefined) continue;
    const diff = NUMERIC.has(f) ? Number(quote[f]) - Number(before) : 0;
    const dir = diff > 0 ? 'up' : diff < 0 ? 'down' : 'chg';
    cell.dataset.dir = dir;
    cell.animate([{ backgroundColor: FLASH[dir] }, { backgroundColor: 'transparent' }], { duration: 800, easing: 'ease-out' });
  }
  row.updates += 1;
  row.tr.dataset.updates = String(row.updates);
}

function onTrade(trade) {
  record('trades', trade);
  const tr = el('tr', { 'data-instrument': trade.instrument, 'data-side': trade.side });
  for (const f of TRADE_FIELDS) {
    tr.append(el('td', { 'data-instrument': trade.instrument, 'data-field': f }, display(f, trade[f])));
  }
  const body = $('#blotter tbody');
  body.prepend(tr);
  while (body.rows.length > BLOTTER_ROWS) body.lastElementChild.remove();
}

// ---- Subscriptions -------------------------------------------------------

const client = new GraphQLSocket(WS_URL, (state, text) => {
  const conn = $('#conn');
  conn.dataset.state = state;
  conn.textContent = text;
});
let view = null;

function say(text) {
  $('#message').textContent = text;
}

function errorText(errors) {
  return (Array.isArray(errors) ? errors : [errors]).map((e) => e?.message ?? String(e)).join('; ');
}

// Starts one of the view's two subscriptions; a subscription the server ends
// (too slow, shutting down) is started again while the view is current.
function start(v, kind, query, variables, onData) {
  v[kind] = client.subscribe(query, variables, {
    onNext: (payload) => {
      if (payload.errors) say(`${kind}: ${errorText(payload.errors)}`);
      if (payload.data && view === v) onData(payload.data[kind]);
    },
    onError: (errors) => say(`${kind} refused: ${errorText(errors)}`),
    onComplete: () => {
      if (view !== v) return;
      say(`${kind}: ended by the server, resubscribing`);
      setTimeout(() => view === v && start(v, kind, query, variables, onData), 1000);
    },
  });
}

function apply({ instruments, fields, maxRate }) {
  if (view) {
    client.unsubscribe(view.quotes);
    client.unsubscribe(view.trades);
  }
  view = null;
  say('');
  if (instruments.length === 0) {
    say('pick at least one instrument');
    return;
  }
  const v = { instruments, fields };
  view = v;
  buildGrid(instruments, fields);
  $('#blotter tbody').replaceChildren();
  const quoteQuery = `subscription Grid($instruments: [String!], $maxRate: Float) {
  quotes(instruments: $instruments, maxRate: $maxRate, snapshot: true) { instrument ${fields.join(' ')} ingestedAt enrichedAt }
}`;
  const tradeQuery = `subscription Blotter($instruments: [String!]) {
  trades(instruments: $instruments) { instrument ${TRADE_FIELDS.filter((f) => f !== 'instrument').join(' ')} ingestedAt enrichedAt }
}`;
  start(v, 'quotes', quoteQuery, { instruments, maxRate }, (q) => onQuote(v, q));
  start(v, 'trades', tradeQuery, { instruments }, onTrade);
  const hash = new URLSearchParams({ instruments: instruments.join(','), fields: fields.join(','), maxRate: maxRate ?? '' });
  history.replaceState(null, '', `#${hash}`);
}

// ---- Controls ------------------------------------------------------------

function pickedSymbols() {
  return [...document.querySelectorAll('#instrument-list input:checked')].map((i) => i.dataset.symbol).sort();
}

function countPicked() {
  $('#picked-count').textContent = `${pickedSymbols().length} picked`;
}

function readControls() {
  const fields = QUOTE_FIELDS.filter((f) => document.querySelector(`[data-field-choice="${f}"]`).checked);
  const rateText = $('#max-rate').value.trim();
  const maxRate = rateText === '' ? null : Number(rateText);
  if (maxRate !== null && !(maxRate >= 0.001 && maxRate <= 1000)) {
    say('max rate must be from 0.001 to 1000, or empty for every quote');
    return null;
  }
  return { instruments: pickedSymbols(), fields, maxRate };
}

function showInstruments(nodes, total, picked) {
  const list = $('#instrument-list');
  list.replaceChildren();
  for (const ins of nodes) {
    const label = el('label', { 'data-symbol': ins.symbol, title: `${ins.name} (${ins.assetClass}, ${ins.venue})` });
    const box = el('input', { type: 'checkbox', 'data-symbol': ins.symbol });
    box.checked = picked.has(ins.symbol);
    label.append(box, ' ', el('b', {}, ins.symbol), ' ', el('small', {}, ins.name));
    label.dataset.search = `${ins.symbol} ${ins.name}`.toLowerCase();
    list.append(label);
  }
  if (nodes.length === 0) list.textContent = 'no instruments in the reference data';
  if (total > nodes.length) list.append(el('p', { class: 'note' }, `first ${nodes.length} of ${total}`));
  countPicked();
}

function showFields(chosen) {
  const list = $('#field-list');
  for (const f of QUOTE_FIELDS) {
    const box = el('input', { type: 'checkbox', 'data-field-choice': f });
    box.checked = chosen.includes(f);
    const label = el('label');
    label.append(box, ` ${f}`);
    list.append(label);
  }
}

function filterList() {
  const needle = $('#instrument-filter').value.trim().toLowerCase();
  for (const label of document.querySelectorAll('#instrument-list label')) {
    label.hidden = needle !== '' && !label.dataset.search.includes(needle);
  }
}

async function main() {
  // A view is kept in the URL's fragment, so a reload or a shared link shows it again.
  const saved = new URLSearchParams(location.hash.slice(1));
  const savedFields = saved.get('fields')?.split(',').filter((f) => QUOTE_FIELDS.includes(f));
  const fields = savedFields?.length ? savedFields : DEFAULT_FIELDS;
  if (saved.has('maxRate')) $('#max-rate').value = saved.get('maxRate');
  else $('#max-rate').value = String(DEFAULT_MAX_RATE);
  showFields(fields);

  $('#instrument-filter').addEventListener('input', filterList);
  $('#instrument-list').addEventListener('change', countPicked);
  $('#pick-shown').addEventListener('click', () => {
    for (const box of document.querySelectorAll('#instrument-list label:not([hidden]) input')) box.checked = true;
    countPicked();
  });
  $('#pick-none').addEventListener('click', () => {
    for (const box of document.querySelectorAll('#instrument-list input')) box.checked = false;
    countPicked();
  });
  $('#apply').addEventListener('click', () => {
    const selection = readControls();
    if (selection) apply(selection);
  });
  setInterval(renderHealth, 250);

  let data;
  try {
    data = await graphql('query Instruments { instruments(first: 1000) { totalCount nodes { symbol name assetClass venue } } }');
  } catch (err) {
    $('#instrument-list').textContent = `could not load instruments: ${err.message}`;
    return;
  }
  const { nodes, totalCount } = data.instruments;
  const known = new Set(nodes.map((n) => n.symbol));
  const savedPick = (saved.get('instruments') ?? '').split(',').filter((s) => known.has(s));
  const picked = new Set(savedPick.length ? savedPick : nodes.slice(0, DEFAULT_PICK).map((n) => n.symbol));
  showInstruments(nodes, totalCount, picked);
  const selection = readControls();
  if (selection && selection.instruments.length) apply(selection);
}

main();
