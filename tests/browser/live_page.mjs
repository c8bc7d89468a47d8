// Drives the api's live page (/live) in Debian's headless chromium and checks
// what a person would see: the grid ticks, only the picked instruments ever
// appear in the grid and the blotter, and the health panel counts events.
//
//   node tests/browser/live_page.mjs http://127.0.0.1:<api port> [INSTRUMENT ...]
//
// Something must be sending quotes and trades for the picked instruments (and,
// so that the filter means something, for others) while it runs; the e2e test
// tests/e2e/page.rs does. Environment: CHROMIUM (default /usr/bin/chromium),
// TG_SCREENSHOT (a path to save a screenshot of the page at the end).
// Exits 0 when every check holds, 1 with the reasons otherwise.

import { chromium } from 'playwright-core';

const base = (process.argv[2] ?? '').replace(/\/$/, '');
if (!/^https?:\/\//.test(base)) {
  console.error('usage: node live_page.mjs http://HOST:PORT [INSTRUMENT ...]');
  process.exit(2);
}
const picked = (process.argv.length > 3 ? process.argv.slice(3) : ['AAPL', 'VOD.L']).sort();
// A field set other than the page's default: mid and ts left out, sizes in.
const fields = ['bid', 'ask', 'spread', 'bidSize'];
const maxRate = 4;
// Watch at least this long for anything off-filter, at most the longer.
const watchMs = [3000, 10_000];
const minDistinctBids = 3;

const failures = [];
const check = (ok, what) => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failures.push(what);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox'],
  timeout: 60_000,
});
const watchdog = setTimeout(() => {
  console.error('FAIL the browser test took over 120 s');
  process.exit(1);
}, 120_000);

try {
  const page = await browser.newPage();
  page.setDefaultTimeout(20_000);
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') pageErrors.push(`console: ${msg.text()} (${msg.location().url})`);
  });

  // What went over the page's GraphQL WebSocket, as the server saw it.
  const subscribes = new Map();
  const received = [];
  page.on('websocket', (ws) => {
    ws.on('framesent', ({ payload }) => {
      const msg = JSON.parse(payload);
      if (msg.type === 'subscribe') subscribes.set(msg.id, msg.payload);
    });
    ws.on('framereceived', ({ payload }) => {
      const msg = JSON.parse(payload);
      if (msg.type === 'next') received.push(msg);
    });
  });

  await page.goto(`${base}/live`);
  await page.waitForSelector('#instrument-list input[data-symbol]');
  const offered = await page.$$eval('#instrument-list input[data-symbol]', (xs) => xs.map((x) => x.dataset.symbol));
  console.log(`instruments offered: ${offered.join(' ')}`);
  check(picked.every((s) => offered.includes(s)), `the picker offers ${picked.join(', ')}`);
  check(offered.some((s) => !picked.includes(s)), 'the picker offers instruments beyond the picked ones');

  // Pick as a person would: clear, then find each instrument with the text filter.
  await page.click('#pick-none');
  for (const symbol of picked) {
    await page.fill('#instrument-filter', symbol);
    const shown = await page.$$eval('#instrument-list label:not([hidden])', (xs) => xs.map((x) => x.dataset.symbol));
    check(shown.includes(symbol) && shown.length < offered.length, `filtering the list by "${symbol}" shows ${shown.join(', ')}`);
    await page.check(`#instrument-list input[data-symbol="${symbol}"]`);
  }
  await page.fill('#instrument-filter', '');
  for (const box of await page.$$('[data-field-choice]')) {
    const f = await box.getAttribute('data-field-choice');
    await box.setChecked(fields.includes(f));
  }
  await page.fill('#max-rate', String(maxRate));

  // Start recording every row the grid and the blotter ever get in the same
  // task as Apply, so that nothing from before it is counted and nothing after.
  const subscribedBefore = new Set(subscribes.keys());
  const appliedAt = Date.now();
  await page.evaluate(() => {
    window.__seen = { grid: new Set(), blotter: new Set() };
    const watch = (selector, into) => new MutationObserver((records) => {
      for (const r of records) for (const n of r.addedNodes) {
        if (n.nodeType === Node.ELEMENT_NODE && n.dataset.instrument) into.add(n.dataset.instrument);
      }
    }).observe(document.querySelector(selector), { childList: true });
    watch('#grid tbody', window.__seen.grid);
    watch('#blotter tbody', window.__seen.blotter);
    document.querySelector('#apply').click();
  });

  // The subscriptions Apply sent (once the socket is open).
  const ours = [];
  for (const until = Date.now() + 15_000; ours.length < 2 && Date.now() < until;) {
    await page.waitForTimeout(100);
    ours.splice(0, ours.length, ...[...subscribes].filter(([id]) => !subscribedBefore.has(id)));
  }
  const quoteSub = ours.find(([, p]) => /\bquotes\s*\(/.test(p.query));
  const tradeSub = ours.find(([, p]) => /\btrades\s*\(/.test(p.query));
  check(quoteSub && tradeSub, 'Apply subscribed to quotes and trades');
  if (quoteSub) {
    const [, p] = quoteSub;
    console.log(`quotes subscription: ${p.query.replace(/\s+/g, ' ')} ${JSON.stringify(p.variables)}`);
    const selection = /quotes\s*\([^)]*\)\s*\{([^}]*)\}/.exec(p.query)?.[1].trim().split(/\s+/) ?? [];
    check(JSON.stringify([...(p.variables.instruments ?? [])].sort()) === JSON.stringify(picked),
      `the quotes subscription asks for ${picked.join(', ')}`);
    check(p.variables.maxRate === maxRate, `the quotes subscription asks for maxRate ${maxRate}`);
    check(fields.every((f) => selection.includes(f)) && !selection.includes('mid') && !selection.includes('ts'),
      `the quotes subscription selects the chosen fields (${selection.join(' ')})`);
  }
  if (tradeSub) {
    const [, p] = tradeSub;
    check(JSON.stringify([...(p.variables.instruments ?? [])].sort()) === JSON.stringify(picked),
      `the trades subscription asks for ${picked.join(', ')}`);
  }

  // Watch the grid tick.
  const columns = await page.$$eval('#grid thead th[data-field]', (xs) => xs.map((x) => x.dataset.field));
  check(JSON.stringify(columns) === JSON.stringify(fields), `the grid's columns are the chosen fields: ${columns.join(' ')}`);
  const bids = new Map(picked.map((s) => [s, new Set()]));
  let flashed = 0;
  let health = {};
  const started = Date.now();
  for (;;) {
    const watched = Date.now() - started;
    if (watched > watchMs[1]) break;
    const cells = await page.$$eval('#grid td[data-field="bid"]', (xs) => xs.map((x) => ({
      instrument: x.dataset.instrument, text: x.textContent, flashing: x.getAnimations().length > 0,
    })));
    for (const c of cells) {
      if (c.text !== '–') (bids.get(c.instrument) ?? bids.set(c.instrument, new Set()).get(c.instrument)).add(c.text);
      if (c.flashing) flashed += 1;
    }
    health = await page.$$eval('[data-health]', (xs) => Object.fromEntries(xs.map((x) => [x.dataset.health, x.textContent])));
    const enough = picked.every((s) => bids.get(s).size >= minDistinctBids + 2) && flashed > 0;
    if (enough && watched > watchMs[0] && Number(health['quotes-rate']) > 0) break;
    await page.waitForTimeout(200);
  }
  const seen = await page.evaluate(() => ({ grid: [...window.__seen.grid].sort(), blotter: [...window.__seen.blotter].sort() }));
  const rows = await page.$$eval('#grid tbody tr', (xs) => xs.map((x) => ({
    instrument: x.dataset.instrument, updates: Number(x.dataset.updates),
    cells: Object.fromEntries([...x.querySelectorAll('td')].map((td) => [td.dataset.field, td.textContent])),
  })));
  const blotter = await page.$$eval('#blotter tbody tr', (xs) => xs.map((x) => x.dataset.instrument));

  console.log(`grid after ${((Date.now() - started) / 1000).toFixed(1)} s:`);
  for (const r of rows) console.log(`  ${r.instrument} (${r.updates} updates) ${JSON.stringify(r.cells)}`);
  for (const [s, values] of bids) console.log(`  bids seen for ${s}: ${[...values].join(' ')}`);
  console.log(`blotter: ${blotter.length} trades, of ${[...new Set(blotter)].sort().join(', ')}`);
  console.log(`health: ${JSON.stringify(health)}`);
  console.log(`rows ever added: grid ${seen.grid.join(', ')}; blotter ${seen.blotter.join(', ')}`);

  // (1) It ticks.
  for (const s of picked) {
    check(bids.get(s).size >= minDistinctBids, `${s}'s bid changed on screen (${bids.get(s).size} distinct values)`);
  }
  check(flashed > 0, 'changed cells flash');
  // (2) The filter holds, on screen and on the wire.
  const stray = (xs) => [...new Set(xs)].filter((s) => !picked.includes(s));
  check(stray(seen.grid).length === 0 && stray(rows.map((r) => r.instrument)).length === 0,
    `the grid only ever had rows of ${picked.join(', ')} (others: ${stray(seen.grid).join(', ') || 'none'})`);
  check(blotter.length > 0, 'the blotter shows trades');
  check(stray(seen.blotter).length === 0 && stray(blotter).length === 0,
    `the blotter only ever had trades of ${picked.join(', ')} (others: ${stray(seen.blotter).join(', ') || 'none'})`);
  const ourIds = new Set(ours.map(([id]) => id));
  const wire = received.filter((m) => ourIds.has(m.id)).map((m) => Object.values(m.payload.data ?? {})[0]?.instrument);
  check(wire.length > 0 && stray(wire).length === 0,
    `all ${wire.length} events received on the page's subscriptions were of ${picked.join(', ')}`);
  // (3) The health panel counts them.
  check(Number(health['quotes-rate']) > 0, `the health panel shows a quote rate above 0 (${health['quotes-rate']}/s)`);
  // The feed sends 10 quotes/s of each instrument; conflated, the page gets about
  // maxRate a second of each, plus its snapshot and one sent at once. Counted since
  // Apply, so a burst delivered late by a busy machine cannot push it over. A check
  // that the page conflates, with a margin: the hub's own tests time the rate.
  const elapsed = (Date.now() - appliedAt) / 1000;
  const quoteFrames = received.filter((m) => quoteSub && m.id === quoteSub[0]).length;
  const most = Math.floor(picked.length * (1.25 * maxRate * elapsed + 3));
  check(quoteFrames <= most, `conflation: ${quoteFrames} quotes in ${elapsed.toFixed(1)} s since Apply, at most ${most} allowed`);
  check(Number(health['quotes-total']) > 0 && Number(health['trades-total']) > 0, 'the health panel counts quotes and trades');
  check(Number.isFinite(Number(health['quotes-lag-p50'])), `the health panel shows a lag (p50 ${health['quotes-lag-p50']} ms)`);
  check(pageErrors.length === 0, `no errors on the page${pageErrors.length ? `: ${pageErrors.join(' | ')}` : ''}`);

  if (process.env.TG_SCREENSHOT) await page.screenshot({ path: process.env.TG_SCREENSHOT, fullPage: true });
  await page.close();

  // A second page: a view restored from the URL's fragment, over a socket that
  // the test drops once; the page reconnects, resubscribes and ticks again.
  const other = offered.find((s) => !picked.includes(s));
  const page2 = await browser.newPage();
  page2.setDefaultTimeout(20_000);
  page2.on('pageerror', (err) => pageErrors.push(String(err)));
  const sockets = [];
  await page2.routeWebSocket(/\/graphql\/ws$/, (ws) => sockets.push({ ws, server: ws.connectToServer() }));
  await page2.goto(`${base}/live#instruments=${encodeURIComponent(other)}&fields=bid&maxRate=4`);
  const bidOf = () => page2.$eval(`#grid td[data-instrument="${other}"][data-field="bid"]`, (x) => x.textContent);
  const ticks = async (what) => {
    const values = new Set();
    for (const until = Date.now() + 10_000; values.size < 3 && Date.now() < until;) {
      const bid = await bidOf().catch(() => '–');
      if (bid !== '–') values.add(bid);
      await page2.waitForTimeout(100);
    }
    check(values.size >= 3, `${other}'s bid ticks ${what} (${[...values].join(' ')})`);
  };
  await ticks('on a view restored from the URL');
  const restored = await page2.evaluate(() => ({
    picked: [...document.querySelectorAll('#instrument-list input:checked')].map((x) => x.dataset.symbol),
    fields: [...document.querySelectorAll('[data-field-choice]:checked')].map((x) => x.dataset.fieldChoice),
    rows: [...document.querySelectorAll('#grid tbody tr')].map((x) => x.dataset.instrument),
  }));
  check(JSON.stringify(restored) === JSON.stringify({ picked: [other], fields: ['bid'], rows: [other] }),
    `the URL's view is restored: ${JSON.stringify(restored)}`);
  await page2.evaluate(() => {
    window.__states = [];
    new MutationObserver(() => window.__states.push(document.querySelector('#conn').dataset.state))
      .observe(document.querySelector('#conn'), { attributes: true });
  });
  sockets[0].ws.close({ code: 4000, reason: 'dropped by the test' });
  sockets[0].server.close();
  await page2.waitForFunction(() => window.__states.includes('reconnecting') && window.__states.at(-1) === 'open')
    .catch(async () => {
      throw new Error(`the page did not reconnect after its socket dropped (states: ${await page2.evaluate(() => window.__states.join(' '))})`);
    });
  const status = await page2.$eval('#conn', (x) => x.textContent);
  check(sockets.length === 2, `the page opened a new socket after the drop (${sockets.length} in all; now "${status}")`);
  await ticks('again after the reconnect');
  check(pageErrors.length === 0, `no errors on the second page${pageErrors.length ? `: ${pageErrors.join(' | ')}` : ''}`);
} catch (err) {
  failures.push(String(err?.stack ?? err));
  console.error(`FAIL ${err?.stack ?? err}`);
} finally {
  clearTimeout(watchdog);
  await browser.close();
}

if (failures.length) {
  console.error(`live page: ${failures.length} check(s) failed:\n  ${failures.join('\n  ')}`);
  process.exit(1);
}
console.log('live page: every check passed');
