"""Tables of ``docs/results.md`` built from the benchmark JSONL files of ``docs/benchmarks/`` alone.

- ``learners``: ``learners.jsonl`` (``benchmarks/learners.py``, all-layer LoRA): per reward and learner, over
  seeds, how many runs reached the reward's criterion, episodes to it, wall seconds and the final action types;
- ``topk_learning``: ``topk_learning.jsonl`` (the same script with ``--lora-layers k``, PPO): the same per reward
  and number of adapted layers k (0 = all layers).

Rows of other models or game sizes than the first row's are left out (the table says which it shows).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

REWARD_ORDER = ["deontological", "utilitarian", "game", "game_deontological"]
LEARNER_ORDER = ["ppo", "grpo", "rloo", "reinforce"]
TYPES = ("C|C", "C|D", "D|C", "D|D")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return rows
    first = rows[0]
    return [r for r in rows if (r["model"], r["games"], r["rounds"]) == (first["model"], first["games"], first["rounds"])]


def _mean_sd(xs: list[float], digits: int = 0) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    return f"{m:.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def _row(label: list[str], runs: list[dict]) -> str:
    hits = [r for r in runs if r["reached"]]
    seeds = ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
    types = " / ".join(f"{statistics.mean(r['final_action_types'][t] for r in runs):.2f}" for t in TYPES)
    iters = _mean_sd([r["iterations_run"] for r in runs], 1)
    return (f"| {' | '.join(label)} | {seeds} | {len(hits)}/{len(runs)} | "
            f"{_mean_sd([r['episodes_to_criterion'] for r in hits])} | {iters} | "
            f"{_mean_sd([r['wall_s'] for r in runs])} | {types} |")


def _table(rows: list[dict], label, sort, head: list[str]) -> str:
    """One row per ``label(run)`` (a tuple of strings), ordered by ``sort(label)``."""
    if not rows:
        return "(no runs yet)"
    groups: dict = {}
    for r in rows:
        groups.setdefault(label(r), []).append(r)
    r0 = rows[0]
    lines = [f"{r0['model']}, {r0['games']} games x {r0['rounds']} rounds per iteration, vs TFT; mean ± sd over "
             "seeds (episodes: over the runs that reached the criterion); final action types: mean over seeds.", "",
             f"| {' | '.join(head)} | seeds | reached | episodes to criterion | iterations run | wall s (run) | "
             "final C\\|C / C\\|D / D\\|C / D\\|D |",
             "|" + "---|" * (len(head) + 6)]
    lines += [_row(list(k), groups[k]) for k in sorted(groups, key=sort)]
    return "\n".join(lines)


def _reward_rank(reward: str) -> int:
    return REWARD_ORDER.index(reward) if reward in REWARD_ORDER else len(REWARD_ORDER)


def learners_table(path: Path) -> str:
    rows = [r for r in read_jsonl(path) if not r.get("lora_layers")]
    return _table(rows, lambda r: (r["reward"], r["learner"]),
                  lambda k: (_reward_rank(k[0]), LEARNER_ORDER.index(k[1]) if k[1] in LEARNER_ORDER else 9),
                  ["reward", "learner"])


def topk_table(path: Path) -> str:
    rows = [r for r in read_jsonl(path) if r["learner"] == "ppo"]
    layers = lambda r: str(r.get("lora_layers") or "all")  # noqa: E731
    return _table(rows, lambda r: (r["reward"], layers(r)),
                  lambda k: (_reward_rank(k[0]), -999 if k[1] == "all" else -int(k[1])),
                  ["reward", "adapted layers (of 30)"])


def benchmark_blocks(benchmarks: Path) -> dict[str, str]:
    return {"learners": learners_table(benchmarks / "learners.jsonl"),
            "topk_learning": topk_table(benchmarks / "topk_learning.jsonl")}
