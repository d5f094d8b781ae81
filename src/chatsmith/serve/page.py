"""The web chat page served at `GET /`: plain HTML/CSS/JS in one string, no build step, nothing fetched
from anywhere but this server.

It lists the models (`GET /v1/models`), streams replies from `POST /v1/chat/completions` (server-sent
events read with `fetch` + a stream reader), and keeps the conversation, system prompt, temperature,
model and API key in the browser's localStorage, so a reload keeps them. "New conversation" clears it.

Tests: `python -m pytest tests/test_serve.py -q`.
"""

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chatsmith</title>
<style>
  :root { --bg: #f6f6f3; --panel: #fff; --ink: #1d1d1b; --muted: #6b6b66; --accent: #2f5d8a; --line: #ddd; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; background: var(--bg); color: var(--ink);
         display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: .8em; align-items: center; flex-wrap: wrap; padding: .6em 1em;
           border-bottom: 1px solid var(--line); background: var(--panel); }
  header h1 { font-size: 1.05em; margin: 0 .6em 0 0; }
  header label { color: var(--muted); font-size: .9em; }
  select, input, textarea, button { font: inherit; }
  #system { width: 100%; min-height: 2.4em; padding: .4em; border: 1px solid var(--line); border-radius: 6px; }
  #settings { padding: .5em 1em; background: var(--panel); border-bottom: 1px solid var(--line); }
  #log { flex: 1; overflow-y: auto; padding: 1em; }
  .msg { max-width: 46em; margin: 0 auto .8em; padding: .6em .8em; border-radius: 8px; white-space: pre-wrap;
         word-wrap: break-word; background: var(--panel); border: 1px solid var(--line); }
  .msg.user { background: #e8eef5; }
  .msg .who { font-size: .75em; color: var(--muted); display: block; margin-bottom: .2em; }
  .msg.error { border-color: #c44; color: #a22; }
  form { display: flex; gap: .5em; padding: .7em 1em; background: var(--panel); border-top: 1px solid var(--line); }
  #input { flex: 1; min-height: 2.6em; max-height: 12em; padding: .5em; border: 1px solid var(--line);
           border-radius: 6px; resize: vertical; }
  button { padding: .4em 1em; border-radius: 6px; border: 1px solid var(--accent); background: var(--accent);
           color: #fff; cursor: pointer; }
  button.plain { background: transparent; color: var(--accent); }
  button:disabled { opacity: .5; cursor: default; }
</style>
</head>
<body>
<header>
  <h1>chatsmith</h1>
  <label>model <select id="model"></select></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"
         style="width: 4.5em"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="256" style="width: 5em"></label>
  <label>API key <input id="api_key" type="password" placeholder="(if required)" style="width: 9em"></label>
  <button id="new" class="plain" type="button">New conversation</button>
</header>
<div id="settings"><textarea id="system" placeholder="System prompt (optional)"></textarea></div>
<div id="log" aria-live="polite"></div>
<form id="form">
  <textarea id="input" placeholder="Message (Enter sends, Shift+Enter for a new line)" required></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" class="plain" disabled>Stop</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "chatsmith.chat.v1";
let state = { messages: [], system: "", model: "", temperature: 0.7, max_tokens: 256, api_key: "" };
let controller = null;

function load() {
  try { Object.assign(state, JSON.parse(localStorage.getItem(KEY) || "{}")); } catch (e) { /* fresh start */ }
  $("system").value = state.system; $("temperature").value = state.temperature;
  $("max_tokens").value = state.max_tokens; $("api_key").value = state.api_key;
}
function save() { localStorage.setItem(KEY, JSON.stringify(state)); }
function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.api_key) h["Authorization"] = "Bearer " + state.api_key;
  return h;
}
function bubble(role, text, cls) {
  const div = document.createElement("div");
  div.className = "msg " + (cls || role);
  const who = document.createElement("span");
  who.className = "who"; who.textContent = role;
  const body = document.createElement("span");
  body.textContent = text;
  div.append(who, body);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return body;
}
function render() {
  $("log").textContent = "";
  for (const m of state.messages) bubble(m.role, m.content);
}
async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
    $("model").textContent = "";
    for (const m of data.data) {
      const o = document.createElement("option"); o.value = o.textContent = m.id; $("model").append(o);
    }
    if (data.data.some((m) => m.id === state.model)) $("model").value = state.model;
    state.model = $("model").value;
  } catch (e) { bubble("error", "cannot list models: " + e.message, "error"); }
}
async function send(text) {
  state.messages.push({ role: "user", content: text });
  save(); bubble("user", text);
  const out = bubble("assistant", "");
  const messages = (state.system.trim() ? [{ role: "system", content: state.system }] : []).concat(state.messages);
  const body = { model: state.model, messages, stream: true, temperature: Number(state.temperature),
                 max_tokens: Number(state.max_tokens) };
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                   signal: controller.signal });
    if (!r.ok) { const e = await r.json(); throw new Error(e.error ? e.error.message : r.statusText); }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) if (c.delta && c.delta.content) reply += c.delta.content;
        out.textContent = reply;
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") bubble("error", e.message, "error");
  } finally {
    controller = null; $("send").disabled = false; $("stop").disabled = true;
  }
  state.messages.push({ role: "assistant", content: reply });
  save();
}
$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new").addEventListener("click", () => { state.messages = []; save(); render(); });
for (const id of ["system", "temperature", "max_tokens", "model"]) {
  $(id).addEventListener("change", () => { state[id] = $(id).value; save(); });
}
$("api_key").addEventListener("change", () => { state.api_key = $("api_key").value; save(); loadModels(); });
load(); render(); loadModels();
</script>
</body>
</html>
"""
