// What both feedback pages share: the page's token, element lookup, the JSON API (a POST carries
// the token), text-only elements (model output is never parsed as HTML), the status line, saving a
// judgement and moving between items. Each page defines `state` (index, total, busy) and `show(i)`.
"use strict";

const TOKEN = document.querySelector('meta[name="feedback-token"]').content;
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Feedback-Token": TOKEN },
    body: JSON.stringify(body),
  };
  const resp = await fetch(path, opts);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.error || `${resp.status} ${resp.statusText}`);
  return data;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// Save one judgement (one request in flight at a time), then show the next item.
async function save(body, said) {
  state.busy = true;
  status("saving…");
  try {
    const r = await api("/api/judge", body);
    status(`saved item ${state.index + 1} (${said})`);
    await show(r.next);
  } catch (err) {
    status(`not saved: ${err.message}`, true);
  } finally {
    state.busy = false;
  }
}

function go(delta) {
  const to = state.index + delta;
  if (to >= 0 && to < state.total) show(to).catch((e) => status(e.message, true));
}
