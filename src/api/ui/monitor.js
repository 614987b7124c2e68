'use strict';
// The live monitor page: reads callbridge's own API with the bearer token
// the user gives once (kept in sessionStorage, sent only in the
// Authorization header) and follows GET /v1/events with fetch() and a
// stream reader (EventSource cannot send that header). Every value from the
// API reaches the page as text (textContent), never as markup.
(() => {
  const TOKEN_KEY = 'callbridge.token';
  const ENDED_KEPT = 50;
  const $ = (sel) => document.querySelector(sel);
  const st = {
    token: null,
    groups: [],
    agents: [],
    live: new Map(),
    ended: [],
    stuck: new Set(),
    missed: new Map(),
    offered: new Map(),
    lines: new Map(),
    lastId: null,
    clock: null,
    events: 0,
    stream: null,
    backoff: 1000,
    timers: [],
    pending: new Map(),
  };

  // ---- the token ----------------------------------------------------
  function askToken(message) {
    stopAll();
    $('#app').hidden = true;
    $('#forget').hidden = true;
    $('#login').hidden = false;
    $('#login-msg').textContent = message || '';
    setStatus('off', 'Not connected');
    const input = $('#token');
    input.value = '';
    input.focus();
  }

  function forget(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    st.token = null;
    askToken(message);
  }

  $('#login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = $('#token').value.trim();
    if (!token) {
      $('#login-msg').textContent = 'Enter the API token.';
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    st.token = token;
    start();
  });
  $('#forget').addEventListener('click', () => forget('Token forgotten.'));

  class Unauthorized extends Error {}

  async function api(path, options = {}) {
    const headers = { Authorization: 'Bearer ' + st.token };
    if (options.body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(path, { ...options, headers, cache: 'no-store' });
    if (r.status === 401) {
      forget('The token was refused: enter it again.');
      throw new Unauthorized();
    }
    return r;
  }

  async function json(path) {
    const r = await api(path);
    if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
    return r.json();
  }

  // ---- the PBX's clock (replays run in the trace's time) ---------------
  function sawTime(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return;
    const now = Date.now();
    if (!st.clock || t >= pbxNow()) st.clock = { pbx: t, at: now };
  }
  function pbxNow() {
    return st.clock ? st.clock.pbx + (Date.now() - st.clock.at) : Date.now();
  }
  function duration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const two = (n) => String(n).padStart(2, '0');
    return h > 0 ? h + ':' + two(m) + ':' + two(r) : m + ':' + two(r);
  }

  // ---- loading ---------------------------------------------------------
  async function start() {
    $('#login').hidden = true;
    $('#app').hidden = false;
    $('#forget').hidden = false;
    setStatus('retry', 'Connecting…');
    try {
      await loadAgents();
      await loadCalls();
      await loadIndicators();
    } catch (e) {
      if (e instanceof Unauthorized) return;
      setStatus('retry', 'Cannot read the API: ' + e.message);
    }
    connect();
    st.timers.push(setInterval(tick, 1000));
    st.timers.push(setInterval(() => { loadAgents().catch(() => {}); loadIndicators().catch(() => {}); }, 15000));
  }

  function stopAll() {
    if (st.stream) st.stream.abort();
    st.stream = null;
    st.timers.forEach(clearInterval);
    st.timers = [];
  }

  async function loadAgents() {
    const list = await json('/v1/agents');
    st.agents = list.agents;
    const groups = new Set();
    for (const a of st.agents) for (const g of a.groups) groups.add(g);
    st.groups = [...groups].sort();
    renderAgents();
  }

  async function loadCalls() {
    const live = new Map();
    let cursor = null;
    do {
      const page = await json('/v1/calls?limit=1000' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : ''));
      for (const c of page.calls) {
        live.set(c.id, c);
        sawTime(c.answered_at || c.started_at);
      }
      cursor = page.next_cursor;
    } while (cursor);
    st.live = live;
    for (const id of [...st.stuck]) if (!live.has(id)) st.stuck.delete(id);
    renderCalls();
  }

  async function loadIndicators() {
    const all = await Promise.all(st.groups.map((g) => json('/v1/groups/' + encodeURIComponent(g) + '/indicators')));
    renderGroups(all);
  }

  // Several events in a row: one reload.
  function soon(key, fn, ms) {
    if (st.pending.has(key)) return;
    st.pending.set(key, setTimeout(() => {
      st.pending.delete(key);
      fn().catch(() => {});
    }, ms));
  }

  // ---- the event stream ------------------------------------------------
  async function connect() {
    const ctl = new AbortController();
    st.stream = ctl;
    const headers = { Authorization: 'Bearer ' + st.token, Accept: 'text/event-stream' };
    if (st.lastId) headers['Last-Event-ID'] = st.lastId;
    try {
      const r = await fetch('/v1/events', { headers, signal: ctl.signal, cache: 'no-store' });
      if (r.status === 401) {
        forget('The token was refused: enter it again.');
        return;
      }
      if (!r.ok || !r.body) throw new Error('HTTP ' + r.status);
      setStatus('live', 'Live');
      st.backoff = 1000;
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          onMessage(block);
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    if (st.stream !== ctl) return;
    setStatus('retry', 'Reconnecting…');
    setTimeout(() => { if (st.stream === ctl) connect(); }, st.backoff);
    st.backoff = Math.min(st.backoff * 2, 30000);
  }

  function onMessage(block) {
    let id = null, type = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (!line || line[0] === ':') continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'id') id = value;
      else if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (id === null && data.length === 0) return;
    if (id !== null) st.lastId = id;
    if (type === 'reset') {
      // Events were missed: start over from the current state.
      soon('calls', loadCalls, 0);
      soon('agents', loadAgents, 0);
      soon('indicators', loadIndicators, 0);
      return;
    }
    let e;
    try {
      e = JSON.parse(data.join('\n'));
    } catch (_) {
      return;
    }
    onEvent(e);
  }

  function onEvent(e) {
    st.events += 1;
    $('#events-count').textContent = String(st.events);
    sawTime(e.time);
    const d = e.data || {};
    if (e.type.startsWith('call.')) {
      const c = d.call;
      if (!c) return;
      if (e.type === 'call.missed') st.missed.set(c.id, d.reason);
      if (e.type === 'call.stuck') st.stuck.add(c.id);
      if (e.type === 'call.offered') st.offered.set(c.id, d.agent);
      if (e.type === 'call.offer_ended' || e.type === 'call.answered') st.offered.delete(c.id);
      if (e.type === 'call.ended') {
        st.live.delete(c.id);
        st.stuck.delete(c.id);
        st.ended.unshift({ call: c, endReason: d.end_reason, missed: st.missed.get(c.id) });
        st.missed.delete(c.id);
        st.offered.delete(c.id);
        st.ended.length = Math.min(st.ended.length, ENDED_KEPT);
      } else {
        st.live.set(c.id, c);
      }
      renderCalls();
      soon('indicators', loadIndicators, 300);
      soon('agents', loadAgents, 600);
    } else if (e.type === 'agent.line') {
      st.lines.set(d.agent, d.state);
      renderAgents();
    } else if (e.type === 'agent.availability') {
      soon('agents', loadAgents, 100);
    }
  }

  // ---- rendering -------------------------------------------------------
  function setStatus(state, text) {
    const s = $('#status');
    s.dataset.state = state;
    s.textContent = text;
  }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function renderGroups(all) {
    const box = $('#groups');
    box.replaceChildren();
    for (const g of all) {
      const card = el('article', null, 'group');
      card.dataset.group = g.group;
      card.setAttribute('aria-labelledby', 'group-' + g.group);
      const h = el('h3', g.group);
      h.id = 'group-' + g.group;
      card.append(h);
      const dl = el('dl');
      const row = (label, key, value, big) => {
        dl.append(el('dt', label));
        const dd = el('dd', value, big ? 'big' : '');
        dd.dataset.indicator = key;
        dl.append(dd);
      };
      row('Waiting now', 'waiting_now', g.waiting_now, true);
      row('Talking now', 'talking_now', g.talking_now, true);
      row('Offered today', 'offered', g.offered);
      row('Answered', 'answered', g.answered);
      row('Missed', 'missed', g.missed);
      const reasons = Object.entries(g.missed_by_reason || {}).filter(([, n]) => n > 0);
      const why = el('dd', reasons.length ? reasons.map(([r, n]) => r.replace(/_/g, ' ') + ': ' + n).join(' · ') : 'no missed calls', 'reasons');
      why.dataset.indicator = 'missed_by_reason';
      dl.append(el('dt', 'Missed by reason', 'sr-only'), why);
      row('Average wait', 'average_wait_seconds', Math.round(g.average_wait_seconds) + ' s');
      row('Longest wait', 'max_wait_seconds', g.max_wait_seconds + ' s');
      row('Service level (' + g.service_level_seconds + ' s)', 'service_level',
        g.service_level === null ? '—' : Math.round(g.service_level * 100) + ' %');
      card.append(dl);
      box.append(card);
    }
  }

  function caller(c) {
    const p = c.direction === 'outbound' ? c.callee : c.caller;
    const who = [p.number || 'unknown', p.name].filter(Boolean).join(' · ');
    return c.direction === 'outbound' ? '→ ' + who : who;
  }

  function recordingCell(url) {
    const td = el('td');
    if (!url) return td;
    if (/^https?:\/\//i.test(url)) {
      const a = el('a', 'Recording');
      a.href = url;
      a.rel = 'noopener noreferrer';
      a.target = '_blank';
      td.append(a);
    } else {
      td.textContent = url;
    }
    return td;
  }

  function renderCalls() {
    const body = $('#calls tbody');
    body.replaceChildren();
    const live = [...st.live.values()].sort((a, b) => Date.parse(a.started_at) - Date.parse(b.started_at));
    for (const c of live) body.append(callRow(c, null));
    for (const e of st.ended) body.append(callRow(e.call, e));
    $('#no-calls').hidden = live.length + st.ended.length > 0;
  }

  function callRow(c, ended) {
    const tr = el('tr');
    tr.dataset.callId = c.id;
    tr.dataset.state = c.state;
    const stuck = !ended && st.stuck.has(c.id);
    if (stuck) tr.classList.add('stuck');
    tr.append(el('td', caller(c)), el('td', c.group || '—'));
    const state = el('td', null, 'state-' + c.state);
    let text = c.state;
    if (ended && ended.missed) text = 'missed: ' + ended.missed.replace(/_/g, ' ');
    else if (ended && ended.endReason && ended.endReason !== 'normal') text = 'ended: ' + ended.endReason;
    state.append(document.createTextNode(text));
    if (stuck) state.append(' ', el('span', 'stuck', 'badge stuck'));
    const ringing = !ended && !c.agent ? st.offered.get(c.id) : null;
    tr.append(state, el('td', c.agent || (ringing ? ringing + ' (offered)' : '—')));
    const time = el('td', null, 'num');
    time.dataset.started = c.started_at;
    if (c.ended_at) time.dataset.ended = c.ended_at;
    time.textContent = elapsed(time);
    tr.append(time, el('td', c.ticket_id || '—'), recordingCell(ended ? c.recording : null));
    const actions = el('td');
    if (stuck) {
      const b = el('button', 'Remove…', 'danger');
      b.type = 'button';
      b.dataset.remove = c.id;
      b.setAttribute('aria-label', 'Remove the stuck call from ' + caller(c));
      b.addEventListener('click', () => confirmRemove(c));
      actions.append(b);
    }
    tr.append(actions);
    return tr;
  }

  function elapsed(cell) {
    const from = Date.parse(cell.dataset.started);
    const to = cell.dataset.ended ? Date.parse(cell.dataset.ended) : pbxNow();
    return duration(to - from);
  }

  function tick() {
    for (const cell of document.querySelectorAll('#calls td[data-started]')) {
      if (!cell.dataset.ended) cell.textContent = elapsed(cell);
    }
  }

  function renderAgents() {
    const body = $('#agents tbody');
    body.replaceChildren();
    for (const a of st.agents) {
      const tr = el('tr');
      tr.dataset.agent = a.id;
      const name = el('td', a.name ? a.name + ' (' + a.id + ')' : a.id);
      const takes = el('td', a.available ? 'yes' : 'no', a.available ? 'yes' : 'no');
      takes.dataset.field = 'available';
      const sw = el('td', a.helpdesk_available ? 'on' : 'off');
      sw.dataset.field = 'helpdesk_available';
      const paused = el('td', a.paused_queues.length ? 'paused in ' + a.paused_queues.join(', ') : 'no');
      const device = el('td', a.device_unavailable ? 'unavailable' : 'ok', a.device_unavailable ? 'no' : '');
      const call = a.current_call ? 'on a call (' + a.current_call.state + ')' : null;
      const line = el('td', st.lines.get(a.id) || call || 'idle');
      const b = el('button', a.helpdesk_available ? 'Switch off' : 'Switch on');
      b.type = 'button';
      b.dataset.toggle = a.id;
      // The name says what a press does, and to whom (it starts with the visible text).
      b.setAttribute('aria-label', b.textContent + ' ' + (a.name || a.id) + ' (available for calls)');
      b.addEventListener('click', () => toggle(a, b));
      const actions = el('td');
      actions.append(b);
      tr.append(name, el('td', a.groups.join(', ')), takes, sw, paused, device, line, actions);
      body.append(tr);
    }
  }

  // ---- actions ---------------------------------------------------------
  async function toggle(agent, button) {
    const want = !agent.helpdesk_available;
    button.disabled = true;
    const msg = $('#agent-msg');
    try {
      const r = await api('/v1/agents/' + encodeURIComponent(agent.id) + '/availability', {
        method: 'PUT',
        body: JSON.stringify({ available: want }),
      });
      const body = await r.json();
      if (r.ok) {
        const refused = (body.queues || []).filter((q) => !q.ok);
        msg.textContent = (agent.name || agent.id) + ' switched ' + (want ? 'on' : 'off') +
          (refused.length ? '; not told to queue ' + refused.map((q) => q.queue + ' (' + q.error.code + ')').join(', ') : '');
      } else {
        msg.textContent = 'Not switched: ' + (body.error ? body.error.message : 'HTTP ' + r.status);
      }
      await loadAgents();
    } catch (e) {
      if (!(e instanceof Unauthorized)) msg.textContent = 'Not switched: ' + e.message;
    } finally {
      button.disabled = false;
    }
  }

  function confirmRemove(c) {
    const dialog = $('#confirm');
    $('#confirm-text').textContent = 'The call from ' + caller(c) + ' (' + c.id + ', ' + c.state +
      ') ends for the helpdesk as removed. Do this only for a call that has ended on the phones.';
    const done = () => {
      $('#confirm-remove').onclick = null;
      $('#confirm-cancel').onclick = null;
    };
    $('#confirm-cancel').onclick = () => { done(); dialog.close(); };
    $('#confirm-remove').onclick = async () => {
      done();
      dialog.close();
      const msg = $('#call-msg');
      try {
        const r = await api('/v1/calls/' + encodeURIComponent(c.id), { method: 'DELETE' });
        if (r.ok) {
          msg.textContent = 'Call ' + c.id + ' removed.';
        } else {
          const body = await r.json().catch(() => ({}));
          msg.textContent = 'Not removed: ' + (body.error ? body.error.message : 'HTTP ' + r.status);
        }
        soon('calls', loadCalls, 200);
      } catch (e) {
        if (!(e instanceof Unauthorized)) msg.textContent = 'Not removed: ' + e.message;
      }
    };
    dialog.showModal();
    $('#confirm-cancel').focus();
  }

  // ---- start -----------------------------------------------------------
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    st.token = saved;
    start();
  } else {
    askToken('');
  }
})();
