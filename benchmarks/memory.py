"""Peak memory and update time with N agents on one base (N LoRA adapters, value heads, Adam states), one JSON line.

Each population size runs in its own process (peak RSS is per process; on CUDA, max allocated memory):

    python benchmarks/memory.py --model smollm2-135m-instruct --games 64 --agents 1 2 4 8 16

Every agent plays the same number of games against its own Tit-for-Tat, so the work per agent is the same:
With ``--out F.jsonl`` each population size's measurement is appended to F as it finishes and a size already
there (same model, games, epochs, layers) is not measured again, so a long benchmark can be interrupted.
``ratio_to_smallest`` = peak memory / the smallest population's, ``update_per_agent_ratio`` = update seconds per
agent / the smallest population's (no cost that grows with N beyond the agents' own work: ~1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(agents: int, args) -> dict:
    cmd = [sys.executable, str(HERE / "throughput.py"), "--model", args.model, "--agents", str(agents),
           "--games", str(args.games), "--iterations", str(args.iterations), "--ppo-epochs", str(args.ppo_epochs),
           "--action-mode", args.action_mode, "--opponent", "tft", "--lora-layers", str(args.lora_layers)]
    if args.device:
        cmd += ["--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_all(args) -> dict[int, dict]:
    """Every requested population size, reusing (and extending) ``args.out``'s measurements."""
    ident = {"model": args.model, "games": args.games, "ppo_epochs": args.ppo_epochs, "lora_layers": args.lora_layers,
             "action_mode": args.action_mode, "iterations": args.iterations}
    out = Path(args.out) if args.out else None
    have = {}
    if out is not None and out.exists():
        for line in out.read_text().splitlines():
            rec = json.loads(line) if line.strip() else None
            if rec and rec.get("ident") == ident:
                have[rec["agents"]] = rec["result"]
    runs = {}
    for n in args.agents:
        if n not in have:
            have[n] = measure(n, args)
            if out is not None:
                with out.open("a") as f:
                    f.write(json.dumps({"ident": ident, "agents": n, "result": have[n]}) + "\n")
        runs[n] = have[n]
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--games", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--action-mode", default="constrained")
    ap.add_argument("--device", default=None)
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 2], help="population sizes to measure")
    ap.add_argument("--lora-layers", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSONL of finished measurements (read to skip them, then appended)")
    args = ap.parse_args()
    runs = _measure_all(args)
    base = runs[min(runs)]
    print(json.dumps({"model": args.model, "device": base["device"], "games_per_agent": args.games,
                      "lora_layers": args.lora_layers,
                      "peak_mem_mb": {n: r["peak_mem_mb"] for n, r in runs.items()},
                      "ratio_to_smallest": {n: r["peak_mem_mb"] / base["peak_mem_mb"] for n, r in runs.items()},
                      "update_s_per_agent": {n: r["update_s_per_agent"] for n, r in runs.items()},
                      "update_per_agent_ratio": {n: r["update_s_per_agent"] / base["update_s_per_agent"]
                                                 for n, r in runs.items()},
                      "iteration_s": {n: sum(r["time_split_s"].values()) for n, r in runs.items()}}))


if __name__ == "__main__":
    main()
