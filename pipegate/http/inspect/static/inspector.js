// PipeGate request inspector: list, live feed (Server-Sent Events), details, replay.
// Recorded data comes from strangers: it is only ever set as text, never as HTML.
"use strict";

const entries = new Map();   // id -> summary
let selected = null;         // id shown in the detail pane
let current = null;          // its full entry

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function statusClass(e) {
  if (e.error && !e.status) return "fail";
  return e.status ? "s" + String(e.status)[0] : "";
}

function row(e) {
  const time = new Date(e.started * 1000).toLocaleTimeString();
  const path = el("td", { class: "path" }, e.path);
  if (e.replay_of) path.append(el("span", { class: "replay-mark" }, "replay of #" + e.replay_of));
  if (e.upgrade) path.append(el("span", { class: "replay-mark" }, "upgrade"));
  const status = e.status ? String(e.status) : (e.duration_ms === null ? "…" : "failed");
  const tr = el("tr", { "data-id": e.id },
    el("td", {}, time), el("td", {}, e.method), path,
    el("td", { class: statusClass(e) }, status),
    el("td", {}, e.duration_ms === null ? "" : String(Math.round(e.duration_ms))));
  if (e.id === selected) tr.classList.add("selected");
  tr.addEventListener("click", () => show(e.id));
  return tr;
}

function render() {
  const rows = $("rows");
  const list = [...entries.values()].sort((a, b) => Number(b.id) - Number(a.id));
  rows.replaceChildren(...list.map(row));
  $("empty").hidden = list.length > 0;
  $("count").textContent = list.length ? `${list.length} request${list.length > 1 ? "s" : ""}` : "";
}

function upsert(e) {
  entries.set(e.id, e);
  render();
  if (e.id === selected && e.duration_ms !== null && current && current.duration_ms === null) show(e.id);
}

function bytesOf(b64) {
  const raw = atob(b64);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function header(headers, name) {
  const found = headers.find(([n]) => n.toLowerCase() === name);
  return found ? found[1] : "";
}

function hexdump(bytes) {
  const lines = [];
  for (let i = 0; i < Math.min(bytes.length, 4096); i += 16) {
    const chunk = [...bytes.slice(i, i + 16)];
    const hex = chunk.map((b) => b.toString(16).padStart(2, "0")).join(" ");
    const text = chunk.map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(i.toString(16).padStart(8, "0") + "  " + hex.padEnd(48) + "  " + text);
  }
  return lines.join("\n");
}

function bodyView(part) {
  const bytes = bytesOf(part.body);
  const type = header(part.headers, "content-type").toLowerCase();
  const box = el("div", { class: "body" });
  let note = `${part.body_size} bytes`;
  if (part.body_truncated) note += ` (first ${bytes.length} kept)`;
  box.append(el("p", { class: "note" }, note));
  if (!bytes.length) return box;
  let text = null;
  try { text = new TextDecoder("utf-8", { fatal: true }).decode(bytes); } catch (err) { text = null; }
  if (text !== null && type.includes("json")) {
    try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (err) { /* truncated or not JSON */ }
    box.append(el("pre", { class: "json" }, text));
  } else if (text !== null && type.includes("application/x-www-form-urlencoded")) {
    const table = el("table", { class: "headers form" });
    for (const [k, v] of new URLSearchParams(text)) table.append(el("tr", {}, el("td", {}, k), el("td", {}, v)));
    box.append(table);
  } else if (text !== null && !type.includes("octet-stream") && !/image|audio|video|zip|gzip/.test(type)
             && header(part.headers, "content-encoding") === "") {
    box.append(el("pre", { class: "text" }, text));
  } else {
    box.append(el("p", { class: "note" }, "binary " + (type || "data") + ":"));
    box.append(el("pre", { class: "hex" }, hexdump(bytes)));
  }
  return box;
}

function partView(part, statusLine) {
  const div = el("div");
  if (statusLine) div.append(el("p", {}, statusLine));
  const table = el("table", { class: "headers" });
  for (const [n, v] of part.headers) table.append(el("tr", {}, el("td", {}, n), el("td", {}, v)));
  div.append(table, bodyView(part));
  return div;
}

async function show(id) {
  selected = id;
  for (const tr of $("rows").children) tr.classList.toggle("selected", tr.dataset.id === id);
  let e;
  try { e = await api("GET", `/api/requests/${encodeURIComponent(id)}`); }
  catch (err) { $("hint").textContent = err.message; $("detail").hidden = true; return; }
  if (selected !== id) return;
  current = e;
  $("hint").hidden = true;
  $("detail").hidden = false;
  $("title").textContent = `#${e.id} ${e.method} ${e.path}`;
  let meta = new Date(e.started * 1000).toLocaleString();
  if (e.duration_ms !== null) meta += ` · ${e.duration_ms} ms`;
  if (e.replay_of) meta += ` · replay of #${e.replay_of}`;
  if (e.upgrade) meta += ` · upgraded: ${e.bytes_to_app} bytes to the app, ${e.bytes_from_app} bytes back`;
  $("meta").textContent = meta;
  $("error").hidden = !e.error;
  $("error").textContent = e.error || "";
  $("replay").disabled = $("edit").disabled = e.upgrade;
  $("editor").hidden = true;
  $("request").replaceChildren(partView(e.request));
  $("response").replaceChildren(e.status === null ? el("p", { class: "note" }, "no response yet")
    : partView(e.response, `${e.status} ${e.response.reason || ""}`));
}

async function replay(overrides) {
  if (!current) return;
  $("replay").disabled = true;
  try {
    const e = await api("POST", `/api/requests/${encodeURIComponent(current.id)}/replay`, overrides || {});
    entries.set(e.id, e);
    render();
    show(e.id);
  } catch (err) {
    $("error").hidden = false;
    $("error").textContent = "replay failed: " + err.message;
  } finally {
    $("replay").disabled = false;
  }
}

function openEditor() {
  const e = current;
  $("ed-method").value = e.method;
  $("ed-path").value = e.path;
  $("ed-headers").value = e.request.headers.map(([n, v]) => `${n}: ${v}`).join("\n");
  let text = "";
  try { text = new TextDecoder("utf-8", { fatal: true }).decode(bytesOf(e.request.body)); } catch (err) { text = ""; }
  $("ed-body").value = text;
  $("ed-body").dataset.original = text;
  $("editor").hidden = false;
}

function sendEdited(event) {
  event.preventDefault();
  const headers = $("ed-headers").value.split("\n").filter((l) => l.includes(":")).map((l) => {
    const i = l.indexOf(":");
    return [l.slice(0, i).trim(), l.slice(i + 1).trim()];
  });
  const overrides = { method: $("ed-method").value.trim(), path: $("ed-path").value.trim(), headers };
  const body = $("ed-body").value;
  if (body !== $("ed-body").dataset.original || current.request.body_truncated) {
    const utf8 = new TextEncoder().encode(body);
    let raw = "";
    for (const b of utf8) raw += String.fromCharCode(b);
    overrides.body = btoa(raw);
  }
  $("editor").hidden = true;
  replay(overrides);
}

function connect() {
  const feed = new EventSource("/api/feed");
  feed.onopen = () => { $("live").textContent = "live"; $("live").classList.remove("off"); };
  feed.onerror = () => { $("live").textContent = "reconnecting"; $("live").classList.add("off"); };
  feed.addEventListener("request", (m) => upsert(JSON.parse(m.data)));
  feed.addEventListener("clear", () => { entries.clear(); render(); });
}

async function start() {
  $("clear").addEventListener("click", () => api("DELETE", "/api/requests").catch(() => {}));
  $("replay").addEventListener("click", () => replay({}));
  $("edit").addEventListener("click", openEditor);
  $("editor").addEventListener("submit", sendEdited);
  $("ed-cancel").addEventListener("click", () => { $("editor").hidden = true; });
  connect();
  const data = await api("GET", "/api/requests");
  for (const e of data.requests) if (!entries.has(e.id)) entries.set(e.id, e);
  render();
  document.body.dataset.ready = "1";
}

start();
