"""The real CLI: every config parses, the debug config trains, checkpoints save, export and resume."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_moral.cli import cli_main
from tests.helpers import scalars

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
REQUIRED_KEYS = [
    "loss/policy/agent_0", "loss/value/agent_0", "policy/kl/agent_0", "policy/kl_coef/agent_0",
    "policy/clipfrac/agent_0", "policy/approx_kl/agent_0", "value/explained_variance/agent_0",
    "reward/total/agent_0", "reward/deontological/agent_0", "reward/game/agent_0", "reward/utilitarian/agent_0",
    "game/coop_rate/agent_0", "game/illegal_rate/agent_0", "game/format_mass/agent_0",
    "actions/C|C/agent_0", "actions/C|D/agent_0", "actions/D|C/agent_0", "actions/D|D/agent_0",
    "actions/illegal|C/agent_0", "moral/regret_deontological/agent_0", "moral/regret_utilitarian/agent_0",
    "perf/moves_per_s",
]


COMMANDS = {  # configs of a command other than fit / test
    "warmup_format.yaml": "warmup",
    "dpo_deontological.yaml": "dpo", "dpo_deontological_noisy.yaml": "dpo", "dpo_utilitarian.yaml": "dpo",
    "dpo_game.yaml": "dpo", "dpo_game_deontological.yaml": "dpo",
    "reward_model_deontological.yaml": "reward-model", "reward_model_utilitarian.yaml": "reward-model",
}


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).name for c in CONFIGS])
def test_every_config_parses_through_the_cli(config):
    command = COMMANDS.get(Path(config).name)
    cli = cli_main([command, "--config", config] if command else ["--config", config], run=False)
    if command is None:
        assert cli.model.hparams.episodes_per_iteration > 0
    assert cli.trainer.max_epochs >= 1


def _fit_debug(tmp_path, *extra):
    os.chdir(tmp_path)
    cli_main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), *extra])
    return tmp_path / "checkpoints" / "debug"


def test_debug_config_trains_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _fit_debug(tmp_path)
    tags = scalars(run)
    missing = [k for k in REQUIRED_KEYS if k not in tags]
    assert not missing, missing
    # x-axis is episodes: 16 per iteration, 3 iterations per epoch, 2 epochs
    assert [s for s, _ in tags["game/coop_rate/agent_0"]] == [16 * i for i in range(1, 7)]
    assert (run / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_seed_everything_drives_the_games(tmp_path, monkeypatch):
    """One seed drives every stream: runs that differ only in --seed_everything play different games (before,
    model.seed alone seeded states, orders, sampling and opponents, so they were identical)."""
    monkeypatch.chdir(tmp_path)
    debug = str(ROOT / "configs" / "debug.yaml")
    runs = {}
    for seed in (0, 0, 1):
        cli = cli_main(["fit", "--config", debug, "--trainer.max_epochs", "1", "--seed_everything", str(seed),
                        "--model.iterations_per_epoch", "1"])
        s = cli.model.last_samples["agent_0"]
        assert cli.model.hparams.seed == seed
        runs.setdefault(seed, []).append((s.prev_me.tolist(), s.prev_other.tolist(), s.pid.tolist()))
    assert runs[0][0] == runs[0][1]
    assert runs[0][0] != runs[1][0]


def test_model_seed_alone_is_refused_with_a_pointer_to_seed_everything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
                           "--model.seed", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "model.seed: set from seed_everything" in proc.stderr.strip().splitlines()[-1]


def test_checkpoint_holds_only_trainable_state_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _fit_debug(tmp_path, "--trainer.max_epochs", "1")
    ckpt = run / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    keys = list(state["state_dict"])
    assert keys and all("lora_" in k or "value_heads" in k for k in keys)
    assert state["lit_moral"]["episode"] == 48
    # Resume for one more epoch: the counter continues and the saved weights were loaded.
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.max_epochs", "2",
                    "--ckpt_path", str(ckpt)])
    assert cli.model.episode == 96
    # Reload into a fresh module: weights equal the checkpoint.
    fresh = cli_main(["--config", str(ROOT / "configs" / "debug.yaml")], run=False).model
    fresh.configure_model()
    fresh.load_state_dict(state["state_dict"], strict=False)
    for k, v in state["state_dict"].items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_adapters_exported_in_peft_format(tmp_path, monkeypatch, tiny):
    from peft import PeftModel

    from lit_moral import models

    monkeypatch.chdir(tmp_path)
    run = _fit_debug(tmp_path, "--trainer.max_epochs", "1")
    path = run / "version_0" / "adapters" / "agent_0"
    assert (path / "adapter_config.json").is_file()
    state = torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    base, tok = models.load("tiny")
    peft_model = PeftModel.from_pretrained(base, str(path))
    lora = {k: v for k, v in peft_model.named_parameters() if "lora_" in k}
    assert lora
    for k, v in lora.items():
        saved = [s for n, s in state.items() if n.endswith(k.replace(".default.", ".agent_0."))]
        assert len(saved) == 1, k
        torch.testing.assert_close(v, saved[0])


def test_bad_config_gives_one_line_error_and_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
                           "--model.opponent", "grim"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "opponent" in proc.stderr and "tft" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------- the user's path (issue: first command to last figure)


def test_fit_prints_a_summary_with_every_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _fit_debug(tmp_path, "--trainer.max_epochs", "1")
    out = capsys.readouterr().out
    run = Path("checkpoints") / "debug" / "version_0"
    assert "lit_moral: fit finished in" in out and "48 episodes" in out
    assert "agent_0" in out and "cooperation" in out and "D|C" in out
    for line in (f"checkpoint   {run / 'checkpoints' / 'last.ckpt'}", f"adapter      {run / 'adapters' / 'agent_0'}",
                 f"tensorboard  {run}", f"config       {run / 'config.yaml'}"):
        assert line in out, line
    assert f"python -m lit_moral test --config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints' / 'last.ckpt'}" in out
    assert "python -m lit_moral play --ckpt" in out


def test_resume_continues_in_the_runs_own_folder_and_accepts_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _fit_debug(tmp_path, "--trainer.max_epochs", "1")
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.max_epochs", "2",
                    "--ckpt_path", "last"])
    assert cli.model.episode == 96
    assert sorted(p.name for p in run.iterdir()) == ["version_0"]  # one run, one folder
    tags = scalars(run / "version_0")
    assert [s for s, _ in tags["game/coop_rate/agent_0"]] == [16 * i for i in range(1, 7)]


def test_abbreviated_keys_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
                           "--trainer.max_epoch", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_only_fit_and_test_are_offered():
    proc = subprocess.run([sys.executable, "-m", "lit_moral", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: python -m lit_moral" in proc.stdout
    assert "{fit,test}" in proc.stdout and "validate" not in proc.stdout and "predict" not in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model.opponent", "tit_for_tat"], "opponent: unknown value 'tit_for_tat' (did you mean 'tft'?)"),
    (["--model.opponent", "randm"], "opponent: unknown value 'randm' (did you mean 'random'?)"),
    (["--trainer.callbacks+=lit_moral.callbacks.OpponentSchedule", "--trainer.callbacks.schedule", "[[0, tit_for_tat]]"],
     "OpponentSchedule.schedule: unknown value 'tit_for_tat' (did you mean 'tft'?)"),
])
def test_misspelt_choices_get_a_did_you_mean(tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
                           *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]


def test_an_early_failure_leaves_no_folder(tmp_path):
    """A hub id that is not in the local cache fails at once (no download retries) and leaves no version folder."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "lit_moral", "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
                           "--model.model", "nobody/no-such-model"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model: could not load 'nobody/no-such-model'")
    assert not list(tmp_path.glob("checkpoints/*/version_*"))


def test_a_new_fit_into_a_folder_holding_a_run_is_refused_and_touches_nothing(tmp_path, monkeypatch):
    """An explicit logger version naming a folder with checkpoints would overwrite that run's config.yaml."""
    from lit_moral.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "checkpoints" / "debug" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")
    (run / "config.yaml").write_text("an earlier run's config\n")
    args = ["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.logger.init_args.version", "run"]
    with pytest.raises(ConfigError, match=r"trainer.logger.init_args.version: run folder '.*run' already holds a run "
                                          r"\(1 checkpoint\(s\)\); resume it with --ckpt_path .*last.ckpt"):
        cli_main(args)
    assert (run / "config.yaml").read_text() == "an earlier run's config\n"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "config.yaml", "last.ckpt"]
    (run / "checkpoints" / "last.ckpt").unlink()  # a folder without checkpoints (e.g. a failed start) is reused
    cli = cli_main([*args, "--trainer.max_epochs", "1"])
    assert (run / "checkpoints" / "last.ckpt").is_file() and cli.model.episode > 0
