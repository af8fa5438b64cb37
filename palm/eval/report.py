"""The ``evaluate`` stage's report: PNG plots (matplotlib, Agg) and one self-contained HTML page.

* :func:`curve_plot`: a stage's ``curve.csv`` (one row per log interval; empty cells where a
  metric was not measured, e.g. validation between evaluations), one panel per metric with its
  ``val_`` twin on the same axes;
* :func:`reward_plot`: the distributions of the normalised rewards of the SFT and PPO replies;
* :func:`overoptimisation_plot`: PPO's probe, proxy reward and gold score against √KL (Gao et
  al. 2022), the gold peak marked;
* :func:`headline`: the verdict sentences, the gold judges (in ``evaluate.gold``'s order) and
  people first, the proxy labelled;
* :func:`html`: the page, plots inline as base64 PNG, the metrics, and a table of sample prompts
  with both policies' replies. Every text from data or a model is HTML-escaped (jinja2
  autoescape), so a reply holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

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


def _gold_sentence(judge: str, metrics: dict[str, Any]) -> str | None:
    """The verdict of one gold judge (``rule``, ``reward_model``), None without its metrics."""
    n = metrics["prompts"]
    if judge == "rule" and "gold_score_gain" in metrics:
        return (f"Gold judge (checks from the documentation, which PPO never saw): PPO is "
                f"{_verdict(metrics['gold_score_gain'], metrics.get('gold_score_gain_se'))} on {n} held-out prompts: "
                f"gold score {metrics['gold_score_ppo']:.3f} vs SFT's {metrics['gold_score_sft']:.3f} (difference "
                f"{_pm(metrics, 'gold_score_gain')}); PPO's reply wins on gold {_pm(metrics, 'gold_win_rate', 100, 1)} % "
                f"of the time; it names the asked function in {100 * metrics.get('gold_names_ppo', 0):.1f} % of "
                f"replies (SFT {100 * metrics.get('gold_names_sft', 0):.1f} %).")
    if judge == "reward_model" and "gold_rm_gain" in metrics:
        accuracy = (f"; it ranks {100 * metrics['gold_rm_accuracy']:.1f} % of the held-out pairs right"
                    if "gold_rm_accuracy" in metrics else "")
        return (f"Gold reward model (trained on preference pairs that neither the proxy nor PPO saw): PPO is "
                f"{_verdict(metrics['gold_rm_gain'], metrics.get('gold_rm_gain_se'))} on {n} held-out prompts: "
                f"mean normalised gold reward {metrics['gold_rm_ppo']:.3f} vs SFT's {metrics['gold_rm_sft']:.3f} "
                f"(difference {_pm(metrics, 'gold_rm_gain')}); PPO's reply wins on it "
                f"{_pm(metrics, 'gold_rm_win_rate', 100, 1)} % of the time{accuracy}.")
    return None


def headline(metrics: dict[str, Any], judges: Sequence[str] = ("rule", "reward_model")) -> list[str]:
    """The report's verdict, one sentence each: no verdict below ``min_prompts``; the gold judges'
    (in the order of ``judges``, ``evaluate.gold``) and the people's first; the reward model's
    labelled as the proxy PPO was trained on."""
    n = metrics["prompts"]
    if not metrics.get("verdict", 1):
        return [f"No verdict: only {n} held-out prompts, fewer than evaluate.min_prompts = {metrics.get('min_prompts')}. "
                "Every number below is too noisy to compare policies; give the data stages more held-out data "
                "(sft_data.valid_fraction, sft_data.min_valid) or more data."]
    out = [line for line in (_gold_sentence(j, metrics) for j in judges) if line]
    signs = {k: _sign(metrics.get(f"{k}_gain"), metrics.get(f"{k}_gain_se")) for k in ("gold_score", "gold_rm")}
    if None not in signs.values() and signs["gold_score"] * signs["gold_rm"] < 0:
        out.append("The gold judges disagree. The gold reward model learned from the same kind of labels as the "
                   "proxy, so it shares the proxy's blind spots; the rule judge checks the replies against the "
                   "documentation itself.")
    if not out:
        out.append("No gold judge (evaluate.gold: none): nothing here is independent of the reward model PPO "
                   "trained against.")
    if "human_win_rate" in metrics:
        out.append(f"People (blind A/B, {metrics.get('human_judgments')} judgements by {metrics.get('human_labelers')} "
                   f"labelers): PPO's reply preferred {_pm(metrics, 'human_win_rate', 100, 1)} % of the time.")
    kl = (f" at a KL of {metrics['kl']:.3f} nats per reply"
          + (f" ({'within' if metrics['kl_within_limit'] else 'BEYOND'} the limit {metrics['kl_limit']})"
             if "kl_limit" in metrics else ""))
    out.append(f"Proxy (the reward model PPO was trained to maximise, so not evidence of quality): PPO beats SFT on "
               f"{_pm(metrics, 'win_rate', 100, 1)} % of (prompt, draw) pairs, mean normalised reward "
               f"{metrics['reward_ppo']:.3f} vs {metrics['reward_sft']:.3f}{kl}.")
    return out


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
{% endfor %}{% if plots.overopt %}<h2>Over-optimisation</h2>
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
<table><tr><th>prompt</th><th>reference (data)</th><th>SFT</th><th>PPO</th></tr>
{% for s in samples %}<tr><td class="text">{{ s.prompt }}</td><td class="text">{{ s.reference }}</td>
<td class="text">{{ s.sft }}<br><i>proxy reward {{ "%.3f"|format(s.reward_sft) }}{% if s.gold_sft is defined %}, gold {{ "%.3f"|format(s.gold_sft) }}{% endif %}</i></td>
<td class="text">{{ s.ppo }}<br><i>proxy reward {{ "%.3f"|format(s.reward_ppo) }}{% if s.gold_ppo is defined %}, gold {{ "%.3f"|format(s.gold_ppo) }}{% endif %}</i></td></tr>
{% endfor %}</table>
</body></html>
"""


def html(metrics: dict[str, Any], samples: list[dict[str, Any]], rewards_png: bytes,
         curves: dict[str, bytes], missing: list[str], overopt_png: bytes | None = None,
         judges: Sequence[str] = ("rule", "reward_model")) -> str:
    """The self-contained page (see the module docstring); ``judges``: the gold judges' order."""
    import jinja2

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(PAGE).render(
        metrics=metrics, samples=samples, missing=missing, fmt=fmt, headline=headline(metrics, judges),
        plots={"rewards": b64(rewards_png), "curves": [(n, b64(p)) for n, p in curves.items()],
               "overopt": b64(overopt_png) if overopt_png else None})
