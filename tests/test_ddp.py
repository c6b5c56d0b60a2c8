"""Two CPU processes on Lightning's DDP strategy (gloo) train the debug config through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes_share_games_and_stay_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.max_epochs", "1", "--trainer.callbacks+=tests.helpers.RankDump",
           "--trainer.callbacks.dirpath", str(tmp_path / "dump")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # Gradients averaged: both processes end with the same adapter and value-head weights, which moved.
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    # KL coefficients and reward statistics come from all games: identical on both processes.
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"] and ranks[0]["moments"] == ranks[1]["moments"]
    assert ranks[0]["moments"]["agent_0"]["count"] == 3 * 16 * 5
    # Each process played its share: 16 games x 5 rounds per iteration split over 2 processes, different games.
    rows0, rows1 = ranks[0]["coop"], ranks[1]["coop"]
    assert len(rows0) == len(rows1) == 3
    assert all(r0[2] == r1[2] == 40 for r0, r1 in zip(rows0, rows1))
    assert any(r0[1] != r1[1] for r0, r1 in zip(rows0, rows1))
    # The logged cooperation rate (synced torchmetrics states) is the one over all games of both processes.
    for (_, c0, n0, logged0), (_, c1, n1, logged1) in zip(rows0, rows1):
        assert abs(logged0 - (c0 + c1) / (n0 + n1)) < 1e-6 and logged0 == logged1
    # One checkpoint folder, written by rank 0, holding the shared weights.
    ckpts = sorted((tmp_path / "checkpoints" / "debug").glob("version_*/checkpoints/*.ckpt"))
    assert [p.name for p in ckpts] == ["epoch=0-step=48.ckpt", "last.ckpt"]
    saved = torch.load(ckpts[-1], weights_only=False)
    assert saved["lit_moral"]["episode"] == 48 and len(saved["lit_moral"]["rng"]) == 2
    for k, v in saved["state_dict"].items():
        torch.testing.assert_close(v, a[k])
