"""DVC stage `evaluate`: the SFT policy and every policy trained from it (PPO, and DPO with --dpo)
on held-out prompts, in one table, scored by the gold judges
(evaluate.gold: the rule checks, the gold reward model of --gold-reward) and by the proxy reward
model; perplexities of every language model; the reward model's held-out accuracy
(palm/eval/evaluate.py). Writes the metrics (reports/evaluate/metrics.json, by run_stage), PNG plots of
every stage's training curve and of the reward distributions, and one self-contained HTML report;
the report and plots are logged to the stage's MLflow run. The champion of the evaluation (the
policy that beats SFT by the champion rule, else SFT: palm.eval.evaluate.champion_policy) is
written as a Hugging Face transformers folder (--champion-hf) and logged to the run as
``champion-hf``. Everything is computed before anything
is written, so a failed run leaves no output behind.

Then the models are registered in the MLflow Model Registry (palm/ops/registry.py: palm-pretrain,
palm-sft, palm-reward, palm-chat (PPO) and palm-dpo, each with the run that produced it; each
policy @champion by the rule evaluate.champion_metric / champion_direction on its own metrics,
else @candidate). Registering is tracking: if MLflow fails, the stage warns and keeps its outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from palm.core.io import atomic_dir, atomic_file
from palm.eval.evaluate import POLICIES, EvaluateConfig, champion_policy, evaluate, versus
from palm.model.hf import export_hf
from palm.ops.stage import StageContext, run_stage

MODELS = ("pretrain", "sft", "ppo", "reward")  # required
OPTIONAL = tuple(p for p in POLICIES if p != "ppo")  # policies compared with SFT when given (--dpo)


def add_args(p):
    for name in MODELS:
        p.add_argument(f"--{name}", required=True, help=f"the {name} stage's export")
    for name in OPTIONAL:
        p.add_argument(f"--{name}", help=f"the {name} stage's export, compared with SFT beside PPO")
    p.add_argument("--gold-reward", help="the gold_reward stage's export (needed when evaluate.gold names reward_model)")
    p.add_argument("--sft-data", required=True, help="the sft_data stage's folder (held-out prompts and replies)")
    p.add_argument("--prefs", required=True, help="the prefs stage's folder (held-out pairs)")
    p.add_argument("--tokens", required=True, help="the tokenize stage's shards (held-out text)")
    p.add_argument("--curves", nargs="*", default=[], help="training curves to plot: reports/<stage>/curve.csv")
    p.add_argument("--report", required=True, help="the HTML report to write")
    p.add_argument("--plots", required=True, help="the folder of PNG plots to write")
    p.add_argument("--champion-hf", required=True,
                   help="the folder to write the champion policy to, as a Hugging Face transformers model")


def body(cfg: EvaluateConfig, ctx: StageContext) -> dict:
    from palm.eval import report

    models = {name: ctx.path(name) for name in (*MODELS, *given(ctx))}
    if ctx.args.gold_reward:
        models["gold_reward"] = ctx.path("gold_reward")
    result = evaluate(cfg, models=models, sft_data=ctx.path("sft_data"), prefs=ctx.path("prefs"),
                      tokens=ctx.path("tokens"))
    pngs = {"rewards": report.reward_plot(result.rewards)}
    curves, missing = {}, []
    for curve in map(Path, ctx.args.curves):
        stage = curve.parent.name  # reports/<stage>/curve.csv
        png = report.curve_plot(stage, ctx.root / curve) if (ctx.root / curve).is_file() else None
        if png is None:
            missing.append(stage)
            continue
        curves[stage] = pngs[f"curve_{stage}"] = png
    if missing:
        print(f"evaluate: no training curve for {', '.join(missing)}; the report goes without", file=sys.stderr)
    ppo_curve = next((ctx.root / c for c in ctx.args.curves if Path(c).parent.name == "ppo"), None)
    if ppo_curve is not None and ppo_curve.is_file():
        start = ppo_curve.parent / "metrics.json"
        png = report.overoptimisation_plot(ppo_curve, json.loads(start.read_text()) if start.is_file() else None)
        if png is not None:
            pngs["overoptimisation"] = png
    if cfg.human_judgments:
        from palm.eval.human import human_verdict

        found = human_verdict(ctx.root / cfg.human_judgments, model_a=ctx.path("sft"), model_b=ctx.path("ppo"))
        found.pop("human_comparisons", None)  # ids, not a measure
        result.metrics.update(found)  # judgements of this SFT (A) against this PPO policy (B) only
    if not result.metrics["verdict"]:
        print(f"warning: evaluate: only {result.metrics['prompts']} held-out prompts (< evaluate.min_prompts "
              f"{cfg.min_prompts}): no verdict, and the policy cannot become champion (more held-out data: "
              "sft_data.valid_fraction)", file=sys.stderr)
    for name in result.policies:
        if not result.metrics[versus("kl_within_limit", name)]:
            print(f"warning: evaluate: the {name} policy's KL to SFT is {result.metrics[versus('kl', name)]:.2f} nats "
                  f"per reply, beyond evaluate.kl_limit={cfg.kl_limit}: "
                  + ("its reward gains may be reward hacking (raise ppo.kl.coef or set ppo.kl.target)" if name == "ppo"
                     else f"it drifted far from its reference (raise {name}.beta)"), file=sys.stderr)
    page = report.html(result.metrics, result.samples, pngs["rewards"], curves, missing, pngs.get("overoptimisation"),
                       judges=result.judges, policies=result.policies)
    champion, why = champion_policy(result.metrics, result.policies, cfg.champion_metric, cfg.champion_direction)
    print(f"evaluate: the champion is {champion} ({why}); {ctx.args.champion_hf}: its Hugging Face export",
          file=sys.stderr)
    result.metrics["champion"] = champion
    # the export first: a failure there leaves every output as it was
    with atomic_dir(ctx.path("champion_hf")) as hf:
        export_hf(models[champion], hf)
        with atomic_dir(ctx.path("plots")) as out:
            for name, png in pngs.items():
                (out / f"{name}.png").write_bytes(png)
        with atomic_file(ctx.path("report"), "w", encoding="utf-8") as f:
            f.write(page)
    ctx.tracker.log_artifact(ctx.path("report"))
    for name in pngs:
        ctx.tracker.log_artifact(ctx.path("plots") / f"{name}.png")
    ctx.tracker.set_tags({"palm.champion": champion, "palm.champion_reason": why})
    ctx.tracker.log_artifacts(ctx.path("champion_hf"), "champion-hf")
    register(cfg, ctx, result.metrics)
    return result.metrics


def given(ctx: StageContext) -> tuple[str, ...]:
    """The optional policies given on the command line."""
    return tuple(name for name in OPTIONAL if getattr(ctx.args, name))


def register(cfg: EvaluateConfig, ctx: StageContext, metrics: dict) -> None:
    """Register the exports, each with the run that produced it (the DVC md5 of its folder: from
    dvc.yaml's dependencies, or computed here when the stage runs outside DVC); each policy is
    judged by the champion rule on its own metrics (policy_view: under PPO's names)."""
    from palm.eval.evaluate import policy_view
    from palm.ops import registry
    from palm.ops.stage import dvc_md5

    tracker = ctx.tracker
    if not tracker.enabled or tracker.run_id is None:
        return
    models = (*MODELS, *given(ctx))
    rel = {name: Path(getattr(ctx.args, name)).as_posix() for name in models}
    md5s = {name: ctx.inputs.get(rel[name]) or dvc_md5(ctx.path(name)) for name in models}
    missing = {rel[n]: md5s[n] for n in models if rel[n] not in ctx.parents}
    parents = {**ctx.parents, **(tracker.link_inputs(missing) if missing else {})}

    def go() -> None:
        registered = registry.register({name: ctx.path(name) for name in models}, md5s,
                                       {name: parents.get(rel[name]) for name in models}, evaluate_run=tracker.run_id,
                                       metrics=metrics, metric=cfg.champion_metric, direction=cfg.champion_direction,
                                       eval_set=metrics.get("eval_set", ""), root=ctx.root,
                                       policy_metrics={name: policy_view(metrics, name) for name in given(ctx)})
        tracker.set_tags({f"palm.registered.{r['name']}": str(r["version"]) for r in registered.values()})

    tracker.guard("model registration", go)


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", EvaluateConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
