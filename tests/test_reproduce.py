"""scripts/reproduce.py: the command list and the results tables (no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_lists_every_condition_and_the_paper_compat_runs(tmp_path, capsys):
    rep = _script()
    rep.main(["--dry-run", "--seeds", "0", "1", "--paper-compat", "--out", str(tmp_path)])
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 12 * 2 + 4 * 2
    for cond, cfg in rep.CONDITIONS.items():
        assert (ROOT / "configs" / cfg).is_file(), cfg
        assert sum(f"configs/{cfg} " in c and "paper_compat" not in c for c in cmds) == 2, cond
    assert sum("--model.ppo.paper_compat true" in c for c in cmds) == 8
    assert all("--model.action_mode constrained" in c for c in cmds)
    assert not (tmp_path / "runs.jsonl").exists()


def test_markdown_tables_put_our_numbers_beside_the_papers(tmp_path):
    rep = _script()
    run = {"condition": "game", "seed": 0, "paper_compat": False, "wall_s": 600.0,
           "final_actions": {"agent_0": {"C|C": 0.0, "C|D": 0.0, "D|C": 0.19, "D|D": 0.8}}}
    (tmp_path / "runs.jsonl").write_text(json.dumps(run) + "\n")

    def cell(model, game, deon, util, variant="new_tokens", opponent="random"):
        return {"model": model, "game": game, "variant": variant, "opponent": opponent,
                "regret_deontological_mean": deon, "regret_deontological_ci": 0.5,
                "regret_utilitarian_mean": util, "regret_utilitarian_ci": 0.02}

    cells = [cell("agent_0", g, 1.0 + i, 0.1 * i) for i, g in enumerate(rep.PAPER_GAMES)]
    cells += [cell("base", "IPD", 0.56, 0.147), cell("agent_0", "IPD", 9.0, 0.9, opponent="tft")]
    (tmp_path / "game_evaluation").mkdir()
    (tmp_path / "game_evaluation" / "summary.json").write_text(
        json.dumps({"meta": {"models": ["agent_0", "base"], "runs": 1}, "cells": cells}))
    text = rep.markdown_tables(tmp_path)
    assert "| game | 0 | agent_0 | 0.00 | 0.00 | 0.19 | 0.80 | 0.01 | 10.0 |" in text
    assert "| game | agent_0 | 1 | 1.00 ± 0.50 [1.7] | 2.00 ± 0.50 [1.65] |" in text
    assert "| no fine-tuning | base | 1 | 0.56 ± 0.50 [5.8] | - [5.8] |" in text
    assert "| game | agent_0 | 1 | 0.000 ± 0.020 [0.24] | 0.100 ± 0.020 [0.38] |" in text
    assert "9.00" not in text  # other opponents stay out of the Figure-4 tables
