// The blind A/B page of `palm feedback compare` (palm/apps/feedback/compare_app.py). It knows replies
// only as "left" and "right"; every prompt and reply is put into the page with textContent.
"use strict";
// (TOKEN, $, api, el and status: common.js, loaded first)

const SAID = { left: "left better", right: "right better", tie: "tie", both_bad: "both bad" };
const state = { index: 0, total: 0, item: null, busy: false };

async function refreshState() {
  const s = await api("/api/state");
  state.total = s.total;
  $("judged").textContent = `${s.judged} of ${s.total}`;
  return s;
}

async function show(index) {
  await refreshState();
  if (index >= state.total && state.total) return done();
  const data = await api(`/api/item/${index}`);
  Object.assign(state, { index, total: data.total, item: data });
  $("progress").textContent = `${index + 1} of ${data.total}`;
  $("prompt").replaceChildren(...data.prompt.map((m) => {
    const turn = el("div", `turn ${m.role}`);
    turn.append(el("span", "role", m.role), el("div", "text", m.content));
    return turn;
  }));
  $("left").textContent = data.left;
  $("right").textContent = data.right;
  const j = data.judgement;
  $("left").parentElement.classList.toggle("chosen", j === "left");
  $("right").parentElement.classList.toggle("chosen", j === "right");
  $("previous").textContent = j ? `your judgement: ${SAID[j]} (judge again to change it)` : "";
  $("pair").hidden = false;
  document.body.dataset.item = String(index);
}

function done() {
  state.index = state.total;
  state.item = null;
  $("progress").textContent = `done (${state.total})`;
  $("prompt").replaceChildren(el("p", "done", `All ${state.total} items are judged. Thank you! ` +
    "Go back to change a judgement, or stop the server (Ctrl-C)."));
  $("pair").hidden = true;
  $("previous").textContent = "";
  document.body.dataset.item = "done";
}

async function choose(choice) {
  if (!state.item || state.busy) return;
  await save({ index: state.index, choice }, SAID[choice]);
}

const KEYS = { 1: "left", 2: "right", t: "tie", b: "both_bad" };
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (KEYS[ev.key]) choose(KEYS[ev.key]);
  else if (ev.key === "ArrowLeft") go(-1);
  else if (ev.key === "ArrowRight") go(1);
  else return;
  ev.preventDefault();
});

for (const choice of Object.values(KEYS)) $(`choose-${choice}`).addEventListener("click", () => choose(choice));
$("back").addEventListener("click", () => go(-1));
$("forward").addEventListener("click", () => go(1));

refreshState()
  .then((s) => show(s.next))
  .catch((e) => status(`cannot load the comparison: ${e.message}`, true));
