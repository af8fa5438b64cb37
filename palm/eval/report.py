"""The ``evaluate`` stage's report: PNG plots (matplotlib, Agg) and one self-contained HTML page.

* :func:`curve_plot`: a stage's ``curve.csv`` (one row per log interval; empty cells where a
  metric was not measured, e.g. validation between evaluations), one panel per metric with its
  ``val_`` twin on the same axes;
* :func:`reward_plot`: the distributions of the normalised rewards of every policy's replies;
* :func:`overoptimisation_plot`: PPO's probe, proxy reward and gold score against √KL (Gao et
  al. 2022), the gold peak marked;
* :func:`headline`: the verdict sentences, for each policy the gold judges (in ``evaluate.gold``'s
  order; a judge the policy trained against is said to be no gold for it) and people first, the
  proxy labelled;
* :func:`policy_table`: a row per policy (SFT, PPO, DPO, …): proxy reward and win rate against
  SFT, each gold judge's score and win rate against SFT, KL to SFT, length, ended;
* :func:`html`: the page, plots inline as base64 PNG, the table, the metrics, and a table of
  sample prompts with every policy's replies. Every text from data or a model is HTML-escaped (jinja2
  autoescape), so a reply holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from palm.eval.evaluate import POLICIES, versus

MAX_PANELS = 12  # per curve plot


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def read_curve(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``curve.csv`` as ``metric -> [(step, value)]``, numeric cells only."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = float(row.get("step") or "nan")
            except ValueError:
                continue
            for key, cell in row.items():
                if key in (None, "step") or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(step) and math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    return series


def curve_plot(stage: str, path: Path) -> bytes | None:
    """A PNG of the stage's training curve, or None when the file holds no numbers."""
    series = read_curve(path)
    names = [k for k in series if not (k.startswith("val_") and k[4:] in series)][:MAX_PANELS]
    if not names:
        return None
    plt, fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        for key, style in ((name, "-"), (f"val_{name}", "o--")):
            if key in series:
                xs, ys = zip(*series[key])
                ax.plot(xs, ys, style, label=key, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"{stage}: training curve", fontsize=10)
    return _png(plt, fig)


def reward_plot(rewards: dict[str, list[float]]) -> bytes:
    """Histograms of the normalised rewards of each policy's replies, on shared bins."""
    plt, fig, (ax,) = _figure(1)
    values = [v for vs in rewards.values() for v in vs]
    lo, hi = min(values), max(values)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    for name, vs in rewards.items():
        mean = sum(vs) / len(vs)
        ax.hist(vs, bins=bins, alpha=0.5, label=f"{name} (mean {mean:.2f})")
    ax.set_xlabel("normalised reward", fontsize=8)
    ax.set_ylabel("replies", fontsize=8)
    ax.set_title("reward of held-out replies", fontsize=9)
    ax.legend(fontsize=7)
    return _png(plt, fig)


def overoptimisation_plot(curve: Path, start: dict[str, Any] | None = None) -> bytes | None:
    """A PNG of the proxy reward and the gold score of PPO's probe against √KL (two y axes), from
    ``curve.csv``'s probe columns and the starting point ``start`` (``gold_initial``,
    ``proxy_initial``, ``probe_kl_initial`` of the ppo metrics); None without probe columns."""
    series = read_curve(curve)
    if "gold_score" not in series or "probe_kl" not in series or "proxy_reward" not in series:
        return None
    points = [(0, max(float(start["probe_kl_initial"]), 0.0), float(start["proxy_initial"]), float(start["gold_initial"]))
              ] if start and all(k in start for k in ("probe_kl_initial", "proxy_initial", "gold_initial")) else []
    kl, proxy, gold = (dict(series[k]) for k in ("probe_kl", "proxy_reward", "gold_score"))
    points += [(int(step), max(kl[step], 0.0), proxy[step], gold[step]) for step in sorted(gold) if step in kl and step in proxy]
    plt, fig, (ax,) = _figure(1)
    x = [math.sqrt(p[1]) for p in points]
    ax.plot(x, [p[3] for p in points], "o-", color="tab:green", label="gold (rule judge)")
    peak = max(range(len(points)), key=lambda i: points[i][3])
    ax.plot([x[peak]], [points[peak][3]], "*", color="tab:green", markersize=14,
            label=f"gold peak (iteration {points[peak][0]})")
    ax.set_xlabel("√KL(policy ‖ SFT), nats^½ per reply", fontsize=8)
    ax.set_ylabel("gold score", fontsize=8, color="tab:green")
    twin = ax.twinx()
    twin.plot(x, [p[2] for p in points], "s--", color="tab:blue", label="proxy (reward model)")
    twin.set_ylabel("proxy reward (normalised)", fontsize=8, color="tab:blue")
    for i, p in enumerate(points):
        ax.annotate(str(p[0]), (x[i], p[3]), fontsize=6, textcoords="offset points", xytext=(3, 3))
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    ax.set_title("over-optimisation: PPO's probe, proxy vs gold (iterations labelled)", fontsize=9)
    return _png(plt, fig)


def _pm(metrics: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    se = metrics.get(f"{key}_se")
    value = f"{scale * metrics[key]:.{digits}f}"
    return value + (f" ± {scale * se:.{digits}f}" if isinstance(se, (int, float)) else "")


def _verdict(gain: float, se: float | None) -> str:
    if se is None or not math.isfinite(se) or se == 0:
        return "better" if gain > 0 else "worse" if gain < 0 else "no different"
    if gain > 2 * se:
        return "better (more than 2 standard errors)"
    if gain < -2 * se:
        return "worse (more than 2 standard errors)"
    return "not distinguishable from SFT (within 2 standard errors)"


def _sign(gain: Any, se: Any) -> int | None:
    """+1 or -1 when ``gain`` is more than two standard errors from 0, else 0; None without numbers."""
    if not isinstance(gain, (int, float)) or not isinstance(se, (int, float)) or not math.isfinite(se):
        return None
    return 1 if gain > 2 * se else -1 if gain < -2 * se else 0


LABELS = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO"}  # how the report names a policy
JUDGES = {"rule": "the rule judge", "reward_model": "the gold reward model"}


def _label(policy: str) -> str:
    return LABELS.get(policy, policy.upper())


def policies_of(metrics: dict[str, Any]) -> tuple[str, ...]:
    """The policies ``metrics`` compares with SFT: ppo, and each other of :data:`POLICIES` measured."""
    return tuple(p for p in POLICIES if p == "ppo" or f"reward_{p}" in metrics)


def _gold_sentence(judge: str, metrics: dict[str, Any], policy: str = "ppo", accuracy: bool = True) -> str | None:
    """The verdict of one gold judge (``rule``, ``reward_model``) on ``policy`` against SFT, None
    without its metrics; ``accuracy``: with the gold reward model's held-out accuracy."""
    n, name = metrics["prompts"], _label(policy)
    v = lambda measure: versus(measure, policy)  # noqa: E731
    if judge == "rule" and v("gold_score_gain") in metrics:
        return (f"Gold judge (checks from the documentation, which {name} never saw): {name} is "
                f"{_verdict(metrics[v('gold_score_gain')], metrics.get(v('gold_score_gain') + '_se'))} on {n} held-out "
                f"prompts: gold score {metrics[f'gold_score_{policy}']:.3f} vs SFT's {metrics['gold_score_sft']:.3f} "
                f"(difference {_pm(metrics, v('gold_score_gain'))}); {name}'s reply wins on gold "
                f"{_pm(metrics, v('gold_win_rate'), 100, 1)} % of the time; it names the asked function in "
                f"{100 * metrics.get(f'gold_names_{policy}', 0):.1f} % of replies (SFT "
                f"{100 * metrics.get('gold_names_sft', 0):.1f} %).")
    if judge == "reward_model" and v("gold_rm_gain") in metrics:
        ranks = (f"; it ranks {100 * metrics['gold_rm_accuracy']:.1f} % of the held-out pairs right"
                 if accuracy and "gold_rm_accuracy" in metrics else "")
        return (f"Gold reward model (trained on preference pairs that neither the proxy nor {name} saw): {name} is "
                f"{_verdict(metrics[v('gold_rm_gain')], metrics.get(v('gold_rm_gain') + '_se'))} on {n} held-out "
                f"prompts: mean normalised gold reward {metrics[f'gold_rm_{policy}']:.3f} vs SFT's "
                f"{metrics['gold_rm_sft']:.3f} (difference {_pm(metrics, v('gold_rm_gain'))}); {name}'s reply wins on "
                f"it {_pm(metrics, v('gold_rm_win_rate'), 100, 1)} % of the time{ranks}.")
    return None


def _not_gold_sentence(judge: str, metrics: dict[str, Any], policy: str) -> str:
    """What ``judge`` says of ``policy``, which trained against it: optimisation, not evidence."""
    name, v = _label(policy), (lambda measure: versus(measure, policy))
    what = {"rule": ("gold_score_gain", "gold_win_rate"), "reward_model": ("gold_rm_gain", "gold_rm_win_rate")}[judge]
    found = (f": difference {_pm(metrics, v(what[0]))}, win rate {_pm(metrics, v(what[1]), 100, 1)} %, what its "
             "training optimised" if v(what[0]) in metrics and v(what[1]) in metrics else "")
    return (f"Not gold for {name}: {JUDGES[judge]} is not independent of {name}, whose reward included it "
            f"(its config's reward terms){found}.")


def headline(metrics: dict[str, Any], judges: Sequence[str] = ("rule", "reward_model"),
             policies: Sequence[str] | None = None) -> list[str]:
    """The report's verdict, one sentence each: no verdict below ``min_prompts``; for each policy
    (``policies``, default :func:`policies_of`) the gold judges' verdicts against SFT first (in the
    order of ``judges``, ``evaluate.gold``), a judge it trained against (``trained_on_<judge>_<p>``)
    not as gold but said to be its training's; people's; the proxy's labelled as the proxy."""
    n = metrics["prompts"]
    if not metrics.get("verdict", 1):
        return [f"No verdict: only {n} held-out prompts, fewer than evaluate.min_prompts = {metrics.get('min_prompts')}. "
                "Every number below is too noisy to compare policies; give the data stages more held-out data "
                "(sft_data.valid_fraction, sft_data.min_valid) or more data."]
    policies = tuple(policies or policies_of(metrics))
    out: list[str] = []
    for policy in policies:
        against = [j for j in judges if metrics.get(f"trained_on_{j}_{policy}")]
        gold = [j for j in judges if j not in against]
        lines = [line for line in (_gold_sentence(j, metrics, policy, policy == policies[0]) for j in gold) if line]
        if against and not lines:
            lines.append(f"No gold judge for {_label(policy)}: it trained against every judge of evaluate.gold "
                         f"({', '.join(against)}), so nothing here is independent evidence of its quality.")
        signs = {k: _sign(metrics.get(versus(f"{k}_gain", policy)), metrics.get(versus(f"{k}_gain", policy) + "_se"))
                 for k in ("gold_score", "gold_rm")}
        if {"rule", "reward_model"} <= set(gold) and None not in signs.values() and signs["gold_score"] * signs["gold_rm"] < 0:
            lines.append(f"The gold judges disagree{'' if policy == 'ppo' else ' on ' + _label(policy)}. The gold reward "
                         "model learned from the same kind of labels as the proxy, so it shares the proxy's blind spots; "
                         "the rule judge checks the replies against the documentation itself.")
        out += lines + [_not_gold_sentence(j, metrics, policy) for j in against]
    if not out:
        out.append("No gold judge (evaluate.gold: none): nothing here is independent of the reward model PPO "
                   "trained against.")
    if "human_win_rate" in metrics:
        out.append(f"People (blind A/B, {metrics.get('human_judgments')} judgements by {metrics.get('human_labelers')} "
                   f"labelers): PPO's reply preferred {_pm(metrics, 'human_win_rate', 100, 1)} % of the time.")
    for policy in policies:
        out.append(_proxy_sentence(metrics, policy))
    if "dpo" in policies and "dpo_pref_accuracy" in metrics:
        out.append(f"DPO's implicit reward (beta {metrics.get('dpo_beta', math.nan):g}) ranks "
                   f"{100 * metrics['dpo_pref_accuracy']:.1f} % of the {metrics.get('pairs')} held-out preference pairs "
                   f"right (SFT's own log-probs: {100 * metrics.get('sft_pref_accuracy', math.nan):.1f} %), mean margin "
                   f"{metrics['dpo_pref_margin']:.3f}; the pairs are the proxy's kind of labels, not gold.")
    return out


def _proxy_sentence(metrics: dict[str, Any], policy: str) -> str:
    name, v = _label(policy), (lambda measure: versus(measure, policy))
    kl = ""
    if v("kl") in metrics:
        kl = (f" at a KL of {metrics[v('kl')]:.3f} nats per reply"
              + (f" ({'within' if metrics[v('kl_within_limit')] else 'BEYOND'} the limit {metrics['kl_limit']})"
                 if "kl_limit" in metrics and v("kl_within_limit") in metrics else ""))
    who = ("the reward model PPO was trained to maximise, so not evidence of quality" if policy == "ppo" else
           f"the reward model PPO was trained to maximise; {name} learned from the same kind of preference pairs, "
           "so not evidence of quality")
    return (f"Proxy ({who}): {name} beats SFT on {_pm(metrics, v('win_rate'), 100, 1)} % of (prompt, draw) pairs, "
            f"mean normalised reward {metrics[f'reward_{policy}']:.3f} vs {metrics['reward_sft']:.3f}{kl}.")


def policy_table(metrics: dict[str, Any], judges: Sequence[str], policies: Sequence[str]
                 ) -> tuple[list[str], list[list[str]]]:
    """The report's table, a row per policy (SFT first): proxy reward and win rate against SFT, per
    gold judge the policy's score and win rate against SFT (marked where the policy trained
    against that judge), KL to SFT, reply length, share ended; "" where not measured."""
    def num(key: str, scale: float = 1.0, digits: int = 3) -> str:
        return _pm(metrics, key, scale, digits) if isinstance(metrics.get(key), (int, float)) else ""

    columns = {"rule": ("gold score (rule)", "gold_score", "gold_win_rate", "rule"),
               "reward_model": ("gold reward model", "gold_rm", "gold_rm_win_rate", "gold reward model")}
    header = ["policy", "proxy reward", "win rate vs SFT, % (proxy)"]
    for j in judges:
        header += [columns[j][0], f"gold win rate vs SFT, % ({columns[j][3]})"]
    header += ["KL to SFT (nats/reply)", "length (tokens)", "ended, %"]
    rows = []
    for policy in ("sft", *policies):
        base = policy == "sft"
        row = [_label(policy), num(f"reward_{policy}"), "" if base else num(versus("win_rate", policy), 100, 1)]
        for j in judges:
            cells = [num(f"{columns[j][1]}_{policy}"), "" if base else num(versus(columns[j][2], policy), 100, 1)]
            if metrics.get(f"trained_on_{j}_{policy}"):
                cells = [c + " (trained on it: not gold)" if c else c for c in cells]
            row += cells
        row += ["0" if base else num(versus("kl", policy)), num(f"length_{policy}", digits=1),
                num(f"ended_{policy}", 100, 1)]
        rows.append(row)
    return header, rows


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>palm-rlhf evaluation</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; font-size: 13px; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-family: monospace; }
td.text { white-space: pre-wrap; font-family: monospace; max-width: 360px; overflow-wrap: anywhere; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.headline { font-size: 1.2em; }
</style></head><body>
<h1>palm-rlhf: evaluation</h1>
{% for line in headline %}<p class="headline">{{ line }}</p>
{% endfor %}<h2>Policies against SFT</h2>
<table><tr>{% for h in table[0] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in table[1] %}<tr><td>{{ row[0] }}</td>{% for cell in row[1:] %}<td class="num">{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if plots.overopt %}<h2>Over-optimisation</h2>
<img alt="proxy and gold against the square root of KL" src="data:image/png;base64,{{ plots.overopt }}">
{% endif %}<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th></tr>
{% for key, value in metrics|dictsort %}<tr><td>{{ key }}</td><td class="num">{{ fmt(value) }}</td></tr>
{% endfor %}</table>
<h2>Rewards of the held-out replies</h2>
<img alt="reward distributions" src="data:image/png;base64,{{ plots.rewards }}">
<h2>Training curves</h2>
{% for name, png in plots.curves %}<h3>{{ name }}</h3>
<img alt="{{ name }} training curve" src="data:image/png;base64,{{ png }}">
{% else %}<p>No training curves found.</p>{% endfor %}
{% if missing %}<p>No curve for: {{ missing|join(", ") }}.</p>{% endif %}
<h2>Sample replies ({{ samples|length }} of {{ metrics.prompts }} prompts)</h2>
<table><tr><th>prompt</th><th>reference (data)</th>{% for p in policies %}<th>{{ label(p) }}</th>{% endfor %}</tr>
{% for s in samples %}<tr><td class="text">{{ s.prompt }}</td><td class="text">{{ s.reference }}</td>
{% for p in policies %}<td class="text">{{ s[p] }}<br><i>proxy reward {{ "%.3f"|format(s["reward_" ~ p]) }}{% if s["gold_" ~ p] is defined %}, gold {{ "%.3f"|format(s["gold_" ~ p]) }}{% endif %}</i></td>
{% endfor %}</tr>
{% endfor %}</table>
</body></html>
"""


def html(metrics: dict[str, Any], samples: list[dict[str, Any]], rewards_png: bytes,
         curves: dict[str, bytes], missing: list[str], overopt_png: bytes | None = None,
         judges: Sequence[str] = ("rule", "reward_model"), policies: Sequence[str] | None = None) -> str:
    """The self-contained page (see the module docstring); ``judges``: the gold judges' order;
    ``policies``: those compared with SFT (default :func:`policies_of`)."""
    import jinja2

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    policies = tuple(policies or policies_of(metrics))
    return env.from_string(PAGE).render(
        metrics=metrics, samples=samples, missing=missing, fmt=fmt, headline=headline(metrics, judges, policies),
        table=policy_table(metrics, judges, policies), policies=("sft", *policies), label=_label,
        plots={"rewards": b64(rewards_png), "curves": [(n, b64(p)) for n, p in curves.items()],
               "overopt": b64(overopt_png) if overopt_png else None})
