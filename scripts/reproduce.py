"""Re-run the paper's conditions with lit_moral, several seeds each, and keep every run's small results in the
repository (``docs/results/``), from which ``docs/results.md`` is generated.

    python scripts/reproduce.py                                  # every condition, seeds 0 1 2, constrained regime
    python scripts/reproduce.py --conditions game deontological --seeds 0 --dry-run
    python scripts/reproduce.py --regime free --conditions game  # free generation from the format warm-up
    python scripts/reproduce.py --report                         # only rebuild docs/results.md from docs/results/

Every condition is one of the ``configs/paper_*.yaml`` files (the paper's protocol: 1000 episodes, 5 rounds vs
TFT, 3 rounds with two learners, unlearning switch at episode 500), run through the real CLI with
``--seed_everything <seed>`` (one seed drives every random stream). Regimes (how the updates are made):

* ``constrained`` (default): constrained choice between the two action strings, 100 games per PPO iteration
  (10 iterations of 4 PPO epochs), Adam lr 2e-4, LoRA r8, fixed KL coefficient 0.05;
* ``free``: the same updates with the paper's free generation (2 tokens, temperature 1, -6 for an illegal
  answer), every agent's adapter initialised from the format warm-up (``configs/warmup_format.yaml``);
* ``paper_compat``: the configs' own hyperparameters (one episode per update, lr 1.41e-5, LoRA r64) with the
  original code's update rule (one Adam step per episode), in constrained mode; ``--episodes`` runs a
  documented fraction of the 1000 episodes.

Each finished run writes ``docs/results/<regime>/<condition>/seed<k>/``: ``config.yaml`` (the resolved run
config), ``train.csv`` (per iteration and agent: action types, cooperation, illegal share, regrets, reward),
the evaluation's ``summary.json``, ``summary.csv`` and ``report.md`` (the paper's: new tokens vs Random, plus
the training tokens and TFT; deontological regret at xi 4, the original evaluation's), and ``run.json`` (wall
times, device, final action types over the last 100 episodes, the checkpoint's sha256) last, which marks
the run as done: a condition x seed x regime with a ``run.json`` is skipped. ``--commit`` commits each run's
folder as it finishes. Checkpoints and TensorBoard events stay under ``--work`` (not committed).
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_moral.games import ACTION_TYPES  # noqa: E402

SINGLE = ["game", "deontological", "utilitarian", "game_deontological"]
CONDITIONS = {
    **{c: f"paper_{c}.yaml" for c in SINGLE},
    **{f"llm_vs_llm_{c}": f"paper_llm_vs_llm_{c}.yaml" for c in SINGLE},
    **{f"unlearning_{r}_vs_{o}": f"paper_unlearning_{r}_vs_{o}.yaml"
       for r in ("deontological", "utilitarian") for o in ("tft", "llm")},
}
FAST = ["--model.episodes_per_iteration", "100", "--model.iterations_per_epoch", "5", "--trainer.max_epochs", "2",
        "--model.lr", "2e-4", "--model.lora.r", "8", "--model.lora.alpha", "16", "--model.lora.dropout", "0.0",
        "--model.value_head_dropout", "0.0", "--model.ppo.kl_penalty", "fixed", "--model.ppo.init_kl_coef", "0.05"]
REGIMES = {
    "constrained": [*FAST, "--model.action_mode", "constrained"],
    "free": [*FAST, "--model.action_mode", "free", "--model.max_new_tokens", "2"],
    "paper_compat": ["--model.action_mode", "constrained", "--model.ppo.paper_compat", "true"],
}
WARMUP = ROOT / "docs" / "results" / "warmup"  # the committed format warm-up adapter of the free regime
# The evaluation of every run: the paper's (new tokens vs Random, 10 x 5, the original's xi = 4 in the
# deontological regret) plus the training tokens and TFT, which are cheap in constrained mode.
EVAL = ["--model.evaluation.variants", "[new_tokens, training_tokens]", "--model.evaluation.opponents",
        "[random, tft]", "--model.evaluation.xi", "4"]
EVAL_SEED = 1234  # run with training seed k is evaluated with seed EVAL_SEED + k (the base model varies too)
TRAIN_COLUMNS = ("episode", "agent", *ACTION_TYPES, "coop_rate", "illegal_rate", "regret_deontological",
                 "regret_utilitarian", "reward")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under ``run_dir``: tag -> [(step, value)] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(glob.glob(f"{run_dir}/**/events.out.tfevents*", recursive=True)):
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def train_rows(scalars: dict[str, list[tuple[int, float]]]) -> list[dict]:
    """One row per (iteration, agent) of the training metrics, the step being the episode count after it."""
    keys = {"coop_rate": "game/coop_rate", "illegal_rate": "game/illegal_rate",
            "regret_deontological": "moral/regret_deontological", "regret_utilitarian": "moral/regret_utilitarian",
            "reward": "reward/total", **{t: f"actions/{t}" for t in ACTION_TYPES}}
    agents = sorted({tag.rsplit("/", 1)[1] for tag in scalars if tag.startswith("actions/C|C/")})
    rows = []
    for agent in agents:
        by_step: dict[int, dict] = {}
        for col, prefix in keys.items():
            for step, v in scalars.get(f"{prefix}/{agent}", []):
                by_step.setdefault(step, {"episode": step, "agent": agent})[col] = v
        rows += [by_step[s] for s in sorted(by_step)]
    return rows


def final_actions(rows: list[dict], last: int = 100) -> dict[str, dict[str, float]]:
    """Per agent, action-type shares over the last ``last`` episodes: the mean over every iteration that ends
    in them (each iteration plays the same number of episodes), not just the last logged step."""
    out: dict[str, dict[str, float]] = {}
    for agent in sorted({r["agent"] for r in rows}):
        mine = [r for r in rows if r["agent"] == agent]
        end = max(r["episode"] for r in mine)
        window = [r for r in mine if r["episode"] > end - last]
        out[agent] = {t: sum(float(r[t]) for r in window) / len(window) for t in ACTION_TYPES}
        out[agent]["iterations"] = len(window)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads ({platform.node()})"


def run_command(cond: str, seed: int, regime: str, work: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / CONDITIONS[cond]),
           "--seed_everything", str(seed), "--model.run_name", f"{cond}_seed{seed}",
           "--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.version", "run",
           "--model.model", args.model, *REGIMES[regime]]
    if regime == "free":
        cmd += ["--model.init_adapter", str(args.warmup)]
    if regime == "paper_compat" and args.episodes:
        cmd += ["--model.iterations_per_epoch", str(args.episodes), "--trainer.max_epochs", "1"]
    return cmd


def run_one(cond: str, seed: int, regime: str, args) -> Path | None:
    """Train, evaluate and copy the small results of one run; returns its results folder."""
    dest = args.results / regime / cond / f"seed{seed}"
    work = args.work / regime
    run_dir = work / f"{cond}_seed{seed}" / "run"
    cmd = run_command(cond, seed, regime, work, args)
    print("+", " ".join(cmd), flush=True)
    if args.dry_run:
        return None
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt (no run.json)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - t0
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ev = run_dir / "evaluation"
    t1 = time.time()
    evaluate(run_dir / "config.yaml", ckpt, ev, seed)
    eval_wall = time.time() - t1
    rows = train_rows(read_scalars(run_dir))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    for name in ("summary.json", "summary.csv", "report.md"):
        shutil.copy(ev / name, dest / name)
    with open(dest / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(TRAIN_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    info = {"condition": cond, "seed": seed, "regime": regime, "model": args.model, "device": device_name(),
            "wall_s": round(wall, 1), "eval_wall_s": round(eval_wall, 1), "episodes": max(r["episode"] for r in rows),
            "final_actions": final_actions(rows), "checkpoint_sha256": sha256(ckpt), "command": cmd[1:],
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()}
    (dest / "run.json").write_text(json.dumps(info, indent=1) + "\n")  # written last: the run is done
    if args.commit:
        commit(dest, f"results: {regime} {cond} seed {seed}")
    return dest


def commit(dest: Path, message: str, tries: int = 10) -> None:
    """``git commit`` only ``dest``, in the repository that holds it (the sweep may run from a worktree of a fixed
    commit while results land in the main checkout); retried while another git command holds the index."""
    for k in range(tries):
        add = subprocess.run(["git", "add", str(dest)], cwd=dest, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", str(dest)], cwd=dest, capture_output=True).returncode == 0
        if done:
            return
        time.sleep(3 * (k + 1))
    print(f"warning: could not commit {dest}", file=sys.stderr)


def evaluate(config: Path, ckpt: Path, out: Path, seed: int) -> None:
    cmd = [sys.executable, "-m", "lit_moral", "evaluate", "--config", str(config), "--out", str(out), "--ckpt",
           str(ckpt), *EVAL, "--model.evaluation.seed", str(EVAL_SEED + seed), "--model.evaluation.plots", "false"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def done(results: Path, regime: str, cond: str, seed: int) -> bool:
    return (results / regime / cond / f"seed{seed}" / "run.json").is_file()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--regime", choices=list(REGIMES), default="constrained")
    ap.add_argument("--episodes", type=int, default=0,
                    help="paper_compat only: run this many episodes of the 1000 (0: all)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--warmup", type=Path, default=WARMUP / "adapter", help="free regime: the warm-up adapter")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="where small results go")
    ap.add_argument("--work", type=Path, default=ROOT / "checkpoints" / "reproduce",
                    help="checkpoints and TensorBoard events (not committed)")
    ap.add_argument("--commit", action="store_true", help="git commit each run's results folder when it is done")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--report", action="store_true",
                    help="only regenerate docs/results.md's tables and figures from the results folder")
    args = ap.parse_args(argv)
    if args.report:
        from results_report import write_report  # scripts/results_report.py

        print(write_report(args.results, ROOT / "docs" / "results.md", ROOT / "docs" / "figures",
                           ROOT / "docs" / "benchmarks"))
        return
    for cond in args.conditions:
        for seed in args.seeds:
            if not done(args.results, args.regime, cond, seed):
                run_one(cond, seed, args.regime, args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
