"""bf16 on this CPU: is it native, how far from fp32 are the answers, and how fast is a PPO iteration. One JSON line.

Four parts, in one process (timings in child processes of ``throughput.py``, one after another):

- ``cpu``: AVX512-BF16 / AMX as PyTorch (or /proc/cpuinfo) reports them, and PyTorch's CPU capability;
- ``matmul``: seconds of a 1024 x 1024 x 1024 matmul in fp32 and bf16 (median of ``--reps``) and their ratio;
- ``accuracy``: on the real model's 16 memory-1 prompts (base model, action1/action2), the largest difference
  from fp32 of the answers' log-probs and of P(action1) with bf16 autocast (``--trainer.precision bf16-mixed``)
  and with bf16 weights (``model.dtype bfloat16``): the tolerance bf16 runs hold to;
- ``iteration``: ``throughput.py`` agent-moves/s for fp32, bf16-mixed and bf16 weights (one agent vs TFT,
  ``--games`` games, ``--lora-layers`` top layers with the shared trunk), and each one's ratio to fp32; a run
  that exceeds ``--timeout`` seconds is reported as such (``timed_out_after_s``), which bounds its speed.

    python benchmarks/bf16.py --model smollm2-135m-instruct --games 64 --lora-layers 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_moral import hardware, models
from lit_moral.games import MatrixGame
from lit_moral.policy import BASE, LoraSpec, Policy
from lit_moral.prompts import PromptRenderer

HERE = Path(__file__).resolve().parent


def matmul_seconds(dtype: torch.dtype, reps: int, n: int = 1024) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def answer_logprobs(model_spec: str, how: str) -> torch.Tensor:
    """[16, 2] log-probs of action1/action2 after the 16 IPD prompts, base model, computed ``how``."""
    model, tok = models.load(model_spec, "bfloat16" if how == "bf16 weights" else "float32")
    pol = Policy(model, ["agent_0"], LoraSpec(r=8, alpha=16))
    pol.eval()
    r = PromptRenderer(tok, MatrixGame.from_spec("IPD"))
    prompts = [(BASE, ids) for ids in r.token_ids]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bf16 autocast"):
        return pol.candidate_logprobs(prompts, r.action_ids)["seq_logp"].float()


def accuracy(model_spec: str) -> dict:
    ref = answer_logprobs(model_spec, "fp32")
    p_ref = torch.softmax(ref, -1)[:, 0]
    out = {"fp32_p_action1_range": [float(p_ref.min()), float(p_ref.max())]}
    for how in ("bf16 autocast", "bf16 weights"):
        lp = answer_logprobs(model_spec, how)
        out[how] = {"max_abs_logp_diff": float((lp - ref).abs().max()),
                    "max_abs_p_action1_diff": float((torch.softmax(lp, -1)[:, 0] - p_ref).abs().max())}
    return out


def iteration(args, extra: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / "throughput.py"), "--model", args.model, "--agents", "1", "--opponent", "tft",
           "--games", str(args.games), "--iterations", "1", "--lora-layers", str(args.lora_layers), "--device", "cpu",
           *extra]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:  # emulated bf16 can be very slow: the bound is the result
        return {"timed_out_after_s": args.timeout, "agent_moves_per_s": None}
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return {**{k: rec[k] for k in ("agent_moves_per_s", "time_split_s", "peak_mem_mb", "device")},
            "process_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--games", type=int, default=64)
    ap.add_argument("--lora-layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed to each throughput.py run")
    ap.add_argument("--skip-iteration", action="store_true", help="only the matmul and accuracy parts")
    args = ap.parse_args()
    f32, b16 = matmul_seconds(torch.float32, args.reps), matmul_seconds(torch.bfloat16, args.reps)
    res = {"model": args.model, "threads": torch.get_num_threads(),
           "cpu": {**hardware.cpu_bf16_features(), "native_bf16": hardware.cpu_bf16_native(),
                   "capability": torch.backends.cpu.get_cpu_capability()},
           "matmul_1024_s": {"fp32": f32, "bf16": b16, "bf16_speedup": f32 / b16},
           "accuracy": accuracy(args.model)}
    if not args.skip_iteration:
        runs = {"fp32": iteration(args, []), "bf16-mixed": iteration(args, ["--precision", "bf16-mixed"]),
                "bf16 weights": iteration(args, ["--dtype", "bfloat16"])}
        base = runs["fp32"]["agent_moves_per_s"]
        res["iteration"] = {k: {**v, "speedup_vs_fp32": v["agent_moves_per_s"] / base if v["agent_moves_per_s"]
                                else None} for k, v in runs.items()}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
