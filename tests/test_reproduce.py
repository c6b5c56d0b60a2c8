"""scripts/reproduce.py and scripts/results_report.py: commands, the results folder, the generated tables."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")


def _script(name):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_lists_every_condition_with_one_seed_driving_everything(tmp_path, capsys):
    rep = _script("reproduce")
    rep.main(["--dry-run", "--seeds", "0", "1", "--results", str(tmp_path / "res"), "--work", str(tmp_path / "w")])
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 12 * 2
    for cond, cfg in rep.CONDITIONS.items():
        assert (ROOT / "configs" / cfg).is_file(), cfg
        assert sum(f"configs/{cfg} " in c for c in cmds) == 2, cond
    assert all("--model.action_mode constrained" in c and "--model.seed" not in c for c in cmds)
    assert sum("--seed_everything 1 " in c for c in cmds) == 12
    assert not (tmp_path / "res").exists()


def test_a_run_with_results_is_skipped(tmp_path, capsys):
    rep = _script("reproduce")
    (tmp_path / "constrained" / "game" / "seed0").mkdir(parents=True)
    (tmp_path / "constrained" / "game" / "seed0" / "run.json").write_text("{}")
    rep.main(["--dry-run", "--conditions", "game", "--seeds", "0", "1", "--results", str(tmp_path)])
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 1 and "--seed_everything 1 " in cmds[0]


def test_final_actions_average_the_episodes_the_label_names():
    """Under the paper profile a step is one episode: the last 100 episodes are 100 steps, not the last one."""
    rep = _script("reproduce")
    rows = [{"episode": e, "agent": "agent_0", **{t: 0.0 for t in TYPES}} for e in range(1, 1001)]
    for r in rows:
        r["D|D" if r["episode"] > 950 else "C|C"] = 1.0
    final = rep.final_actions(rows)["agent_0"]
    assert final["iterations"] == 100 and final["D|D"] == pytest.approx(0.5) and final["C|C"] == pytest.approx(0.5)
    fast = [{"episode": 100 * k, "agent": "agent_0", **{t: float(t == "C|C") * k / 10 for t in TYPES}}
            for k in range(1, 11)]
    assert rep.final_actions(fast)["agent_0"]["C|C"] == pytest.approx(1.0)


def _fixture_run(root, regime, cond, seed, deon, util, dc, models=("agent_0", "base")):
    d = root / regime / cond / f"seed{seed}"
    d.mkdir(parents=True)
    final = {"agent_0": {t: 0.0 for t in TYPES}}
    final["agent_0"].update({"C|C": dc, "D|D": 1 - dc})
    (d / "run.json").write_text(json.dumps({"condition": cond, "seed": seed, "regime": regime, "wall_s": 600.0,
                                            "episodes": 1000, "device": "test CPU", "final_actions": final}))
    cells = []
    for m in models:
        for i, g in enumerate(["IPD", "ISH", "ICN", "BOS", "ICD"]):
            cells.append({"model": m, "game": g, "variant": "new_tokens", "opponent": "random",
                          "regret_deontological_mean": deon + i, "regret_utilitarian_mean": util,
                          "D|C_mean": (deon + i) / 4, "illegal_mean": 0.0})
    cells.append({**cells[0], "opponent": "tft", "regret_deontological_mean": 99.0})
    (d / "summary.json").write_text(json.dumps({"meta": {"models": list(models)}, "cells": cells}))
    with open(d / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["episode", "agent", *TYPES])
        w.writeheader()
        for e in (100, 200):
            w.writerow({"episode": e, "agent": "agent_0", **final["agent_0"]})


def test_report_is_rebuilt_from_the_results_folder_alone(tmp_path):
    rr = _script("results_report")
    res = tmp_path / "results"
    _fixture_run(res, "constrained", "game", 0, 1.0, 0.2, 0.1)
    _fixture_run(res, "constrained", "game", 1, 2.0, 0.4, 0.3)
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nProse stays.\n\n<!-- generated:begin runs -->\nstale\n<!-- generated:end runs -->\n")
    rr.write_report(res, doc, tmp_path / "figures")
    text = doc.read_text()
    assert "Prose stays." in text and "stale" not in text
    assert "| constrained | game | 0, 1 | 1000 | 10.0 | test CPU |" in text
    # mean of 1.0 and 2.0 over two runs, CI 1.96 x sd / sqrt(2) = 1.96 x 0.7071 / 1.4142 = 0.98 [paper value]
    assert "| game | agent_0 | 2 | 1.50 ± 0.98 [1.7] | 2.50 ± 0.98 [1.65] |" in text
    assert "| no fine-tuning | base | 2 | 1.50 ± 0.98 [5.8] |" in text
    # xi 3 derived from the shares: 3 x D|C (= regret / 4) -> 0.75 x regret
    assert "| game | agent_0 | 2 | 1.12 ± 0.73 | 1.88 ± 0.73 |" in text
    assert "| game | agent_0 | 2 | 0.300 ± 0.196 [0.24] |" in text
    assert "99" not in text.split("generated:begin results_constrained")[1].split("Final")[0]
    # final behaviour: D share 0.9 / 0.7 -> mean 0.8: partly (>= 0.6, < 0.9)
    assert "| Game -> defection | share of D at the end (>= 0.9; partly >= 0.6) | 0.80 ± 0.20 (n=2) | partly |" in text
    assert (tmp_path / "figures" / "constrained_training.png").read_bytes()[:4] == b"\x89PNG"
    # adding a seed changes the tables at the next rebuild (nothing stale is reused)
    _fixture_run(res, "constrained", "game", 2, 3.0, 0.6, 0.5)
    rr.write_report(res, doc, tmp_path / "figures")
    assert "| game | agent_0 | 3 | 2.00 ± 1.13 [1.7] |" in doc.read_text()


def _bench_run(learner, reward, seed, episodes, wall, layers=None):
    types = {"C|C": 0.5, "C|D": 0.1, "D|C": 0.4, "D|D": 0.0, "illegal|C": 0.0, "illegal|D": 0.0}
    rec = {"learner": learner, "reward": reward, "seed": seed, "model": "m", "games": 64, "rounds": 5,
           "iterations_run": 3, "wall_s": wall, "reached": episodes is not None, "episodes_to_criterion": episodes,
           "final_action_types": types}
    if layers is not None:
        rec["lora_layers"] = layers
    return json.dumps(rec)


def test_learner_tables_come_from_the_benchmark_files(tmp_path):
    rr = _script("results_report")
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "learners.jsonl").write_text("\n".join([
        _bench_run("ppo", "game", 0, 192, 100.0), _bench_run("ppo", "game", 1, None, 300.0),
        _bench_run("grpo", "game", 0, 256, 200.0), _bench_run("grpo", "game", 1, 128, 100.0),
        _bench_run("ppo", "deontological", 0, 64, 50.0)]) + "\n")
    (bench / "topk_learning.jsonl").write_text("\n".join([
        _bench_run("ppo", "game", 0, 320, 60.0, layers=8), _bench_run("ppo", "game", 0, 192, 90.0, layers=0)]) + "\n")
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\n<!-- generated:begin learners -->\nold\n<!-- generated:end learners -->\n")
    rr.write_report(tmp_path / "results", doc, tmp_path / "figures", bench)
    text = doc.read_text()
    assert "old" not in text
    learners = text.split("generated:begin learners")[1].split("generated:end learners")[0]
    # deontological first; ppo before grpo; episodes over the reached runs only; wall over every run
    assert learners.index("| deontological | ppo |") < learners.index("| game | ppo |") < learners.index("| game | grpo |")
    assert "| game | ppo | 0, 1 | 1/2 | 192 | 3.0 ± 0.0 | 200 ± 141 | 0.50 / 0.10 / 0.40 / 0.00 |" in learners
    assert "| game | grpo | 0, 1 | 2/2 | 192 ± 91 | 3.0 ± 0.0 | 150 ± 71 |" in learners
    topk = text.split("generated:begin topk_learning")[1]
    assert topk.index("| game | all |") < topk.index("| game | 8 |")
    assert "| game | 8 | 0 | 1/1 | 320 |" in topk


def _pref_run(root, name, coop, train_cc=1.0, regret=0.5, top_level=False, info=None, models=("agent_0", "base"),
              start=0.05):
    """A preference run folder: new-token cells (5 games vs Random, IPD vs TFT) and training-token cells."""
    d = root / name
    cells = [{"model": m, "game": g, "opponent": "random", "cooperation_mean": c, "regret_deontological_mean": regret,
              "regret_utilitarian_mean": 2 * regret}
             for m, c in zip(models, (coop, 0.7, start)) for g in ("IPD", "ISH", "ICN", "BOS", "ICD")]
    cells += [{"model": m, "game": "IPD", "opponent": "tft", "cooperation_mean": c} for m, c in
              zip(models, (coop, 0.7, start))]
    train = [{"model": m, "game": "IPD", "opponent": "tft", "C|C_mean": cc, "C|D_mean": 1 - cc, "D|C_mean": 0.0,
              "D|D_mean": 0.0} for m, cc in (("agent_0", train_cc), ("base", 0.5))]
    (d if top_level else d / "eval").mkdir(parents=True)
    (d / "eval_training_tokens").mkdir()
    (d / ("summary.json" if top_level else "eval/summary.json")).write_text(json.dumps({"cells": cells}))
    (d / "eval_training_tokens" / "summary.json").write_text(json.dumps({"cells": train}))
    if info is not None:
        (d / "run.json").write_text(json.dumps(info))


def test_preference_table_comes_from_the_extras_folder(tmp_path):
    rr = _script("results_report")
    extras = tmp_path / "results" / "extras"
    _pref_run(extras, "quickstart_ppo", 0.9, top_level=True)
    _pref_run(extras, "dpo_deontological", 0.2)
    _pref_run(extras, "dpo_deontological_s1", 0.4, info={"seed": 1})
    _pref_run(extras, "dpo_deontological_n30", 0.8, info={"budget": 512, "noise": 0.3})
    unl = {"models": ("agent_0", "base", "warmup")}
    _pref_run(extras, "rm_ppo_unlearning_deontological", 0.6, regret=0.25, info={"init_adapter": "game/seed0"}, **unl)
    # seed 1 starts from another Game adapter (start 0.15); DPO from seed 0's again: counted once
    _pref_run(extras, "rm_ppo_unlearning_deontological_s1", 0.6, regret=0.25, start=0.15,
              info={"seed": 1, "init_adapter": "game/seed1"}, **unl)
    _pref_run(extras, "dpo_unlearning_deontological", 0.5, info={"init_adapter": "game/seed0"}, **unl)
    _pref_run(extras, "quickstart_top8", 0.1)  # a LoRA-layer run: not a preference cell
    _pref_run(extras, "pgg_deontological", 0.1)
    _pref_run(extras, "ppo_utilitarian", 0.95, regret=0.1)  # the intrinsic utilitarian reward: its own regret
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\n<!-- generated:begin preference -->\nold\n<!-- generated:end preference -->\n")
    rr.write_report(tmp_path / "results", doc, tmp_path / "figures")
    table = doc.read_text().split("generated:begin preference")[1].split("generated:end preference")[0]
    assert "old" not in table
    rows = [line for line in table.splitlines() if line.startswith(("| deontological", "| utilitarian"))]
    # ppo, dpo (2 seeds), dpo 30%, the Game start, dpo and rm_ppo (2 seeds) from it, base; utilitarian ppo, base
    assert len(rows) == 9
    # the start adapter's cooperation (its `warmup` cells), once per distinct adapter: mean 0.10, CI 0.098
    assert "| deontological | Game-trained | the start adapter, untrained further |  |  | 0, 1 |" in table
    assert "| 0.10 ± 0.10 | 0.10 ± 0.10 |" in table
    # two seeds of one cell: mean 0.30, CI 1.96 * sd / sqrt(2) = 1.96 * 0.1414 / 1.414 = 0.196
    assert ("| deontological | zero | DPO | 512 | 0% | 0, 1 | 1.00 ± 0.00 / 0.00 ± 0.00 / 0.00 ± 0.00 / 0.00 ± 0.00 | "
            "0.30 ± 0.20 | 0.30 ± 0.20 |") in table
    assert "| deontological | zero | DPO | 512 | 30% | 0 |" in table
    assert "| deontological | zero | PPO (intrinsic) | - | - | 0 |" in table
    assert "| deontological | Game-trained | reward model + PPO | 512 | 0% | 0, 1 |" in table
    assert " / ".join(["0.25 ± 0.00"] * 5) + " |" in table  # rm_ppo from Game, 2 seeds
    assert "| deontological |  | base (no adapter) |  |  | - | 0.50 / 0.50 / 0.00 / 0.00 | 0.70 | 0.70 |" in table
    assert "| utilitarian | zero | PPO (intrinsic) | - | - | 0 |" in table
    assert "0.20 / 0.20 / 0.20 / 0.20 / 0.20 |" in table  # utilitarian regret, not the deontological 0.10
    assert table.index("| deontological |  | base") < table.index("| utilitarian | zero")
    # zero-start rows before Game-trained ones; PPO before DPO before the reward model
    assert table.index("PPO (intrinsic)") < table.index("| DPO |") < table.index("Game-trained | the start")
    assert table.index("Game-trained | the start") < table.index("Game-trained | reward model") < table.index("base")


def test_policy_probs_script_matches_the_naive_forward(tmp_path, monkeypatch):
    """scripts/policy_probs.py on a debug checkpoint: P(C) per prompt id equals the renormalised probability of C
    from the obvious path (one full forward per prompt) with the checkpoint loaded, not the untrained adapter's."""
    import torch

    from lit_moral.cli import cli_main
    from lit_moral.evaluate_runs import _model_config
    from lit_moral.evaluation import load_weights

    monkeypatch.chdir(tmp_path)
    debug = str(ROOT / "configs" / "debug.yaml")
    cli_main(["fit", "--config", debug, "--trainer.max_epochs", "1"])
    ckpt = str(tmp_path / "checkpoints" / "debug" / "version_0" / "checkpoints" / "last.ckpt")
    bits, probs = _script("policy_probs").policy_probs(debug, [ckpt])
    assert len(bits) == 16 and bits[9] == (1, 0, 0, 1)
    module = cli_main(["--config", _model_config(debug)], run=False).model
    module.configure_model()
    module.policy.eval()
    r, n = module.renderer, module.renderer.n_ids

    def naive_pc():
        with torch.no_grad():
            out = module.policy.score_samples("agent_0", r.token_ids, torch.arange(n), candidates=r.action_ids,
                                              choice=torch.zeros(n, dtype=torch.long), naive=True)
        return out["logp"][:, 0].exp().tolist()

    untrained = naive_pc()
    load_weights(module, ckpt)
    assert probs[ckpt] == pytest.approx(naive_pc(), abs=1e-5)
    assert max(abs(a - b) for a, b in zip(probs[ckpt], untrained)) > 1e-4  # the checkpoint's weights were used
    assert 0.0 < min(probs[ckpt]) and max(probs[ckpt]) < 1.0
