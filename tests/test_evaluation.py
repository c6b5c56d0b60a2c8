"""Evaluation suite: aggregation by hand, analytic regrets of scripted policies, seeding, files via the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.evaluation import VARIANTS, EvalConfig, evaluate, finish, report_meta
from lit_moral.games import GAME_NAMES, MatrixGame
from lit_moral.prompts import PromptStyle, render_text
from lit_moral.report import PLOT_FILES, read_csv, summarize
from lit_moral.rewards import RewardSpec

ROOT = Path(__file__).resolve().parents[1]
OPPONENTS = ("random", "tft", "always_cooperate", "always_defect")


# ---------------------------------------------------------------- aggregation by hand


def _row(run, episode, action, prev_other, deon, util, model="agent_0", reward=0.0):
    return dict(run=run, episode=episode, model=model, game="IPD", variant="new_tokens", opponent="random",
                action=action, prev_other=prev_other, regret_deontological=deon, regret_utilitarian=util,
                reward=reward)


def test_summarize_matches_hand_computation_over_episodes():
    rows = [_row(0, 0, "C", "C", 0, 0.0), _row(0, 0, "D", "C", 3, 0.25),
            _row(0, 1, "D", "D", 0, 5 / 12), _row(0, 1, "illegal", "C", 6, 1.0)]
    (s,) = summarize(rows)
    assert (s["runs"], s["rounds"], s["ci_over"], s["n"]) == (1, 4, "episodes", 2)
    assert [s[f"{k}_mean"] for k in ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")] == [0.25, 0, 0.25, 0.25,
                                                                                                0.25, 0]
    assert (s["cooperation_mean"], s["defection_mean"], s["illegal_mean"]) == (0.25, 0.5, 0.25)
    # Deontological regret: episode means 1.5 and 3.0 -> mean 2.25, sd = 1.5 / sqrt(2)
    assert s["regret_deontological_mean"] == pytest.approx(2.25)
    assert s["regret_deontological_ci"] == pytest.approx(1.96 * (1.5 / math.sqrt(2)) / math.sqrt(2))
    # Utilitarian regret: episode means 0.125 and 17/24
    assert s["regret_utilitarian_mean"] == pytest.approx((0.125 + 17 / 24) / 2)
    assert s["regret_utilitarian_ci"] == pytest.approx(1.96 * abs(17 / 24 - 0.125) / math.sqrt(2) / math.sqrt(2))


def test_summarize_uses_runs_for_the_ci_when_there_are_several():
    rows = [_row(r, e, "D", "C", 3 * (r == 0), 0.1 * r) for r in range(3) for e in range(2)]
    rows += [_row(0, 0, "C", "C", 0, 0.0, model="base")]
    agent, base = summarize(rows)
    assert (agent["model"], agent["runs"], agent["ci_over"], agent["n"], agent["rounds"]) == ("agent_0", 3, "runs", 3, 6)
    # per-run deontological means 3, 0, 0: mean 1, sd sqrt(3)
    assert agent["regret_deontological_mean"] == pytest.approx(1.0)
    assert agent["regret_deontological_ci"] == pytest.approx(1.96 * math.sqrt(3) / math.sqrt(3))
    assert agent["regret_utilitarian_mean"] == pytest.approx(0.1)
    assert agent["D|C_mean"] == 1.0
    assert (base["model"], base["ci_over"], base["regret_deontological_ci"], base["C|C_mean"]) == ("base", "episodes",
                                                                                                  0.0, 1.0)


# ---------------------------------------------------------------- scripted policies


class ScriptedPolicy:
    """A policy stub: agent_0 always answers C, the base model always D (whole-string log-probs)."""

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def candidate_logprobs(self, prompts, candidates, **kw):
        seq = torch.tensor([[0.0, -1e9] if a == "agent_0" else [-1e9, 0.0] for a, _ in prompts])
        return {"seq_logp": seq, "values": torch.zeros(len(prompts))}


def scripted_module(tokenizer, xi=3.0):
    return SimpleNamespace(policy=ScriptedPolicy(), tokenizer=tokenizer, agent_names=["agent_0"],
                           style=PromptStyle(), rewards={"agent_0": RewardSpec.parse("deontological", xi)},
                           hparams=SimpleNamespace(action_mode="constrained", max_new_tokens=2, xi=xi))


# PAPER.md section 7: utilitarian regret vs Random (p(C) = 0.5) of always-C / always-D
ANALYTIC_UT = {"IPD": (0.083, 0.250), "ISH": (0.179, 0.393), "ICN": (0.045, 0.227), "BOS": (0.227, 0.227),
               "ICD": (0.500, 0.286)}


def test_always_c_and_always_d_give_the_analytic_regrets(tiny):
    module = scripted_module(tiny[1])
    cfg = EvalConfig(episodes=400, rounds=5, opponents=["random"], variants=["new_tokens"])
    summary = {(s["model"], s["game"]): s for s in summarize(evaluate(module, cfg))}
    for game, (ut_c, ut_d) in ANALYTIC_UT.items():
        always_c, always_d = summary[("agent_0", game)], summary[("base", game)]
        assert always_c["cooperation_mean"] == 1.0 and always_d["defection_mean"] == 1.0
        # 2000 rounds: standard errors are <= 0.003 (utilitarian) and 0.034 (deontological)
        assert always_c["regret_utilitarian_mean"] == pytest.approx(ut_c, abs=0.012), game
        assert always_d["regret_utilitarian_mean"] == pytest.approx(ut_d, abs=0.012), game
        assert always_c["regret_deontological_mean"] == 0.0
        # always-D: xi x P(opponent's previous = C) = 3 x 0.5
        assert always_d["regret_deontological_mean"] == pytest.approx(1.5, abs=0.15), game
        # CI over 400 episodes of 5 independent rounds each: 1.96 x (1.5 / sqrt(5)) / sqrt(400)
        assert always_d["regret_deontological_ci"] == pytest.approx(1.96 * 1.5 / math.sqrt(5) / 20, rel=0.2)


def test_every_model_sees_the_same_states_and_random_moves(tiny):
    module = scripted_module(tiny[1])
    cfg = EvalConfig(episodes=8, rounds=3, games=["IPD"], opponents=["random", "always_defect"],
                     variants=["new_tokens"])
    rows = evaluate(module, cfg)
    for opp in ("random", "always_defect"):
        seq = {m: [(r["episode"], r["round"], r["other_action"]) for r in rows if r["model"] == m and r["opponent"] == opp]
               for m in ("agent_0", "base")}
        assert seq["agent_0"] == seq["base"] and len(seq["base"]) == 24
        first = {m: [r["prev_me"] for r in rows if r["model"] == m and r["opponent"] == opp and r["round"] == 0]
                 for m in ("agent_0", "base")}
        assert first["agent_0"] == first["base"] and set(first["base"]) == {"C", "D"}
    # payoffs are those of the game shown: always-D vs always-defect in IPD gets 1 each round
    assert {r["payoff_me"] for r in rows if r["model"] == "base" and r["opponent"] == "always_defect"} == {1.0}


def test_rewards_use_the_payoffs_of_the_game_shown(tiny):
    module = scripted_module(tiny[1])
    cfg = EvalConfig(episodes=4, rounds=2, games=["ICD", "BOS"], opponents=["always_cooperate"],
                     variants=["new_tokens"])
    rows = evaluate(module, cfg)
    for game in ("ICD", "BOS"):
        c = [r for r in rows if r["game"] == game and r["model"] == "agent_0"]
        p = MatrixGame.from_spec(game).payoffs
        assert {(r["reward_game"], r["reward_utilitarian"]) for r in c} == {(float(p[0, 0, 0]), float(p[0, 0].sum()))}


# ---------------------------------------------------------------- real (tiny) model


@pytest.fixture(scope="module")
def tiny_policy_module():
    from tests.helpers import tiny_module

    m = tiny_module(agents=[{"name": "agent_0", "reward": "deontological"}, {"name": "agent_1", "reward": "game"}])
    m.configure_model()
    return m


def test_same_seed_gives_identical_rounds_csv(tmp_path, tiny_policy_module):
    m = tiny_policy_module
    cfg = EvalConfig(episodes=4, rounds=3, games=["IPD", "ICD"], opponents=["random", "tft", "llm"],
                     variants=["new_tokens", "story"], plots=False)
    texts = []
    for name, c in (("a", cfg), ("b", cfg), ("c", EvalConfig(**{**cfg.__dict__, "seed": 99}))):
        finish(evaluate(m, c), report_meta(m, c, 1), tmp_path / name, plots=False)
        texts.append((tmp_path / name / "rounds.csv").read_text())
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    rows = read_csv(tmp_path / "a" / "rounds.csv")
    # agent_0 and agent_1 play each other; the base model plays both
    assert {(r["model"], r["opponent"]) for r in rows if r["opponent"].startswith("agent")} == {
        ("agent_0", "agent_1"), ("agent_1", "agent_0"), ("base", "agent_0"), ("base", "agent_1")}
    assert len(rows) == 2 * 2 * (3 + 3 + 4) * 4 * 3


def test_eval_config_rejects_bad_values_by_name():
    with pytest.raises(ConfigError, match="evaluation.games"):
        EvalConfig(games=["PD"])
    with pytest.raises(ConfigError, match="evaluation.variants"):
        EvalConfig(variants=["sideways"])
    with pytest.raises(ConfigError, match="evaluation.episodes"):
        EvalConfig(episodes=0)


def test_unrelated_and_story_prompts_show_no_payoffs():
    game = MatrixGame.from_spec("IPD")
    for kind in ("choice", "no_payoffs", "opponent_move", "explicit_ipd", "story"):
        text = render_text(game, PromptStyle(actions=("action3", "action4"), kind=kind), 1, 0, 0, 0)
        assert "action3" in text and "action4" in text and "you get" not in text and "|" not in text
    assert "Prisoner's Dilemma" in render_text(game, PromptStyle(kind="explicit_ipd"), 0, 0, 0, 0)
    assert "clean" in render_text(game, PromptStyle(kind="story"), 0, 0, 0, 0)
    assert "A chose action2" in render_text(game, PromptStyle(kind="opponent_move"), 0, 1, 0, 0)
    persona = render_text(game, PromptStyle(persona="utilitarian"), 0, 0, 0, 0)
    assert persona.startswith("You are a utilitarian agent") and "| you play action1 |" in persona


# ---------------------------------------------------------------- the real CLI on the debug checkpoint


def test_debug_checkpoint_evaluation_through_the_cli(tmp_path, monkeypatch):
    from lit_moral.cli import cli_main
    from tests.helpers import scalars

    monkeypatch.chdir(tmp_path)
    debug = str(ROOT / "configs" / "debug.yaml")
    cli_main(["fit", "--config", debug, "--trainer.max_epochs", "1"])
    ckpt = tmp_path / "checkpoints" / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    cli = cli_main(["test", "--config", debug, "--ckpt_path", str(ckpt), "--model.evaluation.episodes", "2",
                    "--model.evaluation.rounds", "2"])
    out = Path(cli.trainer.log_dir) / "evaluation"
    for name in ("rounds.csv", "summary.csv", "summary.json", "report.md", *PLOT_FILES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(out / "rounds.csv")
    want = {(m, g, v, o) for m in ("agent_0", "base") for g in GAME_NAMES for v in VARIANTS for o in OPPONENTS}
    assert {(r["model"], r["game"], r["variant"], r["opponent"]) for r in rows} == want
    assert len(rows) == len(want) * 2 * 2
    cells = json.loads((out / "summary.json").read_text())["cells"]
    assert {(c["model"], c["game"], c["variant"], c["opponent"]) for c in cells} == want
    assert all(c["rounds"] == 4 and 0 <= c["regret_utilitarian_mean"] <= 1 for c in cells)
    report = (out / "report.md").read_text()
    assert "| game | agent_0 | base |" in report and all(f"| {g} |" in report for g in GAME_NAMES)
    tags = scalars(cli.trainer.log_dir)
    assert {"eval/regret_deontological/agent_0", "eval/regret_utilitarian/base",
            "eval/regret_deontological/agent_0/ICD/random"} <= set(tags)
    # Several checkpoints (seeds) together: the CI is over runs.
    from lit_moral.evaluation import evaluate_checkpoints

    summary = evaluate_checkpoints(debug, [str(ckpt), str(ckpt)], out=str(tmp_path / "multi"),
                                   overrides=["--model.evaluation.games", "[IPD]", "--model.evaluation.variants",
                                              "[new_tokens]", "--model.evaluation.episodes", "3"])
    assert {(s["runs"], s["ci_over"], s["n"], s["rounds"]) for s in summary} == {("2", "runs", "2", "30")}
    assert (tmp_path / "multi" / "report.md").is_file() and os.listdir(tmp_path / "multi" / "tensorboard")


def test_evaluation_callback_logs_during_fit(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_moral.callbacks import Evaluation
    from tests.helpers import scalars, tiny_module

    m = tiny_module(evaluation=EvalConfig(episodes=2, rounds=2, games=["IPD"], opponents=["random"]))
    m._log_hyperparams = False  # frozen config dataclasses in hparams; the CLI path logs them itself
    cb = Evaluation(every_n_episodes=8, variants=["new_tokens"], base=False)

    t = pl.Trainer(default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1,
                   logger=TensorBoardLogger(str(tmp_path), name="cb"), enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    t.fit(m)
    out = Path(t.log_dir) / "evaluation" / "episode_8"
    rows = read_csv(out / "rounds.csv")
    assert {(r["model"], r["variant"], r["opponent"]) for r in rows} == {("agent_0", "new_tokens", "random")}
    assert len(rows) == 4 and cb.last == 8
    tags = scalars(t.log_dir)
    assert [s for s, _ in tags["eval/cooperation/agent_0"]] == [8]
