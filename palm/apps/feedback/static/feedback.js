// The ranking page of `palm feedback serve` (palm/feedback/app.py). Every prompt and reply is
// put into the page with textContent: model output is shown as text, never parsed as HTML.
"use strict";
// (TOKEN, $, api, el and status: common.js, loaded first)

const state = { index: 0, total: 0, item: null, picked: [], shown: false, busy: false };

function describe(j) {
  if (j.verdict !== "ranked") return j.verdict.replace("_", " ");
  return j.order.map((e) => (Array.isArray(e) ? e.map((i) => i + 1).join("=") : e + 1)).join(" > ");
}

async function refreshState() {
  const s = await api("/api/state");
  state.total = s.total;
  $("judged").textContent = `${s.judged} of ${s.total}`;
  const a = s.agreement;
  $("agreement").textContent = a.shared_items
    ? `· agreement with other labelers ${Math.round(a.agreement * 100)} % on ${a.shared_items} items` : "";
  return s;
}

async function show(index) {
  await refreshState();
  if (index >= state.total && state.total) return done();
  const data = await api(`/api/item/${index}`);
  Object.assign(state, { index, total: data.total, item: data });
  const j = data.judgement;
  state.picked = j && j.verdict === "ranked" ? j.order.flat() : [];
  state.shown = state.picked.length > 0; // the saved order is shown until a key starts a new one
  $("progress").textContent = `${index + 1} of ${data.total}`;
  $("prompt").replaceChildren(...data.prompt.map((m) => {
    const turn = el("div", `turn ${m.role}`);
    turn.append(el("span", "role", m.role), el("div", "text", m.content));
    return turn;
  }));
  $("previous").textContent = j ? `your judgement: ${describe(j)} (judge again to change it)` : "";
  document.body.dataset.item = String(index);
  renderReplies();
}

function done() {
  state.index = state.total;
  state.item = null;
  $("progress").textContent = `done (${state.total})`;
  $("prompt").replaceChildren(el("p", "done", `All ${state.total} items are judged. Thank you! ` +
    "Go back to change a judgement, or stop the server (Ctrl-C)."));
  $("replies").replaceChildren();
  $("previous").textContent = "";
  document.body.dataset.item = "done";
  $("submit").disabled = true;
}

function renderReplies() {
  const k = state.item.replies.length;
  const rest = [...Array(k).keys()].filter((i) => !state.picked.includes(i));
  const list = $("replies");
  list.replaceChildren();
  [...state.picked, ...rest].forEach((i, pos) => {
    const placed = state.picked.includes(i);
    const li = el("li", placed ? "reply placed" : "reply");
    li.dataset.reply = String(i);
    li.draggable = true;
    const head = el("div", "head");
    head.append(el("span", "key", String(i + 1)), el("span", "place", placed ? `#${pos + 1}` : "not ranked yet"));
    li.append(head, el("div", "text", state.item.replies[i]));
    li.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", String(i)));
    li.addEventListener("dragover", (ev) => ev.preventDefault());
    li.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const moved = Number(ev.dataTransfer.getData("text/plain"));
      const order = [...list.children].map((c) => Number(c.dataset.reply)).filter((r) => r !== moved);
      order.splice(order.indexOf(i), 0, moved);
      state.picked = order; // a drag places every reply
      state.shown = false;
      renderReplies();
    });
    list.append(li);
  });
  $("submit").disabled = state.picked.length !== k;
}

function pick(i) {
  const k = state.item.replies.length;
  if (i >= k) return;
  if (state.shown) { state.picked = []; state.shown = false; } // judging again: a new order
  if (state.picked.includes(i)) return;
  state.picked.push(i);
  if (state.picked.length === k - 1) state.picked.push([...Array(k).keys()].find((r) => !state.picked.includes(r)));
  renderReplies();
}

async function submit(verdict) {
  if (!state.item || state.busy) return;
  if (verdict === "ranked" && state.picked.length !== state.item.replies.length) return;
  await save({ index: state.index, item: state.item.item, verdict, order: verdict === "ranked" ? state.picked : null },
             verdict.replace("_", " "));
}

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (/^[1-9]$/.test(ev.key) && state.item) pick(Number(ev.key) - 1);
  else if (ev.key === "Backspace" && state.item) { state.picked.pop(); state.shown = false; renderReplies(); }
  else if (ev.key === "Escape" && state.item) { state.picked = []; state.shown = false; renderReplies(); }
  else if (ev.key === "Enter") submit("ranked");
  else if (ev.key === "b") submit("all_bad");
  else if (ev.key === "s") submit("skip");
  else if (ev.key === "ArrowLeft") go(-1);
  else if (ev.key === "ArrowRight") go(1);
  else return;
  ev.preventDefault();
});

$("submit").addEventListener("click", () => submit("ranked"));
$("all-bad").addEventListener("click", () => submit("all_bad"));
$("skip").addEventListener("click", () => submit("skip"));
$("reset").addEventListener("click", () => {
  if (state.item) { state.picked = []; state.shown = false; renderReplies(); }
});
$("back").addEventListener("click", () => go(-1));
$("forward").addEventListener("click", () => go(1));

refreshState()
  .then((s) => show(s.next))
  .catch((e) => status(`cannot load the batch: ${e.message}`, true));
