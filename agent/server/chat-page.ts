/**
 * The built-in chat page served at `/`: one self-contained HTML document (no external assets) that talks to this
 * server's `/v1/chat/completions` with streaming, shows the answer as it arrives, and can stop it (aborting the
 * request cancels the generation on the cluster).
 */

/** Content-Security-Policy of the page: inline script and style only, requests to this origin only. */
export const CHAT_PAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'"

/** The page. */
export const CHAT_PAGE_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgeshard chat</title>
<style>
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; background: #f6f6f4; color: #222; display: flex; flex-direction: column; height: 100vh; }
  header { padding: .6rem 1rem; background: #263238; color: #eceff1; display: flex; gap: 1rem; align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 1rem; margin: 0; }
  header label { font-size: .85rem; }
  header input { width: 4.5rem; }
  #log { flex: 1; overflow-y: auto; padding: 1rem; display: flex; flex-direction: column; gap: .6rem; }
  .msg { max-width: 48rem; padding: .5rem .8rem; border-radius: .6rem; white-space: pre-wrap; word-wrap: break-word; }
  .user { align-self: flex-end; background: #d7ecff; }
  .assistant { align-self: flex-start; background: #fff; border: 1px solid #ddd; }
  .error { align-self: stretch; background: #fde2e1; color: #8a1f11; }
  form { display: flex; gap: .5rem; padding: .6rem 1rem; background: #fff; border-top: 1px solid #ddd; }
  textarea { flex: 1; resize: none; height: 3.2rem; font: inherit; padding: .4rem; }
  button { font: inherit; padding: 0 1rem; }
</style>
</head>
<body>
<header>
  <h1>edgeshard</h1><span id="model">…</span>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" step="1" value="256"></label>
  <button id="clear" type="button">New chat</button>
</header>
<main id="log" aria-live="polite"></main>
<form id="form">
  <textarea id="prompt" placeholder="Message (Enter sends, Shift+Enter for a new line)" required></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log");
let model = null;
let history = [];
let running = null;

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models");
    const body = await res.json();
    model = body.data[0].id;
    $("model").textContent = model;
  } catch (err) {
    bubble("error", "cannot list models: " + err.message);
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let content = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model, messages: history, stream: true,
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
      signal: running.signal,
    });
    if (!res.ok) throw new Error((await res.json()).error.message);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      let end;
      while ((end = buffered.indexOf("\\n\\n")) >= 0) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        content += (chunk.choices[0] && chunk.choices[0].delta.content) || "";
        answer.textContent = content;
        log.scrollTop = log.scrollHeight;
      }
    }
    answer.dataset.done = "true";
  } catch (err) {
    if (err.name === "AbortError") answer.dataset.done = "stopped";
    else { answer.remove(); bubble("error", err.message); }
  } finally {
    if (content) history.push({ role: "assistant", content });
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => running && running.abort());
$("clear").addEventListener("click", () => { history = []; log.textContent = ""; });
loadModel();
</script>
</body>
</html>
`
