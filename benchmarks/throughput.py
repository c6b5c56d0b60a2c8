"""Throughput of PPO iterations: lit_moral's engine vs the obvious path, in one process.

Prints one JSON object as the last line of stdout. Examples::

    python benchmarks/throughput.py --model smollm2-135m-instruct --agents 1 --games 16 --compare-naive
    python benchmarks/throughput.py --model smollm2-135m-instruct --agents 2 --games 256 --iterations 2
    python benchmarks/throughput.py --model gemma-2-2b --device cuda --agents 2 --games 256

``--model`` takes a model spec (``smollm2-135m-instruct``, a directory, ...) or a config-only shape
with random weights (``tiny``, ``smollm2-135m``, ``gemma-2-2b``; these use the tiny tokenizer, so their
prompts are longer in tokens than with the real tokenizer: see ``prompt_tokens``).

Fields: ``agent_moves_per_s`` (one agent answering one round = one move; rollout + update, after a
warm-up iteration), ``tokens_per_s`` (the tokens those moves' sequences hold, i.e. what the obvious
path would run, per second), ``time_split_s`` (mean seconds per iteration: rollout, scoring, update;
scoring is fused into the rollout's forward and reported as 0), ``peak_mem_mb`` (CUDA max allocated,
else the process's peak RSS), ``update_mfu`` (GPU only: 6 x params x tokens actually run in the
update / time / peak bf16 FLOP/s).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch

from lit_moral import models
from lit_moral.module import AgentConfig, MoralPPO
from lit_moral.policy import LoraSpec
from lit_moral.ppo import PPOConfig
from lit_moral.prefix_tree import auto_levels, build_prompt_tree

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build(args, naive: bool) -> MoralPPO:
    spec = f"shape:{args.model}" if args.model in models.SHAPES else args.model
    rewards = ("deontological", "game", "utilitarian", "game_deontological")
    agents = [AgentConfig(f"agent_{i}", rewards[i % len(rewards)]) for i in range(args.agents)]
    opponent = "llm" if args.opponent == "llm" else args.opponent
    return MoralPPO(model=spec, dtype=args.dtype, agents=agents, opponent=opponent,
                    rounds_per_episode=args.rounds, episodes_per_iteration=args.games,
                    iterations_per_epoch=args.iterations + (0 if naive else 1), action_mode=args.action_mode, lr=1e-4,
                    lora=LoraSpec(r=8, alpha=16, layers=args.lora_layers),
                    ppo=PPOConfig(ppo_epochs=args.ppo_epochs, minibatches=args.minibatches), naive=naive)


class _Timer(pl.Callback):
    def __init__(self) -> None:
        self.perf: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.perf.append(dict(pl_module.last_perf))


def run(args, naive: bool) -> dict:
    m = build(args, naive)
    timer = _Timer()
    accel = "gpu" if args.device.startswith("cuda") else "cpu"
    # A temporary root: a SIGTERM (e.g. a timeout) makes PreemptionCheckpoint save and export there, not into the cwd.
    trainer = pl.Trainer(max_epochs=1, accelerator=accel, devices=1, logger=False, enable_checkpointing=False,
                         default_root_dir=tempfile.mkdtemp(prefix="lit_moral_bench_"),
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         precision=args.precision or ("bf16-mixed" if accel == "gpu" and args.dtype == "float32" else None))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(m)
    # The engine's first iteration warms up (allocator, tree building); the naive path gets no warm-up
    # iteration (it is slow enough that its first iteration is representative).
    timed = timer.perf if naive or len(timer.perf) == 1 else timer.perf[1:]
    moves = sum(p["moves"] for p in timed)
    roll = sum(p["rollout_s"] for p in timed)
    upd = sum(p["update_s"] for p in timed)
    seq_tokens = sum(len(t) for t in m.renderer.token_ids) / len(m.renderer.token_ids) + 2
    out = {"agent_moves_per_s": moves / (roll + upd), "tokens_per_s": moves * seq_tokens / (roll + upd),
           "time_split_s": {"rollout": roll / len(timed), "scoring": 0.0, "update": upd / len(timed)},
           "prompt_tokens": round(seq_tokens - 2), "iterations_timed": len(timed), "_module": m}
    return out


def update_mfu(args, m: MoralPPO, update_s: float) -> float | None:
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None:
        return None
    prompts = [("agent_0", t) for t in m.renderer.token_ids]
    levels, _ = build_prompt_tree(prompts, auto_levels(prompts))
    tree_tokens = sum(len(t) for lv in levels for t in lv.tokens) + 2 * len(prompts)
    params = sum(p.numel() for p in m.policy.model.parameters())
    flops = 6 * params * tree_tokens * args.ppo_epochs * args.agents
    return flops / update_s / peak


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--agents", type=int, default=2, help="LLM agents (each with its own adapter, update, optimizer)")
    ap.add_argument("--opponent", default=None, help="tft (each agent vs its own TFT) or llm (agents in pairs); "
                                                      "default: llm for exactly 2 agents, else tft")
    ap.add_argument("--lora-layers", type=int, default=0, help="LoRA on the top k decoder layers (0: all); with a "
                                                               "Llama-family model the trunk below is shared")
    ap.add_argument("--precision", default=None, help="Trainer precision, e.g. bf16-mixed (default: 32, bf16-mixed on GPU)")
    ap.add_argument("--games", type=int, default=256, help="games per agent per iteration")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--action-mode", choices=("constrained", "free"), default="constrained")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations (after one warm-up)")
    ap.add_argument("--naive-iterations", type=int, default=1)
    ap.add_argument("--compare-naive", action="store_true")
    args = ap.parse_args(argv)
    args.opponent = args.opponent or ("llm" if args.agents == 2 else "tft")
    t0 = time.time()
    fast = run(args, naive=False)
    m = fast.pop("_module")
    result = {**{k: v for k, v in fast.items()},
              "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "update_mfu": update_mfu(args, m, fast["time_split_s"]["update"]),
              "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else f"cpu ({torch.get_num_threads()} threads)"),
              "model": args.model, "dtype": args.dtype,
              "setup": {"agents": args.agents, "opponent": args.opponent, "games_per_agent": args.games,
                        "rounds": args.rounds, "ppo_epochs": args.ppo_epochs, "minibatches": args.minibatches,
                        "action_mode": args.action_mode, "lora_layers": args.lora_layers,
                        "shared_trunk": m.policy.trunk is not None, "precision": args.precision},
              "update_s_per_agent": fast["time_split_s"]["update"] / max(1, len(m.trained))}
    del m
    if args.compare_naive:
        args.iterations = args.naive_iterations
        naive = run(args, naive=True)
        naive.pop("_module")
        result["naive_agent_moves_per_s"] = naive["agent_moves_per_s"]
        result["naive_time_split_s"] = naive["time_split_s"]
        result["speedup_vs_naive"] = result["agent_moves_per_s"] / naive["agent_moves_per_s"]
    result["wall_s"] = time.time() - t0
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
