"""Learners compared: episodes and wall time until each reward's target behaviour vs Tit-for-Tat.

For each learner (``model.algorithm``), reward and seed, trains one agent against TFT with quickstart-like
settings (constrained actions, 64 games x 5 rounds per iteration, lr 2e-4, LoRA r 8, 4 epochs, fixed KL 0.05)
for up to ``--iterations`` iterations, stopping at the reward's criterion (protocol section 5's myopic optima):

- ``deontological``: P(D | other's previous move C) < 0.05;
- ``game``: cooperation (share of C answers) < 0.05;
- ``game_deontological``: P(C | C) > 0.9 and P(D | D) > 0.9 (TFT-like);
- ``utilitarian``: cooperation > 0.95 (C maximises the joint payoff whatever the other did).

``--lora-layers k`` adapts only the top k decoder layers (the shared frozen trunk of issue 21; 0: all layers), so
the same script is the learning check of that lever; ``lora_layers`` is part of a run's identity in ``--out``.

The criterion is checked on each iteration's games (played before that iteration's update); the episodes to it
count every game played up to and including that iteration. Each finished run is appended as one JSON line to
``--out`` (its per-iteration action types, the episodes and wall seconds at the criterion, the final action
types); a run already in that file (same learner, reward, seed, model, games and rounds) is skipped, so an
interrupted benchmark resumes. The last line of stdout is one JSON object: per learner and reward, over seeds,
how many reached the criterion, episodes and wall seconds to it (mean, sd, min, max) and the final action types
(mean, sd, min, max). From a checkout that is not the installed one, run it with ``PYTHONPATH=.``. Example::

    python benchmarks/learners.py --model smollm2-135m-instruct --seeds 0 1 2 --out learners.jsonl
    python benchmarks/learners.py --model tiny --iterations 1 --games 8 --rounds 2 --out /tmp/smoke.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_moral.games import ACTION_TYPES
from lit_moral.learners import LEARNERS
from lit_moral.module import AgentConfig, MoralPPO
from lit_moral.policy import LoraSpec
from lit_moral.ppo import PPOConfig

REWARDS = ("deontological", "game", "game_deontological", "utilitarian")


def conditional(types: dict[str, float], act: str, prev: str) -> float | None:
    """P(my ``act`` | other's previous ``prev``) from action-type frequencies (None when ``prev`` never occurred)."""
    total = types[f"C|{prev}"] + types[f"D|{prev}"] + types[f"illegal|{prev}"]
    return types[f"{act}|{prev}"] / total if total > 0 else None


def reached(reward: str, types: dict[str, float]) -> bool:
    """Whether this iteration's action types meet ``reward``'s criterion."""
    if reward == "deontological":
        p = conditional(types, "D", "C")
        return p is not None and p < 0.05
    if reward == "game":
        return types["C|C"] + types["C|D"] < 0.05
    if reward == "utilitarian":
        return types["C|C"] + types["C|D"] > 0.95
    cc, dd = conditional(types, "C", "C"), conditional(types, "D", "D")
    return cc is not None and dd is not None and cc > 0.9 and dd > 0.9


class _Record(pl.Callback):
    """Per iteration: action types, episode, wall seconds since the start; stops at the criterion."""

    def __init__(self, reward: str, stop: bool) -> None:
        self.reward, self.stop = reward, stop
        self.rows: list[dict] = []
        self.hit: dict | None = None
        self.t0 = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        types = dict(zip(ACTION_TYPES, pl_module.last_action_types["agent_0"].tolist()))
        row = {"iteration": pl_module.iteration, "episode": pl_module.episode, "action_types": types,
               "wall_s": time.perf_counter() - self.t0}
        self.rows.append(row)
        if self.hit is None and reached(self.reward, types):
            self.hit = row
            trainer.should_stop = self.stop


def run_one(args, learner: str, reward: str, seed: int) -> dict:
    pl.seed_everything(seed)
    m = MoralPPO(model=args.model, dtype=args.dtype, agents=[AgentConfig("agent_0", reward)], opponent="tft",
                 rounds_per_episode=args.rounds, episodes_per_iteration=args.games, iterations_per_epoch=1,
                 action_mode="constrained", lr=2e-4,
                 lora=LoraSpec(r=8, alpha=16, dropout=0.0, layers=args.lora_layers), value_head_dropout=0.0,
                 ppo=PPOConfig(ppo_epochs=4, minibatches=1, init_kl_coef=0.05, kl_penalty="fixed"),
                 algorithm=learner, seed=seed, run_name=f"{learner}-{reward}-{seed}")
    rec = _Record(reward, stop=not args.no_stop)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(default_root_dir=root, max_epochs=args.iterations, accelerator=args.accelerator,
                             devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[rec])
        t0 = time.perf_counter()
        trainer.fit(m)
        wall = time.perf_counter() - t0
    hit = rec.hit
    return {"learner": learner, "reward": reward, "seed": seed, "model": args.model, "games": args.games,
            "rounds": args.rounds, "lora_layers": args.lora_layers, "iterations_run": len(rec.rows), "wall_s": wall,
            "reached": hit is not None,
            "episodes_to_criterion": hit["episode"] if hit else None,
            "wall_s_to_criterion": hit["wall_s"] if hit else None,
            "final_action_types": rec.rows[-1]["action_types"], "per_iteration": rec.rows}


def _spread(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def summarize(records: list[dict]) -> dict:
    """Per ``learner/reward``: seeds, how many reached the criterion, episodes and wall to it, final action types."""
    out: dict[str, dict] = {}
    for key in sorted({(r["learner"], r["reward"]) for r in records}):
        rs = sorted((r for r in records if (r["learner"], r["reward"]) == key), key=lambda r: r["seed"])
        hits = [r for r in rs if r["reached"]]
        out["/".join(key)] = {
            "seeds": [r["seed"] for r in rs], "reached": len(hits),
            "episodes_to_criterion": _spread([r["episodes_to_criterion"] for r in hits]),
            "wall_s_to_criterion": _spread([r["wall_s_to_criterion"] for r in hits]),
            "final_action_types": {t: _spread([r["final_action_types"][t] for r in rs]) for t in ACTION_TYPES},
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    p.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=20, help="at most this many iterations per run")
    p.add_argument("--games", type=int, default=64, help="games per iteration")
    p.add_argument("--rounds", type=int, default=5, help="rounds per game")
    p.add_argument("--lora-layers", type=int, default=0, help="LoRA on the top k decoder layers only (0: all)")
    p.add_argument("--no-stop", action="store_true", help="play every iteration instead of stopping at the criterion")
    p.add_argument("--out", default="learners.jsonl", help="JSONL of finished runs (read to skip them, then appended)")
    args = p.parse_args(argv)
    args.accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    # A run is identified by what it trained on; other iteration limits share a file only by the user's choice.
    key = lambda r: (r["learner"], r["reward"], r["seed"], r["model"], r["games"], r["rounds"],  # noqa: E731
                     r.get("lora_layers", 0))
    have = {key(r) for r in done}
    for learner in args.learners:
        for reward in args.rewards:
            for seed in args.seeds:
                if (learner, reward, seed, args.model, args.games, args.rounds, args.lora_layers) in have:
                    continue
                rec = run_one(args, learner, reward, seed)
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                done.append(rec)
                print(f"{learner} {reward} seed {seed}: reached={rec['reached']} "
                      f"episodes={rec['episodes_to_criterion']} wall={rec['wall_s']:.1f}s", file=sys.stderr)
    mine = [r for r in done
            if key(r)[3:] == (args.model, args.games, args.rounds, args.lora_layers) and r["learner"] in args.learners
            and r["reward"] in args.rewards and r["seed"] in args.seeds]
    summary = {"model": args.model, "threads": torch.get_num_threads(), "lora_layers": args.lora_layers,
               "summary": summarize(mine)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
