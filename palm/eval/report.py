"""The ``evaluate`` stage's report: PNG plots (matplotlib, Agg) and one self-contained HTML page.

* :func:`curve_plot`: a stage's ``curve.csv`` (one row per log interval; empty cells where a
  metric was not measured, e.g. validation between evaluations), one panel per metric with its
  ``val_`` twin on the same axes;
* :func:`reward_plot`: the distributions of the normalised rewards of the SFT and PPO replies;
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
from typing import Any

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
<p class="headline">PPO beats SFT on <b>{{ "%.1f"|format(100 * metrics.win_rate) }}%</b>{% if metrics.win_rate_se is defined %}
(± {{ "%.1f"|format(100 * metrics.win_rate_se) }}){% endif %} of {{ metrics.prompts }} held-out prompts{% if metrics.samples_per_prompt is defined and metrics.samples_per_prompt > 1 %}
({{ metrics.samples_per_prompt }} replies each){% endif %} by the reward model (mean normalised reward {{ "%.3f"|format(metrics.reward_ppo) }} vs
{{ "%.3f"|format(metrics.reward_sft) }}), at a KL of {{ "%.3f"|format(metrics.kl) }} nats per reply from the SFT
policy{% if metrics.kl_limit is defined %} ({% if metrics.kl_within_limit %}within{% else %}<b>beyond</b>{% endif %}
the bound of {{ metrics.kl_limit }}{% if not metrics.kl_within_limit %}: the gains may be reward hacking{% endif %}){% endif %}.</p>
<h2>Metrics</h2>
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
<td class="text">{{ s.sft }}<br><i>reward {{ "%.3f"|format(s.reward_sft) }}</i></td>
<td class="text">{{ s.ppo }}<br><i>reward {{ "%.3f"|format(s.reward_ppo) }}</i></td></tr>
{% endfor %}</table>
</body></html>
"""


def html(metrics: dict[str, Any], samples: list[dict[str, Any]], rewards_png: bytes,
         curves: dict[str, bytes], missing: list[str]) -> str:
    """The self-contained page (see the module docstring)."""
    import jinja2

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(PAGE).render(
        metrics=metrics, samples=samples, missing=missing, fmt=fmt,
        plots={"rewards": b64(rewards_png), "curves": [(n, b64(p)) for n, p in curves.items()]})
