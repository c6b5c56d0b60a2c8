"""Critic-free learners (GRPO, RLOO, REINFORCE) beside PPO: estimators, training runs, self-play, resume."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_moral import models
from lit_moral.errors import ConfigError
from lit_moral.learners import LEARNERS, ReinforceLearner, StateBaseline, group_keys
from lit_moral.module import AgentConfig
from lit_moral.ppo import PPOConfig, group_stats, grpo_advantages, rloo_advantages
from tests.helpers import tiny_module, trainer
from tests.test_reliability import MemoryLogger, StopAfter

CRITIC_FREE = ["grpo", "rloo", "reinforce"]
S7 = math.sqrt(7.0)

# Returns and (pid, seat) keys: group A = (0, 0) holds [1, 2, 6]; (1, 0) holds one sample; (2, 0) holds two equal
# returns; (0, 1) has group A's pid in the other seat, so it is a group of its own, not a fourth member of A.
RET = [1.0, 5.0, 2.0, 2.0, 6.0, 10.0, 2.0]
KEYS = [[0, 0], [1, 0], [0, 0], [2, 0], [0, 0], [0, 1], [2, 0]]


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# ---- pure estimators --------------------------------------------------------------------------------------
def test_group_stats_hand_values_and_the_explicit_key():
    st = group_stats(_t(RET), torch.tensor(KEYS))
    assert st["count"].tolist() == [3, 1, 3, 2, 3, 1, 2]
    assert st["mean"].tolist() == [3.0, 5.0, 3.0, 2.0, 3.0, 10.0, 2.0]
    torch.testing.assert_close(st["std"], _t([S7, 0.0, S7, 0.0, S7, 0.0, 0.0]))
    assert st["flat"].tolist() == [False, True, False, True, False, True, True]
    # Keyed by pid alone, (0, 1) would join group A: the key's every column separates groups.
    by_pid = group_stats(_t(RET), torch.tensor(KEYS)[:, 0])
    assert by_pid["count"][0] == 4 and by_pid["mean"][0] == pytest.approx(19 / 4)


def test_rloo_hand_values_single_and_flat_groups():
    adv, base = rloo_advantages(_t(RET), torch.tensor(KEYS))
    # A: 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2; a group of one and equal returns give exactly 0.
    assert adv.tolist() == [-3.0, 0.0, -1.5, 0.0, 4.5, 0.0, 0.0]
    assert base.tolist() == [4.0, 5.0, 3.5, 2.0, 1.5, 10.0, 2.0]


def test_grpo_hand_values_single_and_flat_groups():
    adv, base = grpo_advantages(_t(RET), torch.tensor(KEYS))
    d = S7 + 1e-4
    torch.testing.assert_close(adv, _t([-2 / d, 0.0, -1 / d, 0.0, 3 / d, 0.0, 0.0]), atol=1e-12, rtol=0)
    assert base.tolist() == [3.0, 5.0, 3.0, 2.0, 3.0, 10.0, 2.0]
    # Two samples [0, 4]: mean 2, unbiased std sqrt(8).
    adv2, _ = grpo_advantages(_t([0.0, 4.0]), torch.tensor([[7, 0], [7, 0]]))
    torch.testing.assert_close(adv2, _t([-2.0, 2.0]) / (math.sqrt(8.0) + 1e-4), atol=1e-12, rtol=0)


@pytest.mark.parametrize("estimator", [rloo_advantages, grpo_advantages])
def test_equal_returns_give_exactly_zero(estimator):
    """Three equal returns whose floating-point mean is not exactly the value: still exactly 0 (no rounding noise
    blown up by a near-zero std), and float32 in gives float32 out."""
    ret = torch.full((3,), 0.1, dtype=torch.float64)
    assert (ret.sum() / 3).item() != 0.1
    adv, _ = estimator(ret, torch.zeros(3, 2, dtype=torch.long))
    assert adv.tolist() == [0.0, 0.0, 0.0]
    adv32, _ = estimator(torch.tensor([0.1, 0.1, 0.7]), torch.zeros(3, 2, dtype=torch.long))
    assert adv32.dtype == torch.float32 and adv32[2] > 0


def test_state_baseline_running_mean_and_round_trip():
    b = StateBaseline(decay=0.5)
    k1 = torch.tensor([[0, 0], [0, 0], [3, 1]])
    assert b(k1).tolist() == [0.0, 0.0, 0.0]  # never seen: 0
    b.update(k1, _t([1.0, 3.0, -4.0]))
    assert b.value == {(0, 0): 2.0, (3, 1): -4.0}  # first visit: the mean
    b.update(torch.tensor([[0, 0], [5, 0]]), _t([6.0, 1.0]))
    assert b.value == {(0, 0): 4.0, (3, 1): -4.0, (5, 0): 1.0}  # 0.5 x 2 + 0.5 x 6; (3, 1) not seen: kept
    assert b(torch.tensor([[3, 1], [0, 0], [9, 9]])).tolist() == [-4.0, 4.0, 0.0]
    c = StateBaseline()
    c.load_state_dict(b.state_dict())
    assert c.value == b.value


def test_reinforce_advantage_uses_the_baseline_before_this_iterations_samples():
    learner = ReinforceLearner(PPOConfig())

    class OneProcess:
        world_size = 1

    keys = torch.tensor([[0, 0], [0, 0], [1, 0]])
    adv, logs = learner.advantages(_t([1.0, 3.0, 5.0]), keys, OneProcess())
    assert adv.tolist() == [1.0, 3.0, 5.0] and logs["policy/baseline_states"] == 2.0
    adv, _ = learner.advantages(_t([4.0, 0.0, 5.0]), keys, OneProcess())
    assert adv.tolist() == [2.0, -2.0, 0.0]  # baselines 2 and 5
    assert learner.baseline.value == {(0, 0): 2.0, (1, 0): 5.0}
    restored = ReinforceLearner(PPOConfig())
    restored.load_state_dict(learner.state_dict())
    assert restored.baseline.value == learner.baseline.value


def test_reinforce_baseline_folds_in_every_processs_returns():
    """Under DDP the baseline update sees all processes' samples (so it stays identical everywhere), while the
    advantages stay those of this process's samples."""

    class TwoProcesses:
        world_size = 2

        def __init__(self):
            # What the other process holds, in the order gathered: pid, seat, returns.
            self.other = [torch.tensor([0, 4]), torch.tensor([0, 0]), _t([5.0, 7.0])]

        def gather(self, x):
            return torch.cat([x, self.other.pop(0).to(x.dtype)])

    learner = ReinforceLearner(PPOConfig())
    adv, _ = learner.advantages(_t([1.0, 3.0]), torch.tensor([[0, 0], [0, 0]]), TwoProcesses())
    assert adv.tolist() == [1.0, 3.0]
    assert learner.baseline.value == {(0, 0): 3.0, (4, 0): 7.0}  # (1 + 3 + 5) / 3


def test_unknown_algorithm_names_the_field_before_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(models, "load", boom)
    with pytest.raises(ConfigError) as e:
        tiny_module(algorithm="GRPO")
    msg = str(e.value)
    assert msg.startswith("algorithm: unknown value 'GRPO'") and "did you mean 'grpo'" in msg
    for name in ("ppo", "grpo", "rloo", "reinforce"):
        assert name in msg
    assert sorted(LEARNERS) == ["grpo", "ppo", "reinforce", "rloo"]


# ---- training runs on the tiny model ----------------------------------------------------------------------
class _Logged(pl.Callback):
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_one_iteration_moves_every_lora_tensor_and_not_the_value_head(tmp_path, algorithm):
    m = tiny_module(algorithm=algorithm, episodes_per_iteration=16, ppo={"ppo_epochs": 2, "minibatches": 2})
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    sizes: list[int] = []
    score = m.score

    def counting_score(agent, s, idx):
        sizes.append(len(idx))
        return score(agent, s, idx)

    m.score = counting_score
    logged = _Logged()
    trainer(tmp_path, callbacks=[logged]).fit(m)
    changed = {n for n, p in m.policy.named_parameters() if not torch.equal(before[n], p.detach())}
    agent = {n for n, _ in m.policy.agent_parameters("agent_0")}
    lora = {n for n in agent if "lora_" in n}
    head = agent - lora
    assert lora and lora <= changed, f"unchanged LoRA tensors: {sorted(lora - changed)[:5]}"
    assert head and not head & changed, f"value head changed: {sorted(head & changed)}"
    assert not changed - lora
    # The engine scores whole minibatches: 2 epochs x 2 minibatches of the 32 samples, no per-sample forward.
    assert sizes == [16, 16, 16, 16]
    assert m.learners["agent_0"].name == algorithm and not m.learners["agent_0"].critic
    keys = {k for k in logged.logged if k.endswith("/agent_0")}
    assert {"loss/policy/agent_0", "policy/kl_coef/agent_0", "policy/baseline/agent_0"} <= keys
    assert not {k for k in keys if k.startswith(("value/", "loss/value/"))}


def test_self_play_group_statistics_use_only_the_agents_own_rewards(tmp_path):
    """Two agents on the same prompts (IPD is symmetric: both seats share prompt ids): agent_0's groups hold only
    agent_0's returns. Rewards unnormalised and a fixed KL coefficient, so the returns can be recomputed here."""
    m = tiny_module(agents=[AgentConfig("agent_0", "deontological"), AgentConfig("agent_1", "game")],
                    opponent="llm", algorithm="grpo", episodes_per_iteration=16,
                    ppo={"ppo_epochs": 1, "normalize_rewards": False, "kl_penalty": "fixed", "init_kl_coef": 0.1})
    seen: dict[str, tuple] = {}
    for a, learner in m.learners.items():
        def spy(ret, keys, hooks, a=a, orig=learner.advantages):
            adv, extra = orig(ret, keys, hooks)
            seen[a] = (ret.clone(), keys.clone(), adv.clone())
            return adv, extra
        learner.advantages = spy
    trainer(tmp_path).fit(m)
    s0, s1 = m.last_samples["agent_0"], m.last_samples["agent_1"]
    ret, keys, adv = seen["agent_0"]
    own = s0.reward - 0.1 * (s0.old_logp - s0.ref_logp).sum(1)
    torch.testing.assert_close(ret, own)
    assert torch.equal(keys, group_keys(s0)) and (keys[:, 1] == 0).all()
    want = torch.zeros_like(own)
    for k in {tuple(r) for r in keys.tolist()}:
        g = (keys == torch.tensor(k)).all(1)
        x = own[g].double()
        if g.sum() > 1 and x.max() > x.min():
            want[g] = ((x - x.mean()) / (x.std() + 1e-4)).float()
    torch.testing.assert_close(adv, want)
    assert (adv != 0).any()
    # Pooling both agents by prompt would have changed agent_0's statistics (their rewards differ in kind).
    other = s1.reward - 0.1 * (s1.old_logp - s1.ref_logp).sum(1)
    pooled, _ = grpo_advantages(torch.cat([own, other]), torch.cat([s0.pid, s1.pid]))
    assert not torch.allclose(pooled[:len(own)], adv)


@pytest.mark.parametrize("algorithm,mode", [("grpo", "constrained"), ("reinforce", "free")])
def test_update_equals_the_obvious_path(tmp_path, monkeypatch, algorithm, mode):
    """The critic-free update through the engine vs ``naive=True`` (per-sample forwards and backwards) on the same
    rollout, replayed as in test_module: same losses and weights."""
    import lit_moral.module as module_mod

    recorded, real_play = {}, module_mod.play

    def record(sampler, matches, game, rounds, rewards, streams):
        recorded["played"] = real_play(sampler, matches, game, rounds, rewards, streams)
        recorded["streams"] = streams.state_dict()
        return recorded["played"]

    def replay(sampler, matches, game, rounds, rewards, streams):
        streams.load_state_dict(recorded["streams"])
        return recorded["played"]

    runs = []
    for naive in (False, True):
        monkeypatch.setattr(module_mod, "play", replay if naive else record)
        m = tiny_module(algorithm=algorithm, action_mode=mode, naive=naive, seed=3,
                        ppo={"ppo_epochs": 2, "minibatches": 2})
        m.configure_model()
        with torch.no_grad():  # a non-trivial starting policy, identical in both runs
            g = torch.Generator().manual_seed(1)
            for n, p in m.policy.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        logged = _Logged()
        trainer(tmp_path / str(naive), callbacks=[logged]).fit(m)
        runs.append((m, logged.logged))
    (fast, lf), (slow, ls) = runs
    assert lf["loss/policy/agent_0"] != 0.0
    for key in ("loss/policy/agent_0", "loss/total/agent_0", "policy/approx_kl/agent_0", "policy/entropy/agent_0",
                "policy/baseline/agent_0"):
        assert lf[key] == pytest.approx(ls[key], rel=1e-4, abs=1e-6), key
    for (n, a), (_, b) in zip(fast.policy.agent_parameters("agent_0"), slow.policy.agent_parameters("agent_0")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda msg, n=n: f"{n}: {msg}")


class LearnerDump(pl.Callback):
    """Writes, per process, the agent's weights before and after training and its learner's state (DDP test)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.policy.agent_parameters("agent_0")}

    def on_train_end(self, trainer, pl_module) -> None:
        import os

        os.makedirs(self.dirpath, exist_ok=True)
        after = {n: p.detach().clone() for n, p in pl_module.policy.agent_parameters("agent_0")}
        torch.save({"before": self.before, "after": after, "learner": pl_module.learners["agent_0"].state_dict()},
                   os.path.join(self.dirpath, f"rank{trainer.global_rank}.pt"))


def test_ddp_reinforce_stays_identical_across_processes(tmp_path, tiny_dir):
    """Two CPU processes (gloo) run the debug config with ``algorithm: reinforce``: the same weights and the same
    baselines (folded in from both processes' games) on both, every LoRA tensor moved, the value head did not (its
    gradients are zero-filled by the averaging, and Adam's step on them is zero). ``tiny_dir`` builds the tiny
    model first, so the two processes do not both build it into the test cache at once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "lit_moral", "fit", "--config", str(root / "configs" / "debug.yaml"),
           "--model.algorithm", "reinforce", "--model.iterations_per_epoch", "2", "--trainer.max_epochs", "1",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.callbacks+=tests.test_learners.LearnerDump", "--trainer.callbacks.dirpath", str(tmp_path / "dump")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for k in r0["after"]:
        torch.testing.assert_close(r0["after"][k], r1["after"][k], atol=0, rtol=0, msg=k)
        moved = not torch.equal(r0["before"][k], r0["after"][k])
        assert moved == ("lora_" in k), k
    assert _state(r0["learner"]) == _state(r1["learner"])
    assert len(r0["learner"]["baseline"]["value"]) > 1


# ---- exact resume -----------------------------------------------------------------------------------------
RESUMABLE = dict(opponent="random", iterations_per_epoch=2, lora={"r": 4, "alpha": 8, "dropout": 0.1},
                 ppo={"ppo_epochs": 2, "minibatches": 2, "kl_penalty": "adaptive", "target_kl": 0.01,
                      "kl_horizon": 10.0, "normalize_rewards": True})


def _fit(root, algorithm, callbacks=(), ckpt=None):
    """One epoch of two iterations (adaptive KL, reward normalisation, dropout, a random opponent)."""
    pl.seed_everything(0)
    m = tiny_module(**RESUMABLE, algorithm=algorithm, seed=0)
    logger = MemoryLogger()
    t = pl.Trainer(default_root_dir=str(root), max_epochs=1, accelerator="cpu", devices=1, logger=logger,
                   log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=list(callbacks))
    t.fit(m, ckpt_path=ckpt)
    return m, logger.rows


def _state(x):
    """A learner state as plain Python values (tensors to lists), for equality."""
    if isinstance(x, dict):
        return {k: _state(v) for k, v in x.items()}
    return x.tolist() if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_resume_after_iteration_1_matches_an_uninterrupted_run(tmp_path, algorithm):
    full, full_rows = _fit(tmp_path / "full", algorithm)
    ckpt = tmp_path / "cut" / "stop.ckpt"
    _, first_rows = _fit(tmp_path / "cut", algorithm, callbacks=[StopAfter(1, ckpt)])
    resumed, resumed_rows = _fit(tmp_path / "cut", algorithm, ckpt=str(ckpt))
    # Stopped mid-epoch (iteration 1 of 2); the resumed run plays iteration 2 with the restored learner state.
    assert sorted(first_rows) == [8] and sorted(resumed_rows) == [16]
    for step, want in full_rows.items():
        got = first_rows.get(step) or resumed_rows[step]
        assert got.keys() == want.keys(), step
        for k in want:
            assert abs(got[k] - want[k]) <= 1e-6, (step, k, got[k], want[k])
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    state = _state(full.learners["agent_0"].state_dict())
    assert state == _state(resumed.learners["agent_0"].state_dict())
    assert state["kl"]["value"] != 0.2  # the adaptive controller moved: its state had to be restored
    if algorithm == "reinforce":
        assert len(state["baseline"]["value"]) > 1


def _types(**kw):
    from lit_moral.games import ACTION_TYPES

    return {t: float(kw.get(t.replace("|", "_"), 0.0)) for t in ACTION_TYPES}


def test_benchmark_criteria_table():
    """benchmarks/learners.py's stopping rule per reward, on hand-made action-type frequencies."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "learners.py"
    spec = importlib.util.spec_from_file_location("bench_learners", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tft_like = _types(C_C=0.48, D_D=0.48, D_C=0.02, C_D=0.02)
    cooperator = _types(C_C=0.97, D_C=0.03)
    defector = _types(D_C=0.2, D_D=0.78, C_D=0.02)
    assert bench.reached("utilitarian", cooperator) and not bench.reached("utilitarian", _types(C_C=0.9, D_C=0.1))
    assert bench.reached("deontological", cooperator) and not bench.reached("deontological", defector)
    assert bench.reached("game", defector) and not bench.reached("game", _types(D_D=0.9, C_D=0.1))
    assert bench.reached("game_deontological", tft_like) and not bench.reached("game_deontological", cooperator)
    assert bench.conditional(_types(D_D=1.0), "D", "C") is None  # C never came before
