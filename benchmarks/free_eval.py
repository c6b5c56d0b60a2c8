"""Free-mode evaluation speed: answers cut once they can no longer be legal (the default) vs generated in full.

A free-mode module on SmolLM2 whose agent starts from ``--init-adapter`` (the committed format warm-up; ``none``: a
fresh adapter) is evaluated as the runs of the reproduction are: the agent, the starting adapter (``warmup``) and
the base model (which writes prose: nearly every answer is cut after one token) play the evaluation's cells
(``--games`` x ``--variants`` x ``--opponents``, ``--episodes`` games of ``--rounds`` rounds) twice from the same
seed three times: ``before``, the path of earlier versions (every answer generated to ``max_new_tokens``, each
step's prompts run again); ``full``: every answer generated in full, a prompt's first step also running the step
after the legal answers' first token (``ActionSampler.prefetch``); ``cut``: as ``full`` with
``evaluation.cut_illegal`` (the default: an answer stops once it can no longer be legal). Prints one JSON object as
the last line of stdout::

    OMP_NUM_THREADS=2 python benchmarks/free_eval.py --out docs/benchmarks/free_eval.json

Fields: ``before_s`` / ``full_s`` / ``cut_s``: seconds of each evaluation (model loading excluded); ``speedup``:
``before_s / cut_s``; ``rows``: rounds played per evaluation; ``same_rounds``: whether every round's columns except
``answer`` are equal in all three (exact with ``max_new_tokens`` 2; the prefetch changes batch composition only,
so a draw could differ in the last float digit); ``cut_rounds``: rounds whose answer was cut; ``illegal``: each
model's illegal share.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--init-adapter", default=str(ROOT / "docs/results/warmup/adapter"))
    ap.add_argument("--games", nargs="+", default=["IPD"])
    ap.add_argument("--variants", nargs="+", default=["new_tokens", "training_tokens"])
    ap.add_argument("--opponents", nargs="+", default=["random"])
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lit_moral import evaluation
    from lit_moral.evaluation import EvalConfig, evaluate
    from lit_moral.module import MoralPPO
    from lit_moral.policy import LoraSpec

    init = None if args.init_adapter == "none" else args.init_adapter
    m = MoralPPO(model=args.model, action_mode="free", max_new_tokens=2, init_adapter=init,
                 lora=LoraSpec(r=8, alpha=16))
    m.configure_model()
    cfg = dict(episodes=args.episodes, rounds=args.rounds, games=args.games, variants=args.variants,
               opponents=args.opponents, plots=False)
    sampler = evaluation._EvalSampler
    out, rows = {}, {}
    for name, cut, prefetch in (("before", False, False), ("full", False, True), ("cut", True, True)):
        evaluation._EvalSampler = functools.partial(sampler, prefetch=prefetch)
        t0 = time.perf_counter()
        rows[name] = evaluate(m, EvalConfig(**cfg, cut_illegal=cut))
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    evaluation._EvalSampler = sampler
    strip = lambda r: {k: v for k, v in r.items() if k != "answer"}  # noqa: E731
    models = sorted({r["model"] for r in rows["cut"]})
    same = all(len(rows[n]) == len(rows["before"]) and all(strip(a) == strip(b) for a, b in zip(rows[n], rows["before"]))
               for n in ("full", "cut"))
    out.update(
        speedup=round(out["before_s"] / out["cut_s"], 2), rows=len(rows["cut"]), same_rounds=same,
        cut_rounds=sum(a["answer"] != b["answer"] for a, b in zip(rows["full"], rows["cut"])),
        illegal={mo: sum(not r["legal"] for r in rows["cut"] if r["model"] == mo) / sum(r["model"] == mo for r in rows["cut"])
                 for mo in models},
        cells=len(args.games) * len(args.variants) * len(args.opponents) * len(models), threads=args.threads,
        model=args.model, machine=f"{platform.machine()} {os.cpu_count()} cores", torch=torch.__version__)
    line = json.dumps(out)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
