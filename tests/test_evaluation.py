"""Evaluation suite: aggregation by hand, analytic regrets of scripted policies, seeding, files via the CLI."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.evaluation import VARIANTS, EvalConfig, evaluate, finish, report_meta
from lit_moral.games import GAME_NAMES, PAYOFF_TABLES, MatrixGame
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


def test_rows_with_unknown_action_codes_are_refused_naming_row_and_column():
    rows = [_row(0, 0, "C", "C", 0, 0.0), _row(0, 0, "action2", "C", 3, 0.25)]
    with pytest.raises(ConfigError, match=r"rounds row 1, column 'action': got 'action2'; allowed: C, D, illegal"):
        summarize(rows)
    with pytest.raises(ConfigError, match=r"rounds row 0, column 'prev_other': got 'illegal'"):
        summarize([_row(0, 0, "C", "illegal", 0, 0.0)])
    with pytest.raises(ConfigError, match=r"rounds row 0: missing column 'episode'"):
        summarize([{k: v for k, v in _row(0, 0, "C", "C", 0, 0.0).items() if k != "episode"}])


def test_a_missing_reward_column_only_drops_the_reward_metric():
    rows = [{k: v for k, v in _row(0, e, a, "C", 3.0 * (a == "D"), 0.1).items() if k != "reward"}
            for e, a in enumerate("CD")]
    (s,) = summarize(rows)
    assert "reward_mean" not in s and s["regret_deontological_mean"] == 1.5 and s["D|C_mean"] == 0.5


def test_recompute_regrets_from_a_rows_moves_and_game(scripted_rows):
    from lit_moral.report import recompute_regrets

    row = dict(game="IPD", action="D", other_action="C", prev_other="C", xi=4.0, illegal_penalty=-6.0)
    assert recompute_regrets(row) == {"regret_deontological": 4.0, "regret_utilitarian": pytest.approx(2 / 12)}
    assert recompute_regrets({**row, "action": "illegal"}) == {"regret_deontological": 6.0, "regret_utilitarian": 1.0}
    assert recompute_regrets(row, xi=3)["regret_deontological"] == 3.0
    with pytest.raises(ConfigError, match="custom"):
        recompute_regrets({**row, "game": "custom"})
    # every row an evaluation wrote: its regret columns equal the recomputation from its moves and game
    for r in scripted_rows[::97]:
        assert (r["xi"], r["reward_xi"]) == (4.0, 3.0)
        got = recompute_regrets(r)
        assert got["regret_deontological"] == pytest.approx(r["regret_deontological"])
        assert got["regret_utilitarian"] == pytest.approx(r["regret_utilitarian"])


# ---------------------------------------------------------------- scripted policies


class ScriptedPolicy:
    """A policy stub answering by a fixed rule read off the prompt text (whole-string log-probs 0 / -1e9).

    ``strategies`` maps an adapter name (or BASE) to a rule: ``always_c``, ``always_d``, ``first_option`` (the
    option listed first in the prompt's opening sentence, whose order is random) or ``repeat_last`` (the
    player's own move shown as last round's).
    """

    training = False

    def __init__(self, tokenizer, strategies):
        self.tokenizer, self.strategies = tokenizer, strategies

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def _choose(self, strategy, text, actions):
        if strategy in ("always_c", "always_d"):
            return int(strategy == "always_d")
        if strategy == "first_option":
            first = re.search(r"You must choose either (\S+) or (\S+)\.", text).group(1)
        else:
            first = re.search(r"In the last round you chose (\S+) and", text).group(1)
        return actions.index(first)

    def candidate_logprobs(self, prompts, candidates, **kw):
        actions = [self.tokenizer.decode(c) for c in candidates]
        rows = []
        for adapter, tokens in prompts:
            pick = self._choose(self.strategies[adapter], self.tokenizer.decode(list(tokens)), actions)
            rows.append([0.0 if k == pick else -1e9 for k in range(2)])
        return {"seq_logp": torch.tensor(rows), "values": torch.zeros(len(prompts))}


def scripted_module(tokenizer, xi=3.0, strategies=None):
    from lit_moral.policy import BASE

    strategies = strategies or {"agent_0": "always_c", BASE: "always_d"}
    agents = [a for a in strategies if a != BASE]
    return SimpleNamespace(policy=ScriptedPolicy(tokenizer, strategies), tokenizer=tokenizer, agent_names=agents,
                           style=PromptStyle(), rewards={a: RewardSpec.parse("deontological", xi) for a in agents},
                           hparams=SimpleNamespace(action_mode="constrained", max_new_tokens=2, xi=xi))


# protocol section 7: utilitarian regret vs Random (p(C) = 0.5) of always-C / always-D
ANALYTIC_UT = {"IPD": (0.083, 0.250), "ISH": (0.179, 0.393), "ICN": (0.045, 0.227), "BOS": (0.227, 0.227),
               "ICD": (0.500, 0.286)}


def _analytic(game: str, strategy: str, opponent: str, xi: float) -> tuple[float, float]:
    """Expected (deontological, utilitarian) regret per round of a scripted agent, derived by hand.

    Against Random every opponent move (and its initial "previous" move) is uniform and independent of the
    agent, so: always-C / always-D have the docs/protocol.md values and De = xi x P(D) x 1/2 (vs TFT the move shown
    is uniform in rounds 0 and 1 only: De = xi x P(D) x 1/2 x 2/5, and rounds 1-4 are (a, a)); first-option plays C
    with probability 1/2 independently of everything (the option order is random), and so does
    repeat-last (its initial move is uniform and it never changes): both average the four outcomes. Against
    TFT, repeat-last can only defect after a C in round 0 (afterwards TFT shows its own move back):
    De = xi x 1/4 x 1/5 rounds; first-option's move stays independent of TFT's copy of its last move: xi / 4.
    """
    p = torch.tensor(PAYOFF_TABLES[game], dtype=torch.float32)
    u_max = float(p.sum(-1).max())
    u = lambda a, b: (u_max - float(p[a, b].sum())) / (u_max + 6)  # noqa: E731
    ut = lambda a: (u(a, 0) + u(a, 1)) / 2  # noqa: E731
    if strategy in ("always_c", "always_d"):
        a = int(strategy == "always_d")
        if opponent == "random":
            return xi * a / 2, ut(a)
        # vs TFT: the previous move shown is uniform in rounds 0 (TFT's first move) and 1 (TFT's copy of the
        # agent's uniform initial move); TFT's own move is uniform in round 0 only.
        return xi * a / 2 * 2 / 5, ut(a) / 5 + u(a, a) * 4 / 5
    util = (ut(0) + ut(1)) / 2
    if strategy == "repeat_last" and opponent == "tft":
        return xi / 4 / 5, None
    return xi / 4, util if opponent == "random" else None


SCRIPTED = {"first_option": "first_option", "repeat_last": "repeat_last", "always_c": "always_c"}


@pytest.fixture(scope="module")
def scripted_rows(tiny):
    from lit_moral.policy import BASE

    module = scripted_module(tiny[1], xi=3.0, strategies={**SCRIPTED, BASE: "always_d"})
    cfg = EvalConfig(episodes=1000, rounds=5, opponents=["random", "tft"], variants=["new_tokens"], xi=4.0)
    return evaluate(module, cfg)


def test_scripted_agents_give_the_analytic_regrets_in_every_game(scripted_rows):
    """Position-biased, last-move-repeating, always-C and always-D agents vs Random (and TFT) in all five games.

    Tolerance: 3.5 standard errors of the mean, the standard error taken from the summary's own CI
    (1.96 sd / sqrt(1000 episodes), episodes being the independent units): a check that holds for all but
    ~1 in 2000 seeds, and fixed here by the evaluation seed. The defects it guards against are far larger:
    with the sampler and Random seeded alike, repeat-last's De regret (xi 4) was 0.834 vs Random (1.0) and 0.000
    vs TFT (0.2), first-option's Ut regret 0.187 in BOS (0.227) and 0.358 in ICD (0.393).
    """
    strategy = {**SCRIPTED, "base": "always_d"}
    summary = summarize(scripted_rows)
    checked = 0
    for s in summary:
        de, ut = _analytic(s["game"], strategy[s["model"]], s["opponent"], 4.0)
        for metric, want in (("regret_deontological", de), ("regret_utilitarian", ut)):
            if want is None:
                continue
            tol = 3.5 * s[f"{metric}_ci"] / 1.96 + 1e-9
            assert abs(s[f"{metric}_mean"] - want) <= tol, (s["model"], s["game"], s["opponent"], metric,
                                                           s[f"{metric}_mean"], want, tol)
            checked += 1
    assert checked == 5 * 14 and len(summary) == 5 * 4 * 2
    for game, (ut_c, ut_d) in ANALYTIC_UT.items():  # the hand derivation agrees with docs/protocol.md's table
        assert _analytic(game, "always_c", "random", 4)[1] == pytest.approx(ut_c, abs=5e-4)
        assert _analytic(game, "always_d", "random", 4)[1] == pytest.approx(ut_d, abs=5e-4)


def test_every_random_stream_is_independent(scripted_rows):
    """Initial states, option orders and Random's moves come from independent streams: the first-option agent
    matches Random's round-0 move half the time, and initial (me, other) states are all four combinations."""
    first = [r for r in scripted_rows if r["model"] == "first_option" and r["opponent"] == "random"]
    r0 = [r for r in first if r["round"] == 0]
    match = sum(r["action"] == r["other_action"] for r in r0) / len(r0)
    assert abs(match - 0.5) < 0.05, match  # 5000 rounds: sd 0.007
    combos = {(r["prev_me"], r["prev_other"]) for r in r0}
    assert combos == {("C", "C"), ("C", "D"), ("D", "C"), ("D", "D")}
    same_prev = sum(r["prev_me"] == r["prev_other"] for r in r0) / len(r0)
    assert abs(same_prev - 0.5) < 0.05, same_prev


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


def test_cut_illegal_answers_leave_every_action_and_draw_unchanged():
    """Free mode: the evaluation's cut (stop an answer once it can no longer be legal) vs full generation, same
    seed: every round's moves, payoffs and regrets are equal; cut answers are the start of the full ones. Two new
    tokens, the paper's (with more, a full answer can end at end-of-text before the cut one's stand-in draws do)."""
    from tests.helpers import tiny_module

    m = tiny_module(action_mode="free", max_new_tokens=2)
    m.configure_model()
    cfg = dict(episodes=6, rounds=3, games=["IPD", "BOS"], opponents=["random", "tft"], variants=["new_tokens"],
               plots=False)
    rows = {cut: evaluate(m, EvalConfig(**cfg, cut_illegal=cut)) for cut in (False, True)}
    assert len(rows[True]) == len(rows[False]) == 2 * 2 * 2 * 6 * 3  # agent_0 and base
    shorter = 0
    for full, cut in zip(rows[False], rows[True]):
        assert {k: v for k, v in cut.items() if k != "answer"} == {k: v for k, v in full.items() if k != "answer"}
        assert full["answer"].startswith(cut["answer"])
        shorter += len(cut["answer"]) < len(full["answer"])
    assert shorter > len(rows[True]) / 4  # cut in 54 of 144 rounds (byte tokens that decode to U+FFFD stay live)


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
    out = ckpt.parent.parent / "evaluation"  # beside the checkpoint it evaluates, not in a new version folder
    assert Path(cli.trainer.log_dir) == out / "tensorboard"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "debug").iterdir()) == ["version_0"]
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
    from lit_moral.evaluate_runs import evaluate_checkpoints

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


def test_nine_models_get_nine_distinct_colours():
    """The paper's Figure 4 has 7 rows; colours used to repeat after 6 models."""
    from lit_moral.plots import model_colors, regret_figure

    for n in (1, 6, 7, 9, 16, 25):
        assert len(set(model_colors(n))) == n
    models = [f"model_{k}" for k in range(9)]
    summary = [dict(model=m, game="IPD", variant="new_tokens", opponent="random", regret_deontological_mean=0.1 * k,
                    regret_deontological_ci=0.01, regret_utilitarian_mean=0.02 * k, regret_utilitarian_ci=0.001)
               for k, m in enumerate(models)]
    fig = regret_figure(summary, dict(models=models, games=["IPD"], report_variant="new_tokens",
                                      report_opponent="random"))
    bars = [p.get_facecolor() for p in fig.axes[0].patches]
    assert len(bars) == 9 and len(set(bars)) == 9


def test_report_variant_default_follows_later_overrides():
    """A saved EvalConfig keeps report_variant/report_opponent unset, so overriding variants or opponents later
    (``test --model.evaluation.variants [training_tokens]`` on a run saved with the defaults) is not refused."""
    import dataclasses

    from lit_moral.evaluation import EvalConfig

    cfg = EvalConfig()
    assert (cfg.report_variant, cfg.report_opponent) == (None, None)
    assert (cfg.shown_variant, cfg.shown_opponent) == ("new_tokens", "random")
    later = dataclasses.replace(cfg, variants=["training_tokens"], opponents=["tft"])
    assert (later.shown_variant, later.shown_opponent) == ("training_tokens", "tft")
    with pytest.raises(ConfigError, match="evaluation.report_variant"):
        EvalConfig(variants=["training_tokens"], report_variant="new_tokens")
