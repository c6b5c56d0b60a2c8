"""Re-run the paper's conditions with lit_moral, several seeds each, and collect what docs/results.md reports.

    python scripts/reproduce.py                         # every condition, seeds 0 1 2, CPU profile
    python scripts/reproduce.py --conditions game deontological --seeds 0 --dry-run

Every condition is one of the ``configs/paper_*.yaml`` files (the paper's protocol: 1000 episodes, 5
rounds vs TFT, 3 rounds with two learners, unlearning switch at episode 500), run through the real
CLI. The ``fast`` profile (default) keeps the protocol (episodes, rounds, rewards, schedules) and
changes how the updates are made, because SmolLM2-135M cannot learn the answer format in free mode
within 1000 episodes (it puts ~0.04% probability on the legal strings):
constrained action choice, 100 games per PPO iteration (10 iterations of 4 PPO epochs), Adam lr
2e-4, LoRA r8, fixed KL coefficient 0.05. ``--profile paper`` runs the configs unchanged.
``--paper-compat`` adds a run of the four single-agent conditions with the original's update rule.

Each run writes ``<out>/<condition>_seed<k>/`` (TensorBoard events, checkpoint, peft adapters); the
script appends one JSON line per run to ``<out>/runs.jsonl`` (condition, seed, wall time, final
training action-type frequencies, checkpoint path). A run already listed there is skipped, so an
interrupted reproduction resumes where it stopped. ``--evaluate`` then runs the evaluation suite on
each condition's checkpoints together (``<out>/<condition>_evaluation/``: report.md, summary.json,
plots; CIs over seeds), and ``--figure F.png`` draws the training action types of every listed run.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ["game", "deontological", "utilitarian", "game_deontological"]
CONDITIONS = {
    **{c: f"paper_{c}.yaml" for c in SINGLE},
    **{f"llm_vs_llm_{c}": f"paper_llm_vs_llm_{c}.yaml" for c in SINGLE},
    **{f"unlearning_{r}_vs_{o}": f"paper_unlearning_{r}_vs_{o}.yaml"
       for r in ("deontological", "utilitarian") for o in ("tft", "llm")},
}
FAST = ["--model.action_mode", "constrained", "--model.episodes_per_iteration", "100",
        "--model.iterations_per_epoch", "5", "--trainer.max_epochs", "2", "--model.lr", "2e-4",
        "--model.lora.r", "8", "--model.lora.alpha", "16", "--model.lora.dropout", "0.0",
        "--model.value_head_dropout", "0.0", "--model.ppo.kl_penalty", "fixed", "--model.ppo.init_kl_coef", "0.05"]
ACTION_TYPES = ["C|C", "C|D", "D|C", "D|D", "illegal"]
# docs/results.md's evaluation: the paper's (new tokens vs Random, 10 x 5, the original's xi = 4 in the
# deontological regret) plus the training tokens and TFT, which are cheap in constrained mode.
EVAL = ["--model.evaluation.variants", "[new_tokens, training_tokens]", "--model.evaluation.opponents",
        "[random, tft]", "--model.evaluation.xi", "4"]


def final_actions(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per agent, the action-type frequencies of the last training iteration (from TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[str, float]] = {}
    for f in sorted(glob.glob(f"{run_dir}/**/events.out.tfevents*", recursive=True)):
        ea = EventAccumulator(f)
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            parts = tag.split("/")
            if len(parts) == 3 and parts[0] == "actions" and parts[1] in ACTION_TYPES:
                out.setdefault(parts[2], {})[parts[1]] = ea.Scalars(tag)[-1].value
    return out


def training_figure(records: list[dict], out: Path) -> Path:
    """One panel per run: the share of each action type per iteration over training episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    colors = ["#2ca02c", "#98df8a", "#d62728", "#ff9896", "#7f7f7f"]
    fig, axes = plt.subplots(1, len(records), figsize=(4.2 * len(records), 3.4), squeeze=False)
    for ax, rec in zip(axes[0], records):
        series: dict[str, list[tuple[int, float]]] = {}
        for f in sorted(glob.glob(f"{Path(rec['checkpoint']).parents[1]}/events.out.tfevents*")):
            ea = EventAccumulator(f)
            ea.Reload()
            for t in ACTION_TYPES[:4]:
                tag = f"actions/{t}/agent_0"
                if tag in ea.Tags()["scalars"]:
                    series[t] = [(e.step, e.value) for e in ea.Scalars(tag)]
        steps = [s for s, _ in series["C|C"]]
        shares = [[v for _, v in series[t]] for t in ACTION_TYPES[:4]]
        illegal = [max(0.0, 1 - sum(col)) for col in zip(*shares)]
        ax.stackplot(steps, *shares, illegal, labels=ACTION_TYPES, colors=colors)
        ax.set_title(f"{rec['condition']} (seed {rec['seed']}), agent_0", fontsize=9)
        ax.set_xlabel("episode")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of rounds")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# PAPER.md section 8 (read off the paper's Figure 4): regrets vs Random with new tokens, trained vs TFT.
PAPER_GAMES = ["IPD", "ISH", "ICN", "BOS", "ICD"]
PAPER_DEON = {"base": [5.8, 5.8, 5.7, 5.8, 5.8], "game": [1.70, 1.65, 1.65, 1.65, 1.65],
              "deontological": [0.10, 0.10, 0.10, 0.05, 0.10], "utilitarian": [0.05] * 5,
              "game_deontological": [0.40, 0.40, 0.40, 0.25, 0.15],
              "unlearning_deontological_vs_tft": [0.35, 0.45, 0.45, 0.35, 0.40],
              "unlearning_utilitarian_vs_tft": [0.95, 0.90, 0.95, 0.90, 0.95]}
PAPER_UTIL = {"base": [0.97, 0.97, 0.96, 0.97, 0.98], "game": [0.24, 0.38, 0.24, 0.18, 0.24],
              "deontological": [0.13, 0.26, 0.09, 0.24, 0.42], "utilitarian": [0.09, 0.20, 0.03, 0.25, 0.5],
              "game_deontological": [0.18, 0.32, 0.16, 0.23, 0.38],
              "unlearning_deontological_vs_tft": [0.14, 0.28, 0.13, 0.23, 0.40],
              "unlearning_utilitarian_vs_tft": [0.18, 0.29, 0.16, 0.22, 0.36]}


def markdown_tables(out: Path, variant: str = "new_tokens", opponent: str = "random") -> str:
    """The tables of docs/results.md from ``runs.jsonl`` and every ``*_evaluation/summary.json``."""
    records = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    lines = ["### Training: action types of the last iteration (episodes 901-1000), per agent", "",
             "| condition | seed | agent | " + " | ".join(ACTION_TYPES) + " | wall (min) |",
             "|---" * (len(ACTION_TYPES) + 4) + "|"]
    for r in records:
        name = r["condition"] + (" (paper_compat)" if r["paper_compat"] else "")
        for agent, freq in sorted(r["final_actions"].items()):
            illegal = max(0.0, 1 - sum(freq.get(t, 0.0) for t in ACTION_TYPES[:4]))
            cells = [f"{freq.get(t, 0.0):.2f}" for t in ACTION_TYPES[:4]] + [f"{illegal:.2f}"]
            lines.append(f"| {name} | {r['seed']} | {agent} | " + " | ".join(cells) + f" | {r['wall_s'] / 60:.1f} |")
    order = {c: i for i, c in enumerate(CONDITIONS)}
    evals = []  # (condition, summary), in the order of CONDITIONS; read once for both tables
    for f in out.glob("*_evaluation/summary.json"):
        cond = f.parent.name.removesuffix("_evaluation")
        evals.append((cond, json.loads(f.read_text())))
    evals.sort(key=lambda e: (order.get(e[0].removesuffix("_compat"), len(order)), e[0]))
    for metric, paper, digits in (("regret_deontological", PAPER_DEON, 2), ("regret_utilitarian", PAPER_UTIL, 3)):
        lines += ["", f"### {metric.replace('_', ' ')}: {variant} vs {opponent}, mean ± 95% CI "
                  "(paper's Figure 4 value in brackets)", "",
                  "| condition | model | runs | " + " | ".join(PAPER_GAMES) + " |", "|---" * 8 + "|"]
        base_row, rows = None, []
        for cond, data in evals:
            cells = {(c["model"], c["game"]): c for c in data["cells"]
                     if c["variant"] == variant and c["opponent"] == opponent}
            for model in data["meta"]["models"]:
                if model == "base" and base_row:
                    continue  # the base model is the same in every evaluation: one row
                ref = paper.get("base" if model == "base" else cond.removesuffix("_compat"))  # None: no paper value
                row = []
                for i, g in enumerate(PAPER_GAMES):
                    c = cells.get((model, g))
                    v = "-" if c is None else f"{c[f'{metric}_mean']:.{digits}f} ± {c[f'{metric}_ci']:.{digits}f}"
                    row.append(v + (f" [{ref[i]}]" if ref else ""))
                label = "no fine-tuning" if model == "base" else cond
                line = f"| {label} | {model} | {data['meta']['runs']} | " + " | ".join(row) + " |"
                if model == "base":
                    base_row = line
                else:
                    rows.append(line)
        lines += ([base_row] if base_row else []) + rows
    return "\n".join(lines) + "\n"


def run_one(cond: str, seed: int, args) -> dict:
    name = f"{cond}{'_compat' if args.compat_run else ''}_seed{seed}"
    cmd = [sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / CONDITIONS[cond]),
           "--seed_everything", str(seed), "--model.seed", str(seed), "--model.run_name", name,
           "--trainer.logger.init_args.save_dir", str(args.out), "--model.model", args.model]
    cmd += FAST if args.profile == "fast" else []
    cmd += ["--model.ppo.paper_compat", "true"] if args.compat_run else []
    print("+", " ".join(cmd), flush=True)
    if args.dry_run:
        return {}
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - t0
    run_dir = args.out / name
    ckpts = sorted(glob.glob(f"{run_dir}/**/last.ckpt", recursive=True))
    return {"condition": cond, "seed": seed, "paper_compat": args.compat_run, "profile": args.profile,
            "model": args.model, "wall_s": round(wall, 1), "final_actions": final_actions(run_dir),
            "checkpoint": ckpts[-1] if ckpts else None, "name": name}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--profile", choices=("fast", "paper"), default="fast")
    ap.add_argument("--paper-compat", action="store_true", help="also run the single-agent conditions with paper_compat")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "reproduce")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--evaluate", action="store_true", help="then run the evaluation suite per condition")
    ap.add_argument("--eval-args", nargs=argparse.REMAINDER, default=EVAL,
                    help="passed to python -m lit_moral.evaluation (default: %(default)s)")
    ap.add_argument("--figure", type=Path, default=None,
                    help="only draw the training action types of the runs in runs.jsonl into this PNG")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="only write the tables of docs/results.md (training action types, regrets beside the "
                         "paper's) from runs.jsonl and the evaluations into this file")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    if args.markdown:
        args.markdown.write_text(markdown_tables(args.out))
        print(args.markdown)
        return
    if args.figure:
        print(training_figure([json.loads(x) for x in log.read_text().splitlines()], args.figure))
        return
    done = {(r["condition"], r["seed"], r["paper_compat"]) for r in map(json.loads, log.read_text().splitlines())} \
        if log.exists() else set()
    jobs = [(c, s, False) for c in args.conditions for s in args.seeds]
    jobs += [(c, s, True) for c in args.conditions if c in SINGLE for s in args.seeds] if args.paper_compat else []
    for cond, seed, compat in jobs:
        if (cond, seed, compat) in done:
            continue
        args.compat_run = compat
        rec = run_one(cond, seed, args)
        if rec:
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    if args.evaluate and not args.dry_run:
        evaluate(log, args)


def evaluate(log: Path, args) -> None:
    """The evaluation suite on every condition's checkpoints together (CIs over seeds), base model beside."""
    records = [json.loads(x) for x in log.read_text().splitlines()]
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in records:
        groups.setdefault((r["condition"], r["paper_compat"]), []).append(r)
    for (cond, compat), recs in groups.items():
        out = args.out / f"{cond}{'_compat' if compat else ''}_evaluation"
        if (out / "summary.json").exists():
            continue
        config = Path(recs[0]["checkpoint"]).parents[1] / "config.yaml"
        cmd = [sys.executable, "-m", "lit_moral.evaluation", "--config", str(config), "--out", str(out),
               "--ckpt", *[r["checkpoint"] for r in recs], *args.eval_args]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
