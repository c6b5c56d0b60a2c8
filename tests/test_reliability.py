"""Reliability: exact resume, reproducibility, atomic checkpoints, bad input, numerical guards, preemption."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lit_moral.callbacks import OpponentSchedule, RewardSchedule
from lit_moral.checkpoint_io import AtomicCheckpointIO
from lit_moral.errors import ConfigError
from lit_moral.module import AgentConfig
from tests.helpers import tiny_module, trainer

ROOT = Path(__file__).resolve().parents[1]
# Adaptive KL, reward normalisation, dropout (torch's global RNG) and the random opponent: every kind of
# state a resume has to restore changes from one iteration to the next.
RESUMABLE = dict(opponent="random", iterations_per_epoch=2, value_head_dropout=0.1,
                 lora={"r": 4, "alpha": 8, "dropout": 0.1},
                 ppo={"ppo_epochs": 2, "minibatches": 2, "kl_penalty": "adaptive", "target_kl": 0.01,
                      "kl_horizon": 10.0, "normalize_rewards": True})


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``rows[step][key] = value`` (perf/* timings dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    name = "memory"
    version = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = self.rows.setdefault(int(step), {})
        row.update({k: float(v) for k, v in metrics.items() if not k.startswith("perf/") and k != "epoch"})

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Hyperparameters are not compared."""


class StopAfter(Callback):
    """Saves a checkpoint to ``path`` after iteration ``n`` and stops the run there (an interruption)."""

    def __init__(self, n: int, path: Path) -> None:
        self.n, self.path = n, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.iteration == self.n:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _schedules():
    return [RewardSchedule({"agent_0": [[0, "game"], [16, "utilitarian"]]}),
            OpponentSchedule([[0, "random"], [8, "tft"], [24, "random"]])]


def _fit(root, epochs=2, callbacks=(), ckpt=None, seed=0, **kw):
    """Fit the tiny module with CSV logging under ``root``; returns the module and its logged rows by step."""
    pl.seed_everything(seed)
    m = tiny_module(**{**RESUMABLE, "seed": seed, **kw})
    logger = MemoryLogger()
    t = pl.Trainer(default_root_dir=str(root), max_epochs=epochs, accelerator="cpu", devices=1, logger=logger,
                   log_every_n_steps=1,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[*_schedules(), *callbacks])
    t.fit(m, ckpt_path=ckpt)
    return m, logger.rows


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_from_any_iteration_matches_an_uninterrupted_run(tmp_path, stop_after):
    """Stopped mid-epoch (after iteration 1 of 2) or at an epoch end, then resumed: same weights and metrics."""
    full, full_rows = _fit(tmp_path / "full")
    ckpt = tmp_path / "cut" / "stop.ckpt"
    _, first_rows = _fit(tmp_path / "cut", callbacks=[StopAfter(stop_after, ckpt)])
    resumed, resumed_rows = _fit(tmp_path / "cut", ckpt=str(ckpt))
    # x-axis is episodes (8 per iteration): the resumed run plays exactly the remaining iterations.
    assert sorted(first_rows) == [8 * i for i in range(1, stop_after + 1)]
    assert sorted(resumed_rows) == [8 * i for i in range(stop_after + 1, 5)]
    assert resumed.iteration == full.iteration == 4 and resumed.episode == full.episode == 32
    for step, want in full_rows.items():
        got = first_rows.get(step) or resumed_rows[step]
        assert got.keys() == want.keys(), step
        for k in want:
            assert abs(got[k] - want[k]) <= 1e-6, (step, k, got[k], want[k])
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert full.kl_ctl["agent_0"].value == resumed.kl_ctl["agent_0"].value != 0.2
    assert full.moments["agent_0"].state_dict() == resumed.moments["agent_0"].state_dict()
    assert full.opponent_name == resumed.opponent_name == "random"
    assert resumed.rewards["agent_0"].name == "utilitarian"


def test_same_seed_reproduces_and_other_seed_differs(tmp_path):
    a, b, c = (_fit(tmp_path / str(i), epochs=1, seed=seed)[1] for i, seed in enumerate((0, 0, 1)))
    assert sorted(a) == [8, 16] and a == b
    assert any(a[s][k] != c[s][k] for s in a for k in a[s] if k.startswith(("loss/", "game/", "reward/")))


# ---- checkpoints: atomic writes, damaged and mismatched files ------------------------------------------------
def _first_run(tmp_path, **kw):
    """One epoch (one iteration) with ``last.ckpt`` under ``tmp_path/ckpt``; returns (module, trainer, path)."""
    m = tiny_module(**kw)
    t = trainer(tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)],
                plugins=[AtomicCheckpointIO()])
    t.fit(m)
    return m, t, tmp_path / "ckpt" / "last.ckpt"


class _Seen(Callback):
    """Records, before each iteration, the reward name of agent_0 and the opponent."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((pl_module.rewards["agent_0"].name, pl_module.opponent_name))


def test_resume_keeps_the_configs_reward_and_opponent(tmp_path):
    """The config is authoritative on resume: a checkpoint of a game-vs-random run resumed with a utilitarian-
    vs-TFT config plays utilitarian vs TFT (before the fix the checkpoint's reward and opponent came back)."""
    _, _, last = _first_run(tmp_path, agents=[AgentConfig("agent_0", "game")], opponent="random")
    seen = _Seen()
    m = tiny_module(agents=[AgentConfig("agent_0", "utilitarian")], opponent="tft")
    trainer(tmp_path / "b", max_epochs=2, callbacks=[seen]).fit(m, ckpt_path=str(last))
    assert seen.seen == [("utilitarian", "tft")] and m.episode == 16


def test_resume_with_a_schedule_applies_the_schedules_entry(tmp_path):
    """...except where a schedule says otherwise: the entry of the restored episode applies."""
    sched = lambda: [RewardSchedule({"agent_0": [[0, "game"], [8, "deontological"]]}),  # noqa: E731
                     OpponentSchedule([[0, "random"], [8, "always_defect"]])]
    m = tiny_module(agents=[AgentConfig("agent_0", "game")], opponent="random")
    t = trainer(tmp_path, callbacks=[*sched(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)])
    t.fit(m)
    seen = _Seen()
    m = tiny_module(agents=[AgentConfig("agent_0", "utilitarian")], opponent="tft")
    trainer(tmp_path / "b", max_epochs=2, callbacks=[*sched(), seen]).fit(m, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen.seen == [("deontological", "always_defect")]


def test_switching_back_to_an_opponent_continues_its_stream():
    """random -> tft -> random: the Random opponent continues its stream instead of replaying episode 0."""
    m = tiny_module(opponent="random")
    history = torch.zeros(64, dtype=torch.long)
    first = m.opponents[("agent_0", "random")].act(history, history)
    m.set_opponent("tft")
    m.set_opponent("random")
    again = m.opponents[("agent_0", "random")].act(history, history)
    assert not torch.equal(first, again)
    fresh = tiny_module(opponent="random").opponents[("agent_0", "random")].act(history, history)
    assert torch.equal(first, fresh)  # same seed, same stream: the difference is continuation, not chance


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    m, t, last = _first_run(tmp_path)
    before = last.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(before[: len(before) // 3])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        t.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    assert torch.load(last, weights_only=False)["lit_moral"]["iteration"] == 1


def test_adapter_export_replaces_the_folder_or_leaves_it(tmp_path, monkeypatch):
    m, t, last = _first_run(tmp_path)
    adapter = tmp_path / "adapters" / "agent_0" / "adapter_model.safetensors"
    before = adapter.read_bytes()

    def crash(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(m.policy.model, "save_pretrained", crash)
    with pytest.raises(OSError):
        t.save_checkpoint(tmp_path / "other.ckpt")
    assert adapter.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["README.md", "agent_0"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_gives_a_config_error_naming_ckpt_path(tmp_path, damage):
    _, _, last = _first_run(tmp_path)
    data = last.read_bytes()
    bad = tmp_path / f"{damage}.ckpt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[damage])
    m = tiny_module()
    with pytest.raises(ConfigError, match=r"ckpt_path: '.*\.ckpt' is not a readable checkpoint") as e:
        trainer(tmp_path / "again", plugins=[AtomicCheckpointIO()]).fit(m, ckpt_path=str(bad))
    assert "\n" not in str(e.value) and m.iteration == 0
    with pytest.raises(ConfigError, match="does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize(("change", "needle"), [
    (dict(lora={"r": 8, "alpha": 8}), "lora_r: checkpoint has 4, config has 8"),
    (dict(agents=[AgentConfig("agent_0"), AgentConfig("agent_1")], opponent="llm"),
     "agents: checkpoint has ['agent_0'], config has ['agent_0', 'agent_1']"),
    (dict(agents=[AgentConfig("agent_1")]), "agents: checkpoint has ['agent_0'], config has ['agent_1']"),
    (dict(model="LOCAL"), "model: checkpoint has 'tiny', config has"),
])
def test_mismatched_checkpoint_stops_before_training_and_touches_nothing(tmp_path, tiny_dir, change, needle):
    import shutil

    _, _, last = _first_run(tmp_path)
    if change.get("model") == "LOCAL":
        shutil.copytree(tiny_dir, tmp_path / "other-base")
        change = {"model": str(tmp_path / "other-base")}
    before = {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    m = tiny_module(**change)
    t = trainer(tmp_path / "resume", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                plugins=[AtomicCheckpointIO()])
    with pytest.raises(ConfigError, match="ckpt_path: checkpoint does not match this run") as e:
        t.fit(m, ckpt_path=str(last))
    assert needle in str(e.value)
    assert m.iteration == 0 and t.global_step == 0
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before


# ---- numerical guards ------------------------------------------------------------------------------------------
def _resume_second_epoch(tmp_path):
    m = tiny_module()
    t = trainer(tmp_path, max_epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                plugins=[AtomicCheckpointIO()])
    return m, t


def _assert_kept(last, before):
    assert last.read_bytes() == before
    state = torch.load(last, weights_only=False)
    assert state["lit_moral"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_non_finite_reward_stops_naming_iteration_and_agent(tmp_path, monkeypatch):
    import lit_moral.rollout as rollout

    _, _, last = _first_run(tmp_path)
    before = last.read_bytes()
    real = rollout.compute_reward

    def nan_reward(*a, **k):
        total, comps = real(*a, **k)
        return total * float("nan"), comps

    monkeypatch.setattr(rollout, "compute_reward", nan_reward)
    m, t = _resume_second_epoch(tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite reward at iteration 1, agent agent_0; the last good"):
        t.fit(m, ckpt_path=str(last))
    _assert_kept(last, before)


def test_non_finite_gradient_stops_naming_iteration_and_agent(tmp_path):
    _, _, last = _first_run(tmp_path)
    before = last.read_bytes()
    m, t = _resume_second_epoch(tmp_path)
    m.configure_model()
    name, p = next(iter(m.policy.agent_parameters("agent_0")))
    p.register_hook(lambda g: g * float("inf"))
    with pytest.raises(FloatingPointError, match=r"non-finite (gradient in .* at iteration 1, agent agent_0|loss)"):
        t.fit(m, ckpt_path=str(last))
    _assert_kept(last, before)


def test_no_checkpoint_is_written_with_a_non_finite_weight(tmp_path):
    m, t, last = _first_run(tmp_path)
    before = last.read_bytes()
    _, p = next(iter(m.policy.agent_parameters("agent_0")))
    with torch.no_grad():
        p[0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write a checkpoint at iteration 1: .* is not finite"):
        t.save_checkpoint(last)
    _assert_kept(last, before)


# ---- preemption ------------------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from lit_moral.cli import cli_main

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    config = str(ROOT / "configs" / "debug.yaml")
    proc = subprocess.run([sys.executable, "-m", "lit_moral", "fit", "--config", config,
                           "--trainer.callbacks+=tests.helpers.SigtermAt", "--trainer.callbacks.iteration", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "checkpoints" / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert (state["lit_moral"]["iteration"], state["lit_moral"]["episode"]) == (2, 32)  # stopped mid-epoch 0
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", config, "--ckpt_path", str(last)])
    assert (cli.model.iteration, cli.model.episode) == (6, 96)  # the 4 remaining iterations of 2 epochs


# ---- bad input, before any model loads --------------------------------------------------------------------------
BAD_INPUTS = [
    (dict(game=[[1, 2], [3, 4]]), "game: payoffs must have shape [2, 2, 2] (row action, column action, "
                                  "(row payoff, column payoff)); got shape [2, 2]"),
    (dict(game=[[[3, 3], [0, 4]], [[4, 0], [1, float("nan")]]]), "game: payoffs must be finite numbers; got "
                                                                  "[[[3.0, 3.0], [0.0, 4.0]], [[4.0, 0.0], [1.0, nan]]]"),
    (dict(game=[[[3, 3], [0, 4]], [[4, 0], [1, float("inf")]]]), "game: payoffs must be finite numbers"),
    (dict(actions=("", "action2")), "actions: action strings must be non-empty; got ['', 'action2']"),
    (dict(actions=("act", "act")), "actions: the two action strings must differ; got ['act', 'act']"),
    (dict(actions=("act", "action")), "actions: one action string is a prefix of the other (['act', 'action']); "
                                      "choose strings such as action1/action2"),
    (dict(opponent="nobody"), "opponent: unknown value 'nobody'; allowed: tft, always_cooperate, always_defect, random"),
    (dict(game="PD"), "game: unknown value 'PD' (did you mean 'IPD'?); allowed: IPD, ISH, ICN, BOS, ICD"),
    (dict(agents=[AgentConfig(name="alice"), AgentConfig(name="alice")]),
     "agents: names must be distinct; got ['alice', 'alice']"),
    (dict(episodes_per_iteration=0), "episodes_per_iteration: got 0; must be a number > 0"),
    (dict(rounds_per_episode=-1), "rounds_per_episode: got -1; must be a number > 0"),
    (dict(iterations_per_epoch=0), "iterations_per_epoch: got 0; must be a number > 0"),
    (dict(lora={"r": 0, "alpha": 8}), "lora.r: got 0; must be a whole number > 0"),
    (dict(lora={"r": 4, "alpha": -8}), "lora.alpha: got -8; must be a whole number > 0"),
    (dict(ppo={"minibatches": 0}), "ppo.minibatches: got 0; must be a number > 0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS, ids=[m.split(":")[0] + str(i)
                                                                 for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_is_rejected_before_any_model_loads(monkeypatch, kwargs, message):
    from lit_moral import models

    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(models, "load", boom)
    with pytest.raises(ConfigError) as e:
        tiny_module(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_prompts_longer_than_the_context_stop_before_training(tmp_path, tiny_dir):
    import json
    import shutil

    small = tmp_path / "short-context"
    shutil.copytree(tiny_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (small / "config.json").write_text(json.dumps(cfg))
    m = tiny_module(model=str(small))
    t = trainer(tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    with pytest.raises(ConfigError, match=r"model: prompts need \d+ tokens but '.*short-context' has a context of 16"):
        t.fit(m)
    assert m.iteration == 0 and t.global_step == 0 and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(("where", "key", "suggestion"), [
    ("flag", "model.episodes_per_iteraton", "model.episodes_per_iteration"),
    ("yaml", "model.episodes_per_iteraton", "model.episodes_per_iteration"),
    ("yaml", "trainer.max_epoch", "trainer.max_epochs"),
    ("yaml", "model.lora.rr", "model.lora.r"),
])
def test_unknown_key_names_it_and_suggests_the_closest(tmp_path, capsys, where, key, suggestion):
    from lit_moral.cli import cli_main

    args = ["fit", "--config", str(ROOT / "configs" / "debug.yaml")]
    if where == "flag":
        args += [f"--{key}", "3"]
    else:
        *parents, leaf = key.split(".")
        text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: 3\n"
        (tmp_path / "bad.yaml").write_text(text)
        args += ["--config", str(tmp_path / "bad.yaml")]
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: unknown key {key!r}; did you mean {suggestion!r}?\n"
