"""Peak memory with two agents vs one agent (two LoRA adapters on one base vs one), one JSON line.

Each setup runs in its own process (peak RSS is per process; on CUDA, max allocated memory):

    python benchmarks/memory.py --model smollm2-135m-instruct --games 64

Both setups play the same number of games per agent; one agent plays Tit-for-Tat, two agents play
each other. ``ratio`` = two-agent peak / one-agent peak.
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
           "--action-mode", args.action_mode]
    if args.device:
        cmd += ["--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--games", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--action-mode", default="constrained")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    one, two = measure(1, args), measure(2, args)
    print(json.dumps({"model": args.model, "device": one["device"], "games_per_agent": args.games,
                      "peak_mem_mb_one_agent": one["peak_mem_mb"], "peak_mem_mb_two_agents": two["peak_mem_mb"],
                      "ratio": two["peak_mem_mb"] / one["peak_mem_mb"]}))


if __name__ == "__main__":
    main()
