// tooti console: the few things a page does after it loads. No framework, no inline
// script (the CSP forbids both): copy buttons, confirmations, and the live tables that
// follow the gateway's event stream (GET /console/admin/events: the snapshot, then every
// peer and request event, the same stream `tooti tui` reads). Values are written with
// textContent, never parsed as HTML: a node's model names are someone else's text.
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, digits) {
  if (value === undefined || value === null || value === "") return "–";
  if (typeof value === "number") return digits === undefined ? String(value) : value.toFixed(digits);
  return String(value);
}

function setupCopy() {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", () => {
      const source = document.querySelector(button.dataset.copy);
      if (!source) return;
      const text = source.textContent || "";
      const done = () => { button.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, () => selectText(source));
      } else {
        selectText(source);
      }
    });
  }
}

function selectText(node) {
  const range = document.createRange();
  range.selectNodeContents(node);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

function setupConfirm() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

// ---------------------------------------------------------------- live views

const live = {
  peers: new Map(),
  requests: new Map(),
  seq: 0,
  tables: [],
  maxRequests: 200,
};

function measured(peer, key) {
  // The gateway's own measurement per model (EWMA): the best of the node's models.
  let best = null;
  for (const info of Object.values(peer.per_model || {})) {
    const value = info[key];
    if (typeof value === "number" && (best === null || (key === "ttft_ms" ? value < best : value > best))) best = value;
  }
  return best;
}

function peerFromDescribe(peer) {
  const models = peer.models || [];
  return {
    id: peer.id, role: peer.role, via: peer.via || "", state: peer.state || "live",
    group: peer.group || "", owner: peer.owner || "", models: models.join(", "),
    in_flight: peer.in_flight || 0, rtt_ms: peer.rtt_ms,
    ttft_ms: measured(peer, "ttft_ms"),
    tok_s: measured(peer, "tokens_per_s"),
  };
}

function applySnapshot(data) {
  live.seq = data.seq || 0;
  live.peers.clear();
  for (const peer of data.peers || []) live.peers.set(peer.id, peerFromDescribe(peer));
  live.requests.clear();
  for (const req of (data.requests || []).slice().reverse()) live.requests.set(req.request_id, req);
}

function applyEvent(kind, event) {
  if ((event.seq || 0) <= live.seq) return;
  live.seq = event.seq;
  const data = event.data || {};
  if (kind === "peer.joined" || kind === "peer.updated") {
    const peer = peerFromDescribe(data.peer || {});
    live.peers.set(peer.id, peer);
  } else if (kind === "peer.left") {
    const peer = live.peers.get(data.peer_id);
    if (peer) { peer.state = "gone"; peer.in_flight = 0; }
  } else if (kind.startsWith("request.")) {
    const id = data.request_id;
    if (!id) return;
    const row = live.requests.get(id) || { request_id: id };
    Object.assign(row, data);
    row.state = kind.slice("request.".length);
    row.ts = event.ts;
    live.requests.delete(id);
    live.requests.set(id, row);
    while (live.requests.size > live.maxRequests) {
      live.requests.delete(live.requests.keys().next().value);
    }
  }
}

const PEER_COLUMNS = [
  ["id", "node"], ["role", "role"], ["state", "state"], ["via", "via"],
  ["group", "group"], ["owner", "owner"], ["models", "models"],
  ["in_flight", "in flight"], ["rtt_ms", "RTT ms", 1], ["ttft_ms", "TTFT ms", 0],
  ["tok_s", "tok/s", 1],
];
const REQUEST_COLUMNS = [
  ["request_id", "request"], ["account", "account"], ["model", "model"],
  ["node", "node"], ["state", "phase"], ["status", "status"],
  ["prompt_tokens", "prompt"], ["completion_tokens", "completion"],
  ["ttft_ms", "TTFT ms", 1], ["latency_ms", "total ms", 1],
];

function renderTable(table) {
  // Rows are updated in place, keyed by id: a row's elements (and a button under the
  // pointer) stay the same nodes while events arrive; only changed cells are rewritten,
  // a peer's action buttons only when its state changes.
  const kind = table.dataset.live;
  const columns = kind === "peers" ? PEER_COLUMNS : REQUEST_COLUMNS;
  let rows = kind === "peers" ? Array.from(live.peers.values())
    : Array.from(live.requests.values()).reverse();
  if (kind === "peers" && table.dataset.role) {
    rows = rows.filter((peer) => peer.role === table.dataset.role);
  }
  const body = table.tBodies[0] || table.appendChild(el("tbody"));
  const existing = new Map();
  for (const tr of Array.from(body.rows)) {
    if (tr.dataset.id) existing.set(tr.dataset.id, tr); else tr.remove();
  }
  let previous = null;
  for (const row of rows) {
    const id = String(row.id || row.request_id);
    let tr = existing.get(id);
    existing.delete(id);
    if (!tr) {
      tr = el("tr");
      tr.dataset.id = id;
      for (let i = 0; i < columns.length; i++) tr.appendChild(el("td"));
    }
    const state = row.state ? "state-" + String(row.state).replace(/[^a-z_]/g, "") : "";
    if (tr.className !== state) tr.className = state;
    columns.forEach(([key, , digits], i) => {
      const text = fmt(row[key], digits);
      if (tr.cells[i].textContent !== text) tr.cells[i].textContent = text;
    });
    if (kind === "peers" && table.dataset.actions === "yes") {
      const actions = peerActions(row);
      const wanted = actions.length ? `${row.state}|${actions.join(",")}` : "";
      const cell = tr.cells[columns.length];
      if (!cell || cell.dataset.state !== wanted) {
        const fresh = wanted ? actionsCell(row, actions) : el("td", null, "actions");
        fresh.dataset.state = wanted;
        if (cell) tr.replaceChild(fresh, cell); else tr.appendChild(fresh);
      }
    }
    const expected = previous ? previous.nextSibling : body.firstChild;
    if (expected !== tr) body.insertBefore(tr, expected);
    previous = tr;
  }
  for (const stale of existing.values()) stale.remove();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", kind === "peers" ? "No peers connected." : "No requests yet.", "empty");
    td.colSpan = columns.length;
    tr.appendChild(td);
    body.appendChild(tr);
  }
  const count = document.querySelector(`[data-count="${kind}"]`);
  if (count) count.textContent = String(rows.length);
}

function peerActions(peer) {
  // The buttons of a peer's row, as admin_pages.peer_actions (a test compares them): a
  // node: disable (enable when disabled) and drain, no drain behind a relay (the gateway
  // refuses it: 409); a relay: drain, and enable when disabled; a gone peer: none.
  if (peer.state === "gone" || (peer.role !== "node" && peer.role !== "relay")) return [];
  if (peer.role === "relay") return peer.state === "disabled" ? ["enable", "drain"] : ["drain"];
  const first = peer.state === "disabled" ? "enable" : "disable";
  return peer.via ? [first] : [first, "drain"];
}

function actionsCell(peer, actions) {
  const td = el("td", null, "actions");
  const template = document.getElementById("peer-actions");
  if (!template) return td;
  for (const action of actions) {
    const form = template.content.firstElementChild.cloneNode(true);
    form.action = `/console/admin/nodes/${encodeURIComponent(peer.id)}/${action}`;
    form.querySelector("button").textContent = action[0].toUpperCase() + action.slice(1);
    form.dataset.confirm = `${action} ${peer.role} ${peer.id}?`;
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
    td.appendChild(form);
  }
  return td;
}

function renderAll() {
  for (const table of live.tables) renderTable(table);
}

function setupLive() {
  live.tables = Array.from(document.querySelectorAll("table[data-live]"));
  if (!live.tables.length) return;
  const source = live.tables[0].dataset.source || "/console/admin/events";
  const status = document.getElementById("live-status");
  let pending = false;
  const schedule = () => {
    if (pending) return;
    pending = true;
    window.requestAnimationFrame(() => { pending = false; renderAll(); });
  };
  const stream = new EventSource(source);
  stream.addEventListener("open", () => { if (status) status.textContent = "● live"; });
  stream.addEventListener("error", () => { if (status) status.textContent = "○ reconnecting"; });
  stream.addEventListener("snapshot", (message) => {
    applySnapshot(JSON.parse(message.data));
    schedule();
  });
  const kinds = ["peer.joined", "peer.updated", "peer.left", "peer.cooldown",
    "request.received", "request.routed", "request.first_token", "request.finished"];
  for (const kind of kinds) {
    stream.addEventListener(kind, (message) => {
      applyEvent(kind, JSON.parse(message.data));
      schedule();
    });
  }
  stream.addEventListener("dropped", () => { if (status) status.textContent = "○ reconnecting"; });
}

document.addEventListener("DOMContentLoaded", () => {
  setupCopy();
  setupConfirm();
  setupLive();
});
