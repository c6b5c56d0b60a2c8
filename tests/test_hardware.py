"""bf16 on CPU: feature detection, the advice a run gets, and the shared trunk's equivalence in bf16."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lit_moral import hardware
from lit_moral.cli import cli_main
from lit_moral.games import MatrixGame
from lit_moral.policy import LoraSpec, Policy
from lit_moral.prompts import PromptRenderer
from tests.test_policy import _loss_and_grads

ROOT = Path(__file__).resolve().parents[1]


def test_cpuinfo_flags_read_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\nbugs\t: none\n")
    assert hardware._cpuinfo_flags(str(info)) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert hardware._cpuinfo_flags(str(tmp_path / "missing")) == set()


def test_features_are_booleans_for_both_units():
    feats = hardware.cpu_bf16_features()
    assert set(feats) == {"avx512_bf16", "amx_bf16"} and all(isinstance(v, bool) for v in feats.values())
    assert hardware.cpu_bf16_native() == any(feats.values())


@pytest.mark.parametrize("native", [False, True])
def test_bf16_advice_only_for_bf16_on_a_cpu_without_it(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: native)
    asks = [("bf16-mixed", "float32", True), ("bf16-true", "float32", True), (32, "bfloat16", True)]
    quiet = [(32, "float32", True), ("32-true", "float32", True), ("bf16-mixed", "float32", False),
             (None, "float32", True)]
    for precision, dtype, on_cpu in asks:
        said = hardware.bf16_advice(precision, dtype, on_cpu)
        assert (said is None) == native, (precision, dtype)
        if said:
            assert ("trainer.precision" in said if "bf16" in str(precision) else "model.dtype" in said)
            assert "slower than fp32" in said
    for precision, dtype, on_cpu in quiet:
        assert hardware.bf16_advice(precision, dtype, on_cpu) is None, (precision, dtype, on_cpu)


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_mixed_cpu_run_trains_and_says_whether_bf16_is_native(tmp_path, monkeypatch, capsys, native):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: native)
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.max_epochs", "1",
                    "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "cpu"])
    assert cli.model.iteration == 3  # the debug config's 3 iterations ran under bf16 autocast
    err = capsys.readouterr().err
    assert ("no native bf16" in err) != native


def _bf16_policy(tiny, dtype):
    model, tok = tiny
    pol = Policy(copy.deepcopy(model).to(dtype), ["agent_0", "agent_1"], LoraSpec(r=4, alpha=8, layers=1))
    g = torch.Generator().manual_seed(0)
    for n, p in pol.named_parameters():
        if "lora_B" in n or "value_heads" in n:
            p.data = (torch.randn(p.shape, generator=g) * 0.3).to(p.dtype)
    return pol, PromptRenderer(tok, MatrixGame.from_spec("IPD"))


@pytest.mark.parametrize("mode", ["constrained", "free"])
@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast"])
def test_shared_trunk_equals_the_all_layers_path_in_bf16(tiny, mode, how):
    """The trunk lever in bf16: the same ops in the same dtype, so the same tolerance as fp32 (1e-5). How far bf16
    is from fp32 on the real model is measured by benchmarks/bf16.py, not here (a random tiny model says nothing)."""
    pol, r = _bf16_policy(tiny, torch.bfloat16 if how == "bf16 weights" else torch.float32)
    pol.train()
    pol.activate("agent_0")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bf16 autocast"):
        fast = _loss_and_grads(pol, r, mode)
        assert pol.trunk.memo
        pol.trunk = None
        slow = _loss_and_grads(pol, r, mode)
    for k in ("logp", "values", "entropy"):
        torch.testing.assert_close(fast[0][k].float(), slow[0][k].float(), rtol=1e-5, atol=1e-5)
    rel = max(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)) for a, b in zip(fast[2], slow[2]))
    assert rel <= 1e-5, rel
