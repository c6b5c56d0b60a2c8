"""The format warm-up: balanced targets, its adapter in fit, in plain peft and in the evaluation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from lit_moral.cli import cli_main
from lit_moral.errors import ConfigError
from lit_moral.prompts import prompt_bits
from lit_moral.warmup import DEFAULT_PAIRS, FormatWarmup, balanced_batch

ROOT = Path(__file__).resolve().parents[1]
# The tiny tokenizer splits labels into more tokens than SmolLM2's 2: answers are 8 tokens long here.
TINY_WARMUP = ["--model.model", "tiny", "--model.pairs", "[[option1, option2], [choice3, choice7]]",
               "--model.max_new_tokens", "8", "--model.steps_per_epoch", "3", "--model.measure_every", "2",
               "--trainer.max_epochs", "1", "--model.lora.r", "4", "--model.lora.alpha", "8"]


def test_targets_are_balanced_in_every_state_and_option_order():
    rows = balanced_batch(400, len(DEFAULT_PAIRS), 5, torch.Generator().manual_seed(0))
    per_prompt = Counter((pair, game, pid, t) for pair, game, pid, t in rows)
    assert all(per_prompt[(*k[:3], 0)] == per_prompt[(*k[:3], 1)] for k in per_prompt)  # each prompt once per label ...
    targets = Counter((prompt_bits(pid), t) for _, _, pid, t in rows)
    for bits in {b for b, _ in targets}:  # ... so in every state and option order: 50/50 exactly
        assert targets[(bits, 0)] == targets[(bits, 1)] > 0
    assert len({b for b, _ in targets}) == 16


def test_pairs_never_include_the_training_or_evaluation_tokens():
    assert not {a for p in DEFAULT_PAIRS for a in p} & {"action1", "action2", "action3", "action4"}
    with pytest.raises(ConfigError, match="action1..action4"):
        FormatWarmup(model="tiny", pairs=[("action3", "action4")])


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("warmup")
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli = cli_main(["warmup", "--config", str(ROOT / "configs" / "warmup_format.yaml"), *TINY_WARMUP])
    finally:
        os.chdir(cwd)
    return cli, root / cli.trainer.log_dir


def test_warmup_runs_logs_and_exports_an_adapter(warmup_run):
    from tests.helpers import scalars

    cli, run = warmup_run
    adapter = run / "adapters" / "agent_0"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    tags = scalars(run)
    assert "warmup/loss" in tags and "warmup/illegal_rate/action3-action4" in tags
    assert {f"warmup/p_c/{s}/action1-action2" for s in ("CC", "CD", "DC", "DD")} <= set(tags)
    m = cli.model.last_measure
    assert 0 <= m["warmup/illegal_rate/action1-action2"] <= 1 and 0 < m["warmup/legal_mass/action3-action4"] < 1


def test_the_adapter_loads_into_plain_peft(warmup_run, tiny_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, run = warmup_run
    adapter = run / "adapters" / "agent_0"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) and any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)


@pytest.mark.parametrize("source", ["folder", "checkpoint"])
def test_fit_starts_from_the_adapter_with_the_base_as_reference(warmup_run, source):
    from safetensors.torch import load_file

    from lit_moral.policy import BASE
    from tests.helpers import tiny_module

    _, run = warmup_run
    path = run / "adapters" / "agent_0" if source == "folder" else run / "checkpoints" / "last.ckpt"
    m = tiny_module(init_adapter=str(path), action_mode="free", max_new_tokens=8)
    m.configure_model()
    saved = load_file(str(run / "adapters" / "agent_0" / "adapter_model.safetensors"))
    for agent in m.agent_names:  # every LoRA tensor of every agent starts as the saved one
        own = {n.replace(f".{agent}.", "."): p for n, p in m.policy.model.named_parameters()
               if "lora_" in n and f".{agent}." in n}
        assert own.keys() == saved.keys()
        for k, v in saved.items():
            torch.testing.assert_close(own[k], v)
    # The reference (BASE) is the adapter-disabled base: it differs from the started policy.
    r = m.renderer
    with torch.no_grad():
        m.policy.eval()
        out = m.policy.candidate_logprobs([("agent_0", r.token_ids[0]), (BASE, r.token_ids[0])], r.action_ids)
        ids = torch.tensor([r.token_ids[0] + r.action_ids[0]])
        with m.policy.model.disable_adapter():
            logits = m.policy.model(input_ids=ids).logits[0].float()
    n = len(r.token_ids[0])
    want = torch.log_softmax(logits[n - 1:n - 1 + len(r.action_ids[0])], -1).gather(
        -1, torch.tensor(r.action_ids[0])[:, None]).sum()
    torch.testing.assert_close(out["seq_logp"][1, 0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["seq_logp"][0], out["seq_logp"][1])


def test_mismatched_lora_is_refused_before_loading(warmup_run):
    from tests.helpers import tiny_module

    _, run = warmup_run
    with pytest.raises(ConfigError, match=r"init_adapter: the adapter has lora.r = 4, the run has lora.r = 8"):
        tiny_module(init_adapter=str(run / "adapters" / "agent_0"), lora={"r": 8, "alpha": 8})
    with pytest.raises(ConfigError, match="init_adapter: .* does not exist"):
        tiny_module(init_adapter="/nonexistent/adapter")


def test_evaluation_shows_the_warmup_row(warmup_run):
    from lit_moral.evaluation import EvalConfig, evaluate
    from tests.helpers import tiny_module

    _, run = warmup_run
    m = tiny_module(init_adapter=str(run / "adapters" / "agent_0"), action_mode="free", max_new_tokens=8)
    m.configure_model()
    rows = evaluate(m, EvalConfig(episodes=2, rounds=2, games=["IPD"], opponents=["random"], variants=["new_tokens"]))
    assert {r["model"] for r in rows} == {"agent_0", "warmup", "base"}
    assert "warmup" not in " ".join(m.state_dict())  # the frozen evaluation adapter is never checkpointed
