// The Agent Runs playground: chat with the server's agents, on its public API alone.
//
// A run starts with POST .../runs/background; its events are read with the browser's own
// EventSource from .../events?access_token=<stream token>, which reconnects by itself with
// Last-Event-ID. What this tab knows (token, agent, session, the run under way and the id of
// its last event) lives in sessionStorage, so a reload carries on from that id, and text is
// never shown twice: an event whose id is not above the last one is dropped.
(() => {
  'use strict';

  const KEY = 'agent-runs-playground';
  // The page is {prefix}/playground; the API is {prefix}.
  const BASE = location.pathname.replace(/\/playground\/?$/, '');
  const MAX_RETRIES = 8;

  const $ = (id) => document.getElementById(id);
  const ui = {
    login: $('login'), loginForm: $('login-form'), token: $('token'), loginError: $('login-error'),
    workspace: $('workspace'), controls: $('bar-controls'), agent: $('agent'),
    newChat: $('new-chat'), signOut: $('sign-out'), toggle: $('toggle-sessions'),
    panel: $('sessions-panel'), sessions: $('sessions'), messages: $('messages'),
    composer: $('composer'), message: $('message'), followups: $('followups'),
    send: $('send'), cancel: $('cancel'), status: $('status'),
  };

  // {token, agentId, sessionId, titles: {sessionId: first message}, turn: the run under way}
  let state = {};
  try { state = JSON.parse(sessionStorage.getItem(KEY)) || {}; } catch { state = {}; }
  state.titles = state.titles || {};
  const save = () => sessionStorage.setItem(KEY, JSON.stringify(state));
  let agents = []; // GET /agents

  // The API -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(BASE + path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      throw new ApiError(0, 'The server cannot be reached.');
    }
    const type = response.headers.get('Content-Type') || '';
    const data = type.includes('json') ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      const detail = (data && (data.detail || data.title)) || response.statusText;
      throw new ApiError(response.status, detail || `HTTP ${response.status}`);
    }
    return data;
  }

  const seg = encodeURIComponent;
  const runPath = (turn, tail) => `/agents/${seg(turn.agentId)}/runs/${seg(turn.runId)}${tail}`;

  function say(text, isError = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle('error', isError);
  }

  // Markdown: the text is escaped first, then a small safe subset is turned into tags ----

  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => (
    { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

  function inline(text) {
    const codes = [];
    let html = escapeHtml(text).replace(/`([^`\n]+)`/g, (_, code) => {
      codes.push(code);
      return `\u0000${codes.length - 1}\u0000`;
    });
    html = html
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
      .replace(/\*\*([^*\n]+)\*\*/g, '<strong>$1</strong>')
      .replace(/__([^_\n]+)__/g, '<strong>$1</strong>')
      .replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\w)/g, '$1<em>$2</em>')
      .replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?!\w)/g, '$1<em>$2</em>');
    return html.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
  }

  function markdown(source) {
    const out = [];
    const lines = source.replace(/\r\n?/g, '\n').split('\n');
    let paragraph = [];
    let list = null; // {tag, items}
    const flush = () => {
      if (paragraph.length) out.push(`<p>${paragraph.map(inline).join('<br>')}</p>`);
      paragraph = [];
      if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join('')}</${list.tag}>`);
      list = null;
    };
    for (let i = 0; i < lines.length; i += 1) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flush();
        const code = [];
        for (i += 1; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i += 1) code.push(lines[i]);
        out.push(`<pre><code>${escapeHtml(code.join('\n'))}</code></pre>`);
        continue;
      }
      const heading = line.match(/^(#{1,4})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        flush();
        const level = heading[1].length + 2; // h3..h6 inside a message
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        const tag = bullet ? 'ul' : 'ol';
        if (paragraph.length || (list && list.tag !== tag)) flush();
        list = list || { tag, items: [] };
        list.items.push((bullet || numbered)[1]);
      } else if (!line.trim()) {
        flush();
      } else if (list && /^\s+\S/.test(line)) {
        list.items[list.items.length - 1] += ` ${line.trim()}`;
      } else {
        if (list) flush();
        paragraph.push(line);
      }
    }
    flush();
    return out.join('');
  }

  // Turns: one user message and the run that answers it -----------------------------------

  const newTurn = (fields) => ({
    runId: null, agentId: state.agentId, sessionId: state.sessionId, message: '',
    reasoning: '', content: '', tools: [], followups: [], status: 'running',
    error: '', required: null, lastId: 0, ...fields,
  });

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const pretty = (value) => (typeof value === 'string' ? value : JSON.stringify(value, null, 2));

  function turnElement(turn) {
    const item = el('li', 'turn');
    item.append(el('div', 'bubble user', turn.message));
    const answer = el('div', 'bubble agent');
    const reasoning = el('details', 'reasoning');
    const summary = el('summary');
    summary.append(el('span', 'spinner'), el('span', 'label', 'Thinking…'));
    reasoning.append(summary, el('div', 'reasoning-text'));
    answer.append(reasoning, el('div', 'tools'), el('div', 'markdown'), el('div', 'approval'),
      el('div', 'followups'), el('p', 'turn-note'));
    item.append(answer);
    item.turnParts = {
      reasoning, label: summary.querySelector('.label'), reasoningText: reasoning.lastChild,
      tools: answer.querySelector('.tools'), answer: answer.querySelector('.markdown'),
      approval: answer.querySelector('.approval'), followups: answer.querySelector('.followups'),
      note: answer.querySelector('.turn-note'),
    };
    return item;
  }

  function toolChip(tool) {
    const chip = el('details', `tool ${tool.error ? 'failed' : tool.done ? 'done' : 'running'}`);
    const summary = el('summary');
    const state = tool.error ? 'failed' : tool.done ? 'done' : 'running…';
    summary.append(el('span', 'tool-name', tool.name), el('span', 'tool-state', state));
    chip.append(summary, el('h4', '', 'Arguments'), el('pre', '', pretty(tool.arguments)));
    if (tool.done) {
      chip.append(el('h4', '', tool.error ? 'Error' : 'Result'),
        el('pre', tool.error ? 'error' : '', pretty(tool.error || tool.result)));
    }
    return chip;
  }

  function render(turn, item) {
    const parts = item.turnParts;
    const running = turn.status === 'running';
    const thinking = running && !turn.content;
    parts.reasoning.hidden = !thinking && !turn.reasoning;
    parts.reasoning.classList.toggle('thinking', thinking);
    parts.label.textContent = thinking ? 'Thinking…' : 'Reasoning';
    parts.reasoningText.textContent = turn.reasoning;
    // Chips are redrawn only when a call changes, so an open one stays open.
    const key = JSON.stringify(turn.tools.map((t) => [t.done, t.error]));
    if (parts.toolsKey !== key) {
      const open = [...parts.tools.children].map((chip) => chip.open);
      parts.tools.replaceChildren(...turn.tools.map((tool, i) => {
        const chip = toolChip(tool);
        chip.open = Boolean(open[i]);
        return chip;
      }));
      parts.toolsKey = key;
    }
    if (parts.answerSource !== turn.content) {
      parts.answer.innerHTML = markdown(turn.content);
      parts.answerSource = turn.content;
    }
    renderApproval(turn, parts.approval);
    parts.followups.replaceChildren(...(turn.status === 'done' ? turn.followups : []).map((text) => {
      const button = el('button', 'followup', text);
      button.type = 'button';
      button.addEventListener('click', () => sendMessage(text));
      return button;
    }));
    const notes = {
      cancelled: 'Cancelled.', lost: 'The connection was lost.', error: `Error: ${turn.error}`,
    };
    parts.note.textContent = notes[turn.status] || '';
    parts.note.className = `turn-note ${turn.status}`;
    if (turn.status === 'lost') {
      const retry = el('button', 'quiet', 'Reconnect');
      retry.type = 'button';
      retry.addEventListener('click', () => { turn.status = 'running'; follow(turn); update(); });
      parts.note.append(' ', retry);
    }
    item.dataset.status = turn.status;
  }

  function renderApproval(turn, box) {
    if (turn.status !== 'paused') { box.replaceChildren(); box.hidden = true; return; }
    if (box.dataset.runId === turn.runId && box.dataset.lastId === String(turn.lastId) && !box.hidden) return;
    box.dataset.runId = turn.runId;
    box.dataset.lastId = String(turn.lastId);
    box.hidden = false;
    const action = turn.required || {};
    const heading = el('p', 'approval-title');
    heading.append('The agent wants to run ', el('strong', '', action.tool || 'a tool'));
    box.setAttribute('role', 'group');
    box.setAttribute('aria-label', 'Approve the tool call');
    const approve = el('button', 'approve', 'Approve');
    const reject = el('button', 'danger', 'Reject');
    approve.type = 'button';
    reject.type = 'button';
    approve.addEventListener('click', () => decide(turn, 'APPROVE', [approve, reject]));
    reject.addEventListener('click', () => decide(turn, 'REJECT', [approve, reject]));
    const buttons = el('div', 'approval-buttons');
    buttons.append(approve, reject);
    box.replaceChildren(heading, el('pre', '', pretty(action.arguments ?? {})), buttons);
  }

  // The conversation on screen: history of the session, then the turn under way.
  let current = null; // {turn, item}
  let frame = 0;

  function update() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      if (current) render(current.turn, current.item);
      const busy = Boolean(current && ['running', 'paused'].includes(current.turn.status));
      ui.send.disabled = busy;
      ui.cancel.hidden = !busy;
      ui.agent.disabled = busy;
    });
  }

  // An empty conversation says who answers.
  function showWelcome() {
    const agent = agents.find((a) => a.id === state.agentId);
    if (!agent) return;
    const item = el('li', 'empty');
    item.append(el('strong', '', agent.name || agent.id), agent.description || '');
    ui.messages.append(item);
  }

  function show(turn) {
    ui.messages.querySelector('.empty')?.remove();
    const item = turnElement(turn);
    ui.messages.append(item);
    render(turn, item);
    return item;
  }

  function historyTurns(messages, skipRunId) {
    const turns = [];
    const byCall = {};
    for (const message of messages) {
      if (skipRunId && message.runId === skipRunId) continue;
      if (message.role === 'user') {
        turns.push(newTurn({ message: message.content, status: 'done', runId: message.runId }));
        continue;
      }
      const turn = turns[turns.length - 1];
      if (!turn) continue;
      if (message.role === 'assistant') {
        for (const call of message.toolCalls || []) {
          const tool = { name: call.name, arguments: call.arguments, done: false };
          byCall[call.id] = tool;
          turn.tools.push(tool);
        }
        if (message.content) turn.content += (turn.content ? '\n\n' : '') + message.content;
      } else if (message.role === 'tool' && byCall[message.toolCallId]) {
        Object.assign(byCall[message.toolCallId], { done: true, result: message.content });
      }
    }
    for (const turn of turns) for (const tool of turn.tools) tool.done = true;
    return turns;
  }

  // Following a run's events ---------------------------------------------------------------

  let source = null;
  let generation = 0;

  function closeStream() {
    generation += 1;
    if (source) source.close();
    source = null;
  }

  async function follow(turn) {
    closeStream();
    const mine = generation;
    let token;
    try {
      token = await api('POST', runPath(turn, '/events/token'));
    } catch (error) {
      if (mine !== generation) return;
      retryLater(turn, error);
      return;
    }
    if (mine !== generation) return;
    // After a reload the URL says where to start; on its own reconnects EventSource sends
    // Last-Event-ID, and the server resumes after the later of the two.
    const url = turn.lastId ? `${token.url}&after=${turn.lastId}` : token.url;
    const stream = new EventSource(url);
    source = stream;
    stream.onmessage = (message) => onEvent(turn, message);
    stream.onerror = () => {
      if (mine !== generation) return;
      if (stream.readyState === EventSource.CLOSED) {
        // Refused (an expired stream token's 401, a server error): a new token, then again.
        retryLater(turn, new ApiError(0, 'The stream was refused.'));
        return;
      }
      // Dropped: EventSource reconnects by itself, sending Last-Event-ID.
      turn.failures = (turn.failures || 0) + 1;
      if (turn.failures > MAX_RETRIES) lose(turn);
    };
  }

  function retryLater(turn, error) {
    turn.failures = (turn.failures || 0) + 1;
    if (error.status === 401 || error.status === 404 || turn.failures > MAX_RETRIES) {
      lose(turn, error.status ? error.message : '');
      return;
    }
    const mine = generation;
    setTimeout(() => { if (mine === generation) follow(turn); }, Math.min(500 * turn.failures, 4000));
  }

  function lose(turn, message) {
    closeStream();
    turn.status = message ? 'error' : 'lost';
    turn.error = message || '';
    save();
    update();
  }

  function onEvent(turn, message) {
    const id = Number(message.lastEventId);
    if (!(id > turn.lastId)) return; // seen already
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    turn.failures = 0;
    const data = event.data;
    const json = () => { try { return JSON.parse(data || '{}'); } catch { return {}; } };
    switch (event.event) {
      case 'START': {
        const started = json();
        if (started.sessionId && !turn.sessionId) turn.sessionId = started.sessionId;
        break;
      }
      case 'REASONING_DELTA': turn.reasoning += data; break;
      case 'CONTENT_DELTA': turn.content += data; break;
      case 'TOOL_START': {
        const call = json();
        turn.tools.push({ name: call.name, arguments: call.arguments, done: false });
        break;
      }
      case 'TOOL_END': {
        const call = json();
        const tool = turn.tools.find((t) => !t.done && t.name === call.name)
          || turn.tools.find((t) => !t.done);
        if (tool) Object.assign(tool, { done: true, result: call.result, error: call.error || '' });
        break;
      }
      case 'STOP': {
        const stop = data ? json() : {};
        closeStream();
        if (stop.reason === 'paused') {
          turn.status = 'paused';
          turn.required = stop.requiredAction || null;
        } else {
          turn.status = stop.reason === 'cancelled' ? 'cancelled' : 'done';
          turn.followups = stop.followups || [];
        }
        break;
      }
      case 'ERROR':
        closeStream();
        turn.status = 'error';
        turn.error = data;
        break;
      default:
        break;
    }
    turn.lastId = id;
    // The turn and the id of its last event are stored together: a reload resumes after it.
    state.turn = ['running', 'paused'].includes(turn.status) ? turn : null;
    save();
    if (turn.status !== 'running') refreshSessions();
    update();
  }

  async function decide(turn, action, buttons) {
    for (const button of buttons) button.disabled = true;
    say(action === 'APPROVE' ? 'Approved; the run goes on…' : 'Rejected; the run goes on…');
    let failed = null;
    // The answer comes once the run stops again: its events are followed meanwhile, from the
    // moment it has left PAUSED (asked before, /events would end at the pause).
    api('POST', runPath(turn, '/continue'), { action }).catch((error) => { failed = error; });
    for (let i = 0; i < 200 && !failed; i += 1) {
      const run = await api('GET', runPath(turn, '/status')).catch(() => null);
      if (run && run.status !== 'PAUSED') break;
      await new Promise((resolve) => setTimeout(resolve, 150));
    }
    if (failed) {
      say(failed.message, true);
      for (const button of buttons) button.disabled = false;
      return;
    }
    say('');
    turn.status = 'running';
    turn.required = null;
    save();
    update();
    follow(turn);
  }

  // Sending, cancelling, sessions -----------------------------------------------------------

  async function sendMessage(text) {
    const message = text.trim();
    if (!message || (current && ['running', 'paused'].includes(current.turn.status))) return;
    const turn = newTurn({ message });
    const item = show(turn);
    current = { turn, item };
    ui.message.value = '';
    update();
    item.scrollIntoView({ block: 'end' });
    try {
      const body = { message, generateFollowups: ui.followups.checked };
      if (state.sessionId) body.sessionId = state.sessionId;
      const queued = await api('POST', `/agents/${seg(state.agentId)}/runs/background`, body);
      Object.assign(turn, { runId: queued.runId, sessionId: queued.sessionId });
      state.sessionId = queued.sessionId;
      if (!state.titles[queued.sessionId]) state.titles[queued.sessionId] = message.slice(0, 60);
      state.turn = turn;
      save();
      say('');
      refreshSessions();
      follow(turn);
    } catch (error) {
      turn.status = 'error';
      turn.error = error.message;
      ui.message.value = message;
      if (error.status === 401) signOut(error.message);
    }
    update();
  }

  async function cancelRun() {
    if (!current || !current.turn.runId) return;
    ui.cancel.disabled = true;
    say('Stopping…');
    try {
      await api('DELETE', runPath(current.turn, ''));
      if (current.turn.status === 'paused') {
        // A paused run stops at once; its stream ended at the pause, so read the rest.
        current.turn.status = 'running';
        follow(current.turn);
      }
      say('');
    } catch (error) {
      say(error.message, true);
    } finally {
      ui.cancel.disabled = false;
    }
  }

  async function refreshSessions() {
    try {
      const page = await api('GET', `/sessions?agentId=${seg(state.agentId)}&limit=50`);
      ui.sessions.replaceChildren(...page.items.map((session) => {
        const item = el('li');
        const button = el('button', 'session');
        button.type = 'button';
        const when = new Date(session.updatedAt).toLocaleString([], {
          month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
        });
        button.append(el('span', 'session-title', state.titles[session.id] || `Session ${session.id.slice(0, 8)}`),
          el('span', 'session-time', when));
        button.dataset.id = session.id;
        if (session.id === state.sessionId) button.setAttribute('aria-current', 'true');
        button.addEventListener('click', () => { openSession(session.id); closePanel(); });
        item.append(button);
        return item;
      }));
      if (!page.items.length) ui.sessions.append(el('li', 'muted', 'No sessions yet.'));
      nameSessions(page.items.filter((session) => !state.titles[session.id]).slice(0, 10));
    } catch (error) {
      say(error.message, true);
    }
  }

  // Sessions begun elsewhere are named after their first message, read once.
  async function nameSessions(sessions) {
    if (!sessions.length) return;
    const named = await Promise.all(sessions.map((session) => api('GET', `/sessions/${seg(session.id)}`)
      .then((detail) => {
        const first = detail.messages.find((m) => m.role === 'user');
        if (first) state.titles[session.id] = first.content.slice(0, 60);
        return Boolean(first);
      })
      .catch(() => false)));
    if (named.some(Boolean)) {
      save();
      for (const button of ui.sessions.querySelectorAll('button.session')) {
        const title = state.titles[button.dataset.id];
        if (title) button.querySelector('.session-title').textContent = title;
      }
    }
  }

  async function openSession(sessionId) {
    closeStream();
    current = null;
    state.sessionId = sessionId;
    const stored = state.turn && state.turn.sessionId === sessionId ? state.turn : null;
    state.turn = stored;
    save();
    ui.messages.replaceChildren();
    if (!sessionId) { showWelcome(); update(); refreshSessions(); return; }
    let session;
    try {
      session = await api('GET', `/sessions/${seg(sessionId)}`);
    } catch (error) {
      say(error.message, true);
      if (error.status === 404) { state.sessionId = null; state.turn = null; save(); }
      return;
    }
    // The run under way: the one this tab was following, else one started elsewhere.
    let turn = stored;
    if (!turn && session.activeRunId) {
      const first = session.messages.find((m) => m.runId === session.activeRunId && m.role === 'user');
      turn = newTurn({
        runId: session.activeRunId, sessionId, agentId: session.agentId,
        message: first ? first.content : '',
      });
    }
    for (const past of historyTurns(session.messages, turn && turn.runId)) show(past);
    if (turn) {
      current = { turn, item: show(turn) };
      if (turn.status === 'running') follow(turn);
    }
    update();
    refreshSessions();
    ui.messages.lastElementChild?.scrollIntoView({ block: 'end' });
  }

  // Signing in, agents, the page's controls --------------------------------------------------

  function signOut(message = '') {
    closeStream();
    current = null;
    state = { titles: state.titles };
    save();
    ui.workspace.hidden = true;
    ui.controls.hidden = true;
    ui.toggle.hidden = true;
    ui.login.hidden = false;
    ui.loginError.textContent = message;
    ui.token.value = '';
    ui.token.focus();
  }

  async function signIn() {
    try {
      agents = await api('GET', '/agents');
    } catch (error) {
      signOut(error.status === 401
        ? `That token was refused: ${error.message}`
        : `Could not list the agents: ${error.message}`);
      return;
    }
    ui.login.hidden = true;
    ui.workspace.hidden = false;
    ui.controls.hidden = false;
    ui.toggle.hidden = false;
    ui.agent.replaceChildren(...agents.map((agent) => {
      const option = el('option', '', agent.name || agent.id);
      option.value = agent.id;
      option.title = agent.description || '';
      return option;
    }));
    if (!agents.some((agent) => agent.id === state.agentId)) {
      state.agentId = agents.length ? agents[0].id : null;
      state.sessionId = null;
    }
    ui.agent.value = state.agentId || '';
    save();
    await openSession(state.sessionId || null);
    ui.message.focus();
  }

  function closePanel() {
    document.body.classList.remove('sessions-open');
    ui.toggle.setAttribute('aria-expanded', 'false');
  }

  ui.loginForm.addEventListener('submit', (event) => {
    event.preventDefault();
    state.token = ui.token.value.trim();
    save();
    signIn();
  });
  ui.signOut.addEventListener('click', () => signOut());
  ui.agent.addEventListener('change', () => {
    state.agentId = ui.agent.value;
    openSession(null);
  });
  ui.newChat.addEventListener('click', () => { openSession(null); ui.message.focus(); });
  ui.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    sendMessage(ui.message.value);
  });
  ui.message.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage(ui.message.value);
    }
  });
  ui.cancel.addEventListener('click', cancelRun);
  ui.toggle.addEventListener('click', (event) => {
    event.stopPropagation();
    const open = document.body.classList.toggle('sessions-open');
    ui.toggle.setAttribute('aria-expanded', String(open));
  });
  // On a phone the sessions cover the chat: a click beside them or Escape puts them away.
  document.addEventListener('click', (event) => {
    if (document.body.classList.contains('sessions-open') && !ui.panel.contains(event.target)) closePanel();
  });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && document.body.classList.contains('sessions-open')) {
      closePanel();
      ui.toggle.focus();
    }
  });

  if (state.token) signIn(); else signOut();
})();
