"""Using a trained agent: the Python API, the terminal game, and the exported adapter folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lit_moral.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli_main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.max_epochs", "1"])
    finally:
        os.chdir(cwd)
    return root / "checkpoints" / "debug" / "version_0"


def test_agent_api_from_checkpoint_and_folder_agree_with_the_training_policy(debug_run):
    from lit_moral.agent import Agent
    from lit_moral.evaluation import load_weights
    from tests.helpers import tiny_module

    ckpt = debug_run / "checkpoints" / "last.ckpt"
    a, b = Agent.load(str(ckpt)), Agent.load(str(debug_run / "adapters" / "agent_0"))
    m = tiny_module(lora={"r": 4, "alpha": 8})
    m.configure_model()
    load_weights(m, str(ckpt))
    m.policy.eval()
    r = m.renderer
    for prev_me, prev_other in (("C", "C"), ("C", "D"), ("D", "C"), ("D", "D")):
        pa, pb = a.probabilities(prev_me, prev_other), b.probabilities(prev_me, prev_other)
        assert pa == pytest.approx(pb, abs=1e-6) and pa["C"] + pa["D"] == pytest.approx(1.0)
        bits = ("C", "D").index(prev_me) * 8 + ("C", "D").index(prev_other) * 4
        with torch.no_grad():
            seq = m.policy.candidate_logprobs([("agent_0", r.token_ids[bits + o]) for o in range(4)],
                                              r.action_ids)["seq_logp"]
        assert pa["C"] == pytest.approx(float(torch.softmax(seq, -1)[:, 0].mean()), abs=1e-5)
        assert a.move(prev_me, prev_other) == ("C" if pa["C"] >= pa["D"] else "D")
    assert "In the last round you chose action2 and A chose action1" in a.prompt("D", "C")


def test_play_against_scripted_input(debug_run):
    from lit_moral.agent import Agent
    from lit_moral.play import play

    agent = Agent.load(str(debug_run / "checkpoints" / "last.ckpt"))
    answers, said = iter(["C", "x", "D", "q"]), []
    totals = play(agent, rounds=5, ask=lambda _: next(answers), say=said.append)
    rounds = [s for s in said if s.startswith("round ")]
    moves = [s for s in said if s.startswith("  agent plays")]
    assert len(rounds) == 3 and len(moves) == 2  # two moves, then "x" re-asked, then q stops in round 3
    assert "you play C" in moves[0] and "you play D" in moves[1] and "P(C)" in rounds[0]
    pay = {("C", "C"): (3, 3), ("C", "D"): (0, 4), ("D", "C"): (4, 0), ("D", "D"): (1, 1)}
    got = [(m.split("agent plays ")[1][0], m.split("you play ")[1][0]) for m in moves]
    assert totals == {"agent": sum(pay[g][0] for g in got), "other": sum(pay[g][1] for g in got)}
    # watching against a fixed strategy needs no input; TFT copies the agent's previous move from round 2 on
    said = []
    play(agent, rounds=4, opponent="tft", ask=None, say=said.append)
    moves = [s for s in said if s.startswith("  agent plays")]
    agent_moves = [m.split("agent plays ")[1][0] for m in moves]
    tft_moves = [m.split("tft plays ")[1][0] for m in moves]
    assert len(moves) == 4 and tft_moves[1:] == agent_moves[:-1]


def test_exported_folder_has_a_model_card_and_a_portable_base_name(debug_run):
    folder = debug_run / "adapters" / "agent_0"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "lit_moral:tiny"  # not this machine's cache path
    card = (folder / "README.md").read_text()
    assert "More Information Needed" not in card
    for needle in ("| reward | deontological |", "| opponent | tft |", "| episodes | 48 |", "## Last logged metrics",
                   "`game/coop_rate/agent_0`", "Agent.load(", "python -m lit_moral play --ckpt",
                   "PeftModel.from_pretrained"):
        assert needle in card, needle


def test_portable_names():
    from lit_moral.models import portable_name

    assert portable_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("gemma-3-270m") == "google/gemma-3-270m"
    assert portable_name("google/gemma-2-2b-it") == "google/gemma-2-2b-it"
    assert portable_name("tiny") == "lit_moral:tiny"


def test_play_command_through_the_cli(debug_run):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lit_moral", "play", "--ckpt", str(debug_run / "checkpoints" / "last.ckpt"),
                           "--rounds", "2", "--opponent", "always_defect"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.count("always_defect plays D") == 2
    bad = subprocess.run([sys.executable, "-m", "lit_moral", "play", "--ckpt", str(debug_run), "--rounds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has no lit_moral.json" in bad.stderr
