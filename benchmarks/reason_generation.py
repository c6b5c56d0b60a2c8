"""Reason-mode generation speed: lit_moral's batched KV-cached rollout vs plain ``transformers`` ``generate``.

Both sample up to ``--new-tokens`` tokens after the same ``--games`` prompts (one round of every game, one agent
with a LoRA adapter, temperature 1, full distribution), in one batch. Ours also computes what PPO needs (per-token
log-prob, value, entropy); ``generate`` only samples. Prints one JSON object as the last line of stdout::

    OMP_NUM_THREADS=1 python benchmarks/reason_generation.py --out docs/benchmarks/reason.json

Fields: ``ours`` / ``hf_generate``: ``seconds``, ``generated_tokens`` (up to and including EOS), ``tokens_per_s``,
``agent_moves_per_s`` (answers per second); ``speedup`` (our tokens/s over generate's); ``ours_with_reference``:
the rollout as training runs it (plus the KL reference's teacher-forced pass); ``answers``: legal and illegal
shares and mean length of the answers run to EOS / ``--new-tokens`` and, from the same draws, with
``stop_at_action`` (each answer ends at its first completed ``Action:`` line; the rollout's default); ``update``:
seconds of one forward and backward of the update's per-token scoring over ``--update-samples`` of the answers, and
per generated token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lit_moral import models
from lit_moral.games import MatrixGame
from lit_moral.policy import LoraSpec, Policy
from lit_moral.prompts import PromptRenderer, PromptStyle
from lit_moral.reason import parse_reasoned
from lit_moral.rollout import ActionSampler


def _prompts(renderer: PromptRenderer, games: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prev = torch.randint(0, 2, (2, games), generator=g)
    return renderer.sample_ids(prev[0], prev[1], g)


def _ours(policy, renderer, pid, new_tokens: int, reference: bool, seed: int,
          stop: bool = False) -> tuple[float, list]:
    sampler = ActionSampler(policy, renderer, "reason", new_tokens, with_reference=reference, stop_at_action=stop)
    t0 = time.perf_counter()
    (mv,) = sampler.act([("agent_0", pid)], torch.Generator().manual_seed(seed))
    return time.perf_counter() - t0, mv.responses


def _hf(policy, renderer, pid, new_tokens: int, seed: int) -> tuple[float, int]:
    tok = renderer.tokenizer
    rows = [renderer.token_ids[p] for p in pid.tolist()]
    width, pad = max(map(len, rows)), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    policy.activate("agent_0")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = policy.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                                temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    gen = out[:, width:]
    count = 0
    for row in gen.tolist():  # tokens up to and including the first EOS
        count += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return dt, count


def _answers(renderer, responses) -> dict:
    """Shares of legal answers and of each illegal kind, and the mean answer length in tokens."""
    kinds = [parse_reasoned(renderer.tokenizer.decode(list(r), skip_special_tokens=True), renderer.style.actions)[1]
             for r in responses]
    return {"shares": {k: kinds.count(k) / len(kinds) for k in sorted(set(kinds))},
            "mean_tokens": sum(len(r) for r in responses) / len(responses)}


def _update_cost(policy, renderer, pid, responses, n: int) -> dict:
    policy.train()
    policy.activate("agent_0")
    t0 = time.perf_counter()
    out = policy.score_samples("agent_0", renderer.token_ids, pid[:n], responses=responses[:n])
    loss = (out["logp"] * out["mask"]).sum() + (out["values"] * out["mask"]).sum()
    loss.backward()
    dt = time.perf_counter() - t0
    policy.eval()
    tokens = sum(len(r) for r in responses[:n])
    return {"samples": n, "tokens": tokens, "seconds": dt, "seconds_per_token": dt / tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=models.SMOLLM2)
    p.add_argument("--games", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--update-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    base, tok = models.load(args.model)
    policy = Policy(base, ["agent_0"], LoraSpec(r=8, alpha=16))
    policy.eval()
    renderer = PromptRenderer(tok, MatrixGame.from_spec("IPD"), PromptStyle(answer="reason"))
    pid = _prompts(renderer, args.games, args.seed)
    _ours(policy, renderer, pid[:2], 2, False, 99)  # warm-up of both paths
    _hf(policy, renderer, pid[:2], 2, 99)
    with torch.no_grad():
        ours_s, responses = _ours(policy, renderer, pid, args.new_tokens, False, args.seed)
        hf_s, hf_tokens = _hf(policy, renderer, pid, args.new_tokens, args.seed)
        ref_s, ref_resp = _ours(policy, renderer, pid, args.new_tokens, True, args.seed)
        stop_s, stop_resp = _ours(policy, renderer, pid, args.new_tokens, False, args.seed, stop=True)
    ours_tokens = sum(len(r) for r in responses)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "model": args.model, "games": args.games, "new_tokens": args.new_tokens,
        "prompt_tokens_mean": sum(len(renderer.token_ids[q]) for q in pid.tolist()) / args.games,
        "distinct_prompts": len(set(pid.tolist())),
        "ours": {"seconds": ours_s, "generated_tokens": ours_tokens, "tokens_per_s": ours_tokens / ours_s,
                 "agent_moves_per_s": args.games / ours_s},
        "hf_generate": {"seconds": hf_s, "generated_tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_s,
                        "agent_moves_per_s": args.games / hf_s},
        "ours_with_reference": {"seconds": ref_s, "generated_tokens": sum(len(r) for r in ref_resp),
                                "agent_moves_per_s": args.games / ref_s},
        # the same draws with stop_at_action (the rollout's default): answers end at their first completed Action: line
        "answers": {"run_to_eos": _answers(renderer, responses),
                    "stop_at_action": {**_answers(renderer, stop_resp), "seconds": stop_s}},
        "update": _update_cost(policy, renderer, pid, responses, min(args.update_samples, args.games)),
    }
    result["speedup_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["hf_generate"]["tokens_per_s"]
    result["speedup_moves_per_s"] = result["ours"]["agent_moves_per_s"] / result["hf_generate"]["agent_moves_per_s"]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
