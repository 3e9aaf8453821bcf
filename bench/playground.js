// Loads pages in Debian's Chromium and reports, per load, the time to interactive and what went
// over the wire. bench/playground.py runs `node playground.js '<json config>'` and reads the one
// line of JSON this prints. playwright-core comes from tests/browser (npm ci there).
//
// The config: {targets: {name: url}, cold: N, warm: N, deadlineMs, timeoutMs}.
// Cold: a fresh browser context per load (empty cache, new connection). Warm: one context per
// target, loaded once unmeasured, then again and again (its cache, its kept-alive
// connection); between two loads the tab goes to about:blank, so each is a new navigation.
// Targets take turns in every round, so a disturbance on the machine hits them alike.
'use strict';

const path = require('path');

const { chromium } = require(require.resolve('playwright-core', {
  paths: [path.join(__dirname, '..', 'tests', 'browser')],
}));

const config = JSON.parse(process.argv[2]);
const names = Object.keys(config.targets);
const deadline = Date.now() + config.deadlineMs;

// Runs in every document before its own scripts. Interactive is the first moment, at
// DOMContentLoaded or after it (so every deferred script has run and attached its handlers),
// that #token is visible and enabled; checked again each frame until it is.
function probe() {
  if (!location.protocol.startsWith('http')) return;
  const field = () => document.getElementById('token');
  const ready = () => field() && !field().disabled && field().checkVisibility();
  let frames = 0;
  const check = () => {
    if (ready()) {
      window.__pagebench = {
        interactiveMs: performance.now(),
        frames,
        focused: document.activeElement === field(),
      };
    } else if (frames++ < 600) {
      requestAnimationFrame(check);
    }
  };
  document.addEventListener('DOMContentLoaded', check, { once: true });
}

async function newContext(browser) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  context.setDefaultTimeout(config.timeoutMs);
  await context.addInitScript(probe);
  return context;
}

// One load of url in page: the probe's figures, the navigation's timings, and each request
// that went out with its status and sizes (bytes as received: headers plus the body as
// transferred, i.e. compressed if the server compressed it).
async function load(page, url) {
  const requests = [];
  const onRequest = (request) => {
    if (!request.url().startsWith('data:')) requests.push(request);
  };
  const errors = [];
  const onConsole = (message) => { if (message.type() === 'error') errors.push(message.text()); };
  const onPageError = (error) => errors.push(String(error));
  page.on('request', onRequest);
  page.on('console', onConsole);
  page.on('pageerror', onPageError);
  try {
    await page.goto(url, { waitUntil: 'load' });
    await page.waitForFunction(() => window.__pagebench, null, { timeout: config.timeoutMs });
    const seen = await page.evaluate(() => {
      const nav = performance.getEntriesByType('navigation')[0];
      const paint = performance.getEntriesByName('first-contentful-paint')[0];
      return {
        ...window.__pagebench,
        responseStartMs: nav.responseStart,
        domContentLoadedMs: nav.domContentLoadedEventEnd,
        loadMs: nav.loadEventEnd,
        firstContentfulPaintMs: paint ? paint.startTime : null,
        resourceEntries: 1 + performance.getEntriesByType('resource').length,
      };
    });
    const wire = await Promise.all(requests.map(async (request) => {
      const response = await request.response();
      const sizes = await request.sizes();
      return {
        url: request.url(),
        status: response ? response.status() : null,
        sent: sizes.requestHeadersSize + sizes.requestBodySize,
        received: sizes.responseHeadersSize + sizes.responseBodySize,
        body: sizes.responseBodySize,
      };
    }));
    return { ...seen, requests: wire, errors };
  } finally {
    page.off('request', onRequest);
    page.off('console', onConsole);
    page.off('pageerror', onPageError);
  }
}

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run'],
  });
  const samples = Object.fromEntries(names.map((name) => [name, { cold: [], warm: [] }]));
  let cutShort = false;
  try {
    // Unmeasured: the browser's first context and page, the servers' first requests.
    for (const name of names) {
      const context = await newContext(browser);
      await load(await context.newPage(), config.targets[name]);
      await context.close();
    }
    for (let round = 0; round < config.cold; round++) {
      if (Date.now() > deadline) { cutShort = true; break; }
      for (let turn = 0; turn < names.length; turn++) {
        const name = names[(round + turn) % names.length];
        const context = await newContext(browser);
        try {
          samples[name].cold.push(await load(await context.newPage(), config.targets[name]));
        } finally {
          await context.close();
        }
      }
    }
    const warm = {};
    for (const name of names) {
      const context = await newContext(browser);
      const page = await context.newPage();
      await load(page, config.targets[name]);
      warm[name] = { context, page };
    }
    for (let round = 0; round < config.warm; round++) {
      if (Date.now() > deadline) { cutShort = true; break; }
      for (let turn = 0; turn < names.length; turn++) {
        const name = names[(round + turn) % names.length];
        const { page } = warm[name];
        await page.goto('about:blank');
        samples[name].warm.push(await load(page, config.targets[name]));
      }
    }
    for (const { context } of Object.values(warm)) await context.close();
  } finally {
    const version = browser.version();
    await browser.close();
    process.stdout.write(`${JSON.stringify({ browser: version, cutShort, samples })}\n`);
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
