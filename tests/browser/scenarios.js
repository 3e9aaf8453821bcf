// Drives the playground and the stream API in Debian's Chromium (playwright-core, no browser
// download). tests/test_browser.py runs `node scenarios.js '<json config>'`; this prints one
// line of JSON with what it saw, and the Python test asserts on it.
//
// The config: {scenario, base (the page's origin), token, agent, message, shots (a folder),
// plus what a scenario needs}. Every scenario reports the page's console errors and uncaught
// exceptions, and the URLs it requested.
'use strict';

const path = require('path');
const { chromium } = require('playwright-core');

const config = JSON.parse(process.argv[2]);
const TIMEOUT = 30000;

async function launch(options = {}) {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run'],
  });
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 }, ...options });
  context.setDefaultTimeout(TIMEOUT);
  const page = await context.newPage();
  const seen = { console: [], errors: [], requests: [], responses: [] };
  page.on('console', (message) => {
    if (['error', 'warning'].includes(message.type())) seen.console.push(`${message.type()}: ${message.text()}`);
  });
  page.on('pageerror', (error) => seen.errors.push(String(error)));
  page.on('request', (request) => seen.requests.push({
    method: request.method(), url: request.url(), lastEventId: request.headers()['last-event-id'] || null,
  }));
  page.on('response', (response) => seen.responses.push({ url: response.url(), status: response.status() }));
  return { browser, context, page, seen };
}

const shot = (page, name) => page.screenshot({ path: path.join(config.shots, `${name}.png`), fullPage: false });

async function signIn(page, token = config.token) {
  await page.goto(`${config.base}/api/playground`);
  await page.getByLabel('API token').fill(token);
  await page.getByRole('button', { name: 'Connect' }).click();
}

async function choose(page, agent) {
  await page.getByLabel('Agent').selectOption(agent);
}

async function send(page, text) {
  const box = page.getByLabel('Message');
  await box.fill(text);
  await box.press('Enter');
}

const lastTurn = (page) => page.locator('.turn').last();

async function waitForStatus(page, status) {
  await page.waitForSelector(`.turn:last-child[data-status="${status}"]`);
}

async function turnReport(page) {
  return lastTurn(page).evaluate((turn) => ({
    status: turn.dataset.status,
    user: turn.querySelector('.bubble.user').innerText,
    answerText: turn.querySelector('.markdown').innerText,
    answerHtml: turn.querySelector('.markdown').innerHTML,
    reasoning: turn.querySelector('.reasoning-text').textContent,
    reasoningShown: !turn.querySelector('.reasoning').hidden,
    tools: [...turn.querySelectorAll('.tool')].map((chip) => ({
      className: chip.className, text: chip.innerText,
    })),
    followups: [...turn.querySelectorAll('.followup')].map((b) => b.textContent),
    note: turn.querySelector('.turn-note').textContent,
  }));
}

// Every visible control must have a name a screen reader can say.
function unlabelled(page) {
  return page.evaluate(() => [...document.querySelectorAll('button, input, select, textarea')]
    .filter((control) => control.offsetParent !== null)
    .filter((control) => {
      if (control.getAttribute('aria-label') || control.getAttribute('aria-labelledby')) return false;
      if (control.tagName === 'BUTTON') return !control.textContent.trim();
      return !(control.labels && control.labels.length);
    })
    .map((control) => control.outerHTML));
}

const scenarios = {
  // A run with a tool call, markdown that must not become HTML, the keyboard, the session
  // list and a reload that keeps the conversation; screenshots light and dark.
  async chat({ page, seen }) {
    await page.emulateMedia({ colorScheme: 'light' });
    await signIn(page);
    await page.waitForSelector('#workspace:not([hidden])');
    const before = await shot(page, 'chat-empty');
    await choose(page, 'finance_agent');
    await send(page, 'What is NVDA trading at?');
    // The thinking indicator shows while the model works, before the answer.
    await page.waitForSelector('.turn:last-child .reasoning.thinking');
    await waitForStatus(page, 'done');
    const tool = await turnReport(page);
    await lastTurn(page).locator('.tool summary').first().click();
    await shot(page, 'chat-tool-light');
    await page.emulateMedia({ colorScheme: 'dark' });
    await shot(page, 'chat-tool-dark');
    await page.emulateMedia({ colorScheme: 'light' });
    const colours = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);

    // Markdown and a follow-up, on the echoing agent.
    await choose(page, 'assistant');
    const box = page.getByLabel('Message');
    await box.fill('Here is **bold**, `code` and <img src=x onerror="window.pwned=1">');
    await box.press('Shift+Enter');
    await box.type('and a [link](https://example.com/) on a second line');
    await box.press('Enter');
    await waitForStatus(page, 'done');
    const markdown = await turnReport(page);
    const pwned = await page.evaluate(() => window.pwned === 1 || document.querySelector('.markdown img') !== null);
    const darkColours = await (async () => {
      await page.emulateMedia({ colorScheme: 'dark' });
      const value = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
      await page.emulateMedia({ colorScheme: 'light' });
      return value;
    })();
    await page.locator('.turn:last-child .followup').first().click();
    await page.waitForSelector('.turn:nth-child(2)');
    await waitForStatus(page, 'done');
    const turnsBefore = await page.locator('.turn').count();
    const followed = await turnReport(page);
    await shot(page, 'chat-markdown-light');

    await page.reload();
    await page.waitForSelector('.turn');
    const turnsAfter = await page.locator('.turn').count();
    const sessions = await page.locator('#sessions button.session').count();
    const current = await page.locator('#sessions button[aria-current="true"]').count();
    const stored = await page.evaluate(() => sessionStorage.getItem('agent-runs-playground'));
    return {
      tool, markdown, followed, pwned, colours, darkColours, turnsBefore, turnsAfter, sessions,
      current, unlabelled: await unlabelled(page), storedToken: JSON.parse(stored).token,
      before: Boolean(before),
    };
  },

  // Stop a run while it streams.
  async cancel({ page }) {
    await signIn(page);
    await choose(page, 'slow');
    await send(page, config.message);
    await page.waitForFunction(() => {
      const answer = document.querySelector('.turn:last-child .markdown');
      return answer && answer.textContent.length > 20;
    });
    const stop = page.getByRole('button', { name: 'Stop' });
    await stop.click();
    await waitForStatus(page, 'cancelled');
    await shot(page, 'cancelled');
    return { turn: await turnReport(page), stopHidden: await stop.isHidden(),
      sendEnabled: await page.getByRole('button', { name: 'Send' }).isEnabled() };
  },

  // A tool call that needs approval: approve one, reject the next.
  async approval({ page }) {
    await signIn(page);
    await choose(page, 'banker');
    await send(page, 'Wire 100 to Bob');
    const approve = page.getByRole('button', { name: 'Approve' });
    await approve.waitFor();
    const prompt = await lastTurn(page).locator('.approval').innerText();
    const group = await page.getByRole('group', { name: 'Approve the tool call' }).count();
    await shot(page, 'approval-light');
    await page.emulateMedia({ colorScheme: 'dark' });
    await shot(page, 'approval-dark');
    await page.emulateMedia({ colorScheme: 'light' });
    await approve.click();
    await waitForStatus(page, 'done');
    const approved = await turnReport(page);
    await send(page, 'Wire 5 to Eve');
    await page.getByRole('button', { name: 'Reject' }).click();
    await waitForStatus(page, 'done');
    const rejected = await turnReport(page);
    return { prompt, group, approved, rejected };
  },

  // Reload the page while the answer streams: the run goes on from the last event seen.
  async reload({ page }) {
    await signIn(page);
    await choose(page, 'slow');
    await send(page, config.message);
    await page.waitForFunction(() => {
      const answer = document.querySelector('.turn:last-child .markdown');
      return answer && answer.textContent.length > 40;
    });
    const partial = await lastTurn(page).locator('.markdown').innerText();
    const requestsBefore = seen(page).requests.length;
    await page.reload();
    await page.waitForSelector('.turn');
    await waitForStatus(page, 'done');
    const turn = await turnReport(page);
    await shot(page, 'reloaded');
    const after = seen(page).requests.slice(requestsBefore).filter((r) => r.url.includes('/events?'));
    return { partial, turn, eventsAfterReload: after, turns: await page.locator('.turn').count() };
  },

  // The page comes through a proxy that cuts the first event stream: EventSource reconnects.
  async drop({ page }) {
    await signIn(page);
    await choose(page, 'slow');
    await send(page, config.message);
    await waitForStatus(page, 'done');
    return { turn: await turnReport(page) };
  },

  // A phone's screen: nothing wider than it, the sessions behind a button.
  async phone({ page }) {
    await signIn(page);
    await choose(page, 'finance_agent');
    await send(page, 'What is NVDA trading at?');
    await waitForStatus(page, 'done');
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    await shot(page, 'phone-light');
    await page.emulateMedia({ colorScheme: 'dark' });
    await shot(page, 'phone-dark');
    await page.emulateMedia({ colorScheme: 'light' });
    const toggle = page.getByRole('button', { name: 'Show sessions' });
    const panelX = () => page.locator('#sessions-panel').evaluate((panel) => panel.getBoundingClientRect().right);
    const closedRight = await panelX();
    await toggle.click();
    await page.waitForTimeout(400); // the panel slides in (0.2 s)
    const openRight = await panelX();
    const expanded = await toggle.getAttribute('aria-expanded');
    await shot(page, 'phone-sessions');
    const titles = await page.locator('#sessions .session-title').allInnerTexts();
    await page.keyboard.press('Escape');
    await page.waitForTimeout(400);
    const escaped = await panelX();
    await toggle.click();
    await page.waitForTimeout(400);
    await page.locator('#sessions button.session').first().click();
    await page.waitForTimeout(400);
    return { overflow, closedRight, openRight, expanded, closedAgain: await panelX(), escaped, titles,
      unlabelled: await unlabelled(page), turn: await turnReport(page) };
  },

  async wrongToken({ page }) {
    await signIn(page, 'ar_not-a-token');
    const error = page.locator('#login-error');
    await page.waitForFunction(() => document.getElementById('login-error').textContent.length > 0);
    await shot(page, 'wrong-token');
    return { error: await error.innerText(), loginShown: await page.locator('#login').isVisible() };
  },

  // The browser's own EventSource on /events?access_token=, through a proxy that cuts the
  // stream once: it reconnects by itself with Last-Event-ID.
  async eventSource({ page }) {
    await page.goto(`${config.base}/api/playground`);
    return page.evaluate(async ({ token, agent, message }) => {
      const headers = { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' };
      const post = (url, body) => fetch(url, { method: 'POST', headers, body: JSON.stringify(body || {}) })
        .then((r) => r.json());
      const runs = `/api/agents/${agent}/runs`;
      const queued = await post(`${runs}/background`, { message });
      const other = await post(`${runs}/background`, { message: 'another run' });
      const grant = await post(`${runs}/${queued.runId}/events/token`);
      const read = await new Promise((resolve) => {
        const source = new EventSource(grant.url);
        const events = [];
        let errors = 0;
        source.onmessage = (m) => {
          const event = JSON.parse(m.data);
          events.push({ id: Number(m.lastEventId), event: event.event, data: event.data });
          if (event.event === 'STOP' || event.event === 'ERROR') { source.close(); resolve({ events, errors }); }
        };
        source.onerror = () => {
          errors += 1;
          if (source.readyState === EventSource.CLOSED) resolve({ events, errors, closed: true });
        };
      });
      const status = async (url) => {
        const r = await fetch(url);
        return { status: r.status, type: r.headers.get('Content-Type'), body: await r.text() };
      };
      const apiToken = await status(`${runs}/${queued.runId}/events?access_token=${token}`);
      const otherRun = await status(`${runs}/${other.runId}/events?access_token=${grant.token}`);
      return { ...read, runId: queued.runId, grant, apiToken, otherRun };
    }, { token: config.token, agent: config.agent, message: config.message });
  },

  // A page of another origin calls the API: fetch with a stream reader, and EventSource.
  async cors({ page }) {
    await page.goto(`${config.base}/cors.html`);
    const allowed = await page.evaluate(async ({ api, token }) => {
      const headers = { Authorization: `Bearer ${token}` };
      const agents = await fetch(`${api}/api/agents`, { headers }).then((r) => r.json());
      const response = await fetch(`${api}/api/agents/assistant/runs/stream`, {
        method: 'POST',
        headers: { ...headers, 'Content-Type': 'application/json', Accept: 'text/event-stream',
          'Idempotency-Key': `"cors-${Date.now()}"` },
        body: JSON.stringify({ message: 'hello from another origin' }),
      });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let text = '';
      let chunks = 0;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks += 1;
        text += decoder.decode(value, { stream: true });
      }
      const frames = text.split('\n\n').filter((f) => f.includes('data: '))
        .map((f) => JSON.parse(f.split('\n').find((l) => l.startsWith('data: ')).slice(6)));
      const start = JSON.parse(frames[0].data);
      const grant = await fetch(`${api}/api/agents/assistant/runs/${start.runId}/events/token`,
        { method: 'POST', headers }).then((r) => r.json());
      const replayed = await new Promise((resolve) => {
        const source = new EventSource(new URL(grant.url, api));
        const events = [];
        source.onmessage = (m) => {
          events.push(JSON.parse(m.data).event);
          if (events[events.length - 1] === 'STOP') { source.close(); resolve(events); }
        };
        source.onerror = () => { source.close(); resolve({ failed: events }); };
      });
      return { agents: agents.map((a) => a.id), status: response.status, chunks,
        events: frames.map((f) => f.event), replayed };
    }, { api: config.api, token: config.token });
    // The same calls from an origin the server does not list are refused by the browser.
    await page.goto(`${config.deniedBase}/cors.html`);
    const denied = await page.evaluate(async ({ api, token }) => {
      try {
        await fetch(`${api}/api/agents`, { headers: { Authorization: `Bearer ${token}` } });
        return 'allowed';
      } catch (error) {
        return error.name;
      }
    }, { api: config.api, token: config.token });
    return { allowed, denied };
  },
};

const seenByPage = new WeakMap();
function seen(page) { return seenByPage.get(page); }

(async () => {
  const options = config.viewport ? { viewport: config.viewport, isMobile: true, hasTouch: true } : {};
  const { browser, page, seen: record } = await launch(options);
  seenByPage.set(page, record);
  let result;
  try {
    result = await scenarios[config.scenario]({ page, seen: record });
  } catch (error) {
    await shot(page, `failed-${config.scenario}`).catch(() => {});
    result = { failed: String(error && error.stack ? error.stack : error) };
  }
  await browser.close();
  process.stdout.write(`${JSON.stringify({ ...result, ...record })}\n`);
})();
