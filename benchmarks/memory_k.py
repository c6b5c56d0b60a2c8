"""What deduplication and prefix reuse save with a memory of k rounds: prompts and tokens per iteration, one JSON line.

    python benchmarks/memory_k.py --model smollm2-135m-instruct --games 64 --rounds 5 --memory 1 2 3

For each memory k, an iteration of ``games`` x ``rounds`` against Tit-for-Tat is simulated with a uniformly random
agent (the most varied play: a trained, more deterministic agent visits fewer states) using the real prompt
renderer and tokenizer; no model runs. Reported per k: the number of prompt ids (4^k states x 4 option orders),
the distinct prompts the iteration shows, the tokens of every round's prompt (what a plain batch would run),
the tokens of the distinct prompts (after deduplication), and the tokens the shared-prefix tree runs for them
(what the engine runs per adapter and pass).
"""

from __future__ import annotations

import argparse
import json

import torch

from lit_moral import models
from lit_moral.games import MatrixGame
from lit_moral.prefix_tree import auto_levels, build_prompt_tree
from lit_moral.prompts import PromptRenderer, PromptStyle


def measure(tokenizer, memory: int, games: int, rounds: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = PromptRenderer(tokenizer, MatrixGame.from_spec("IPD"), PromptStyle(memory=memory))
    me = torch.randint(0, 2, (games, memory), generator=g)
    other = torch.randint(0, 2, (games, memory), generator=g)
    seen: list[int] = []
    for _ in range(rounds):
        seen += r.sample_ids(me, other, g).tolist()
        act = torch.randint(0, 2, (games,), generator=g)
        other = torch.cat([other[:, 1:], me[:, -1:]], 1)  # TFT plays my previous move
        me = torch.cat([me[:, 1:], act[:, None]], 1)
    distinct = sorted(set(seen))
    prompts = [("agent", r.token_ids[p]) for p in distinct]
    levels, _ = build_prompt_tree(prompts, auto_levels(prompts))
    return {"memory": memory, "prompt_ids": r.n_ids, "rounds_played": len(seen), "distinct_prompts": len(distinct),
            "tokens_every_round": sum(len(r.token_ids[p]) for p in seen),
            "tokens_distinct_prompts": sum(len(t) for _, t in prompts),
            "tokens_prefix_tree": sum(len(t) for lv in levels for t in lv.tokens),
            "mean_prompt_tokens": sum(len(t) for _, t in prompts) / len(prompts)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=models.SMOLLM2)
    ap.add_argument("--games", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(args.model), local_files_only=True)
    out = [measure(tokenizer, k, args.games, args.rounds, args.seed) for k in args.memory]
    for row in out:
        row["saving_vs_every_round"] = row["tokens_every_round"] / row["tokens_prefix_tree"]
    print(json.dumps({"model": args.model, "games": args.games, "rounds": args.rounds, "per_memory": out}))
    return out


if __name__ == "__main__":
    main()
