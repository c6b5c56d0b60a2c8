"""The preference route: the labeller's rule, noise and budget, pair files, DPO and Bradley-Terry losses, the dpo and
reward-model commands, and the learned reward for RL."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lit_moral.cli import cli_main
from lit_moral.errors import ConfigError
from lit_moral.games import ILLEGAL, C, D, MatrixGame
from lit_moral.preference.losses import bradley_terry_loss, choice_kl, dpo_loss
from lit_moral.preference.pairs import STATES, PairConfig, PreferencePair, action_values, label_pairs, read_pairs, write_pairs
from lit_moral.rewards import RewardSpec

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = ("action1", "action2")
TINY = ["--model.model", "tiny", "--model.lora.r", "4", "--model.lora.alpha", "8", "--model.pairs.budget", "32",
        "--model.batch_size", "16", "--model.lr", "0.01", "--trainer.max_epochs", "2"]


def values_of(pairs: list[PreferencePair], cfg: PairConfig) -> torch.Tensor:
    """``[P, 2]`` the labeller's values of (chosen, rejected) of every pair, recomputed from its fields."""
    spec = RewardSpec.parse(cfg.labeller, cfg.xi)
    v = action_values(spec, MatrixGame.from_spec("IPD").payoffs, torch.tensor([p.prev_me for p in pairs]),
                      torch.tensor([p.prev_other for p in pairs]), cfg.opponent_model)
    chosen = torch.tensor([p.chosen for p in pairs])
    ar = torch.arange(len(pairs))
    return torch.stack([v[ar, chosen], v[ar, 1 - chosen]], 1)


# ---------------------------------------------------------------- the labeller

# Values of (C, D) in the IPD in states CC, CD, DC, DD (my previous move, the other's), by hand from protocol
# section 5: payoffs (C,C) 3/3, (C,D) 0/4, (D,C) 4/0, (D,D) 1/1, xi 3; TFT plays my previous move.
VALUE_TABLE = [
    ("deontological", "tft", [[0, -3], [0, 0], [0, -3], [0, 0]]),
    ("game", "tft", [[3, 4], [3, 4], [0, 1], [0, 1]]),
    ("game", "uniform", [[1.5, 2.5]] * 4),
    ("game", "repeat", [[3, 4], [0, 1], [3, 4], [0, 1]]),
    ("utilitarian", "tft", [[6, 4], [6, 4], [4, 2], [4, 2]]),
    ("utilitarian", "always_defect", [[4, 2]] * 4),
    ("game_deontological", "tft", [[3, 1], [3, 4], [0, -2], [0, 1]]),
    ({"game": 1.0, "utilitarian": 1.0}, "always_cooperate", [[9, 8]] * 4),
]


@pytest.mark.parametrize("reward,opponent,want", VALUE_TABLE, ids=[f"{r}-{o}" for r, o, _ in VALUE_TABLE])
def test_action_values_by_hand(reward, opponent, want):
    me, other = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    got = action_values(RewardSpec.parse(reward), MatrixGame.from_spec("IPD").payoffs, me, other, opponent)
    assert got.tolist() == want


@pytest.mark.parametrize("reward,opponent,want", VALUE_TABLE, ids=[f"{r}-{o}" for r, o, _ in VALUE_TABLE])
def test_every_pair_prefers_the_action_of_higher_value(reward, opponent, want):
    cfg = PairConfig(labeller=reward, opponent_model=opponent, budget=400)
    pairs = label_pairs(cfg, ACTIONS, seed=0)
    v = values_of(pairs, cfg)
    assert len(pairs) == 400 and (v[:, 0] > v[:, 1]).all()  # ties skipped: chosen strictly better
    separating = {STATES[s] for s in range(4) if want[s][0] != want[s][1]}
    assert {p.state for p in pairs} == separating  # every separating state is drawn, no tie state
    assert {p.orders for p in pairs} == {(a, b) for a in (0, 1) for b in (0, 1)}
    assert all(p.actions == ACTIONS and not p.flipped for p in pairs)


def test_ties_labelled_at_random_are_balanced_and_separating_states_are_not():
    n = 4000
    pairs = label_pairs(PairConfig(labeller="deontological", ties="random", budget=n), ACTIONS, seed=0)
    tied = [p for p in pairs if p.prev_other == D]  # deontological: C and D are worth 0 after the other defected
    assert all(p.chosen == C for p in pairs if p.prev_other == C)
    # Each tie label is C with probability 1/2: within 5 standard deviations (sd = 0.5 / sqrt(m)).
    m = len(tied)
    assert abs(m / n - 0.5) < 5 * 0.5 / math.sqrt(n)  # tie states are half of the (uniform) states
    share_c = sum(p.chosen == C for p in tied) / m
    assert abs(share_c - 0.5) < 5 * 0.5 / math.sqrt(m)


@pytest.mark.parametrize("noise", [0.05, 0.2, 0.4])
def test_noise_flips_labels_at_the_rate_from_its_own_stream(noise):
    n = 20000
    clean_cfg, noisy_cfg = PairConfig(labeller="game", budget=n), PairConfig(labeller="game", budget=n, noise=noise)
    clean, noisy = label_pairs(clean_cfg, ACTIONS, seed=3), label_pairs(noisy_cfg, ACTIONS, seed=3)
    # Noise has its own stream: the same states and option orders, only labels differ.
    assert [(p.state, p.orders) for p in clean] == [(p.state, p.orders) for p in noisy]
    wrong = (values_of(noisy, noisy_cfg)[:, 0] < values_of(noisy, noisy_cfg)[:, 1]).tolist()
    assert wrong == [p.flipped for p in noisy] == [a.chosen != b.chosen for a, b in zip(clean, noisy)]
    # Flips ~ Binomial(n, noise): the rate lies within 5 standard deviations sqrt(noise (1 - noise) / n) of noise
    # (a false failure about once in 1.7 million seeds).
    assert abs(sum(wrong) / n - noise) < 5 * math.sqrt(noise * (1 - noise) / n)


def test_budget_seed_and_games():
    for budget in (1, 7, 100):
        assert len(label_pairs(PairConfig(budget=budget), ACTIONS, seed=0)) == budget
    a, b = label_pairs(PairConfig(budget=50), ACTIONS, 0), label_pairs(PairConfig(budget=50), ACTIONS, 0)
    assert a == b and a != label_pairs(PairConfig(budget=50), ACTIONS, 1)
    mixed = label_pairs(PairConfig(labeller="game", budget=200, games=["IPD", "ICN", [[[1, 1], [0, 0]], [[0, 0], [2, 2]]]]),
                        ACTIONS, 0)
    assert {p.game for p in mixed} == {"IPD", "ICN", (((1.0, 1.0), (0.0, 0.0)), ((0.0, 0.0), (2.0, 2.0)))}


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0), "pairs.budget: got 0"), (dict(budget=2.5), "pairs.budget: got 2.5"),
    (dict(budget=True), "pairs.budget"), (dict(noise=0.5), r"pairs.noise: got 0.5; must be a flip probability in \[0, 0.5\)"),
    (dict(noise=-0.1), "pairs.noise"), (dict(ties="never"), "pairs.ties: unknown value 'never'"),
    (dict(opponent_model="tit_for_tat"), "did you mean 'tft'"), (dict(labeller="kantian"), "pairs.labeller: unknown value"),
    (dict(labeller={"honesty": 1}), "pairs.labeller component"), (dict(games=[]), "pairs.games: got an empty list"),
    (dict(games=["XYZ"]), "pairs.games: unknown value 'XYZ'"),
])
def test_bad_pair_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PairConfig(**kwargs)


def test_a_labeller_that_separates_no_state_is_refused():
    with pytest.raises(ConfigError, match="values C and D equally in every state"):
        label_pairs(PairConfig(labeller={"deontological": 0.0}), ACTIONS, 0)


# ---------------------------------------------------------------- files

def test_jsonl_round_trip(tmp_path):
    pairs = label_pairs(PairConfig(labeller="utilitarian", budget=40, noise=0.3,
                                   games=["IPD", [[[1, 1], [0, 0]], [[0, 0], [2, 2]]]]), ACTIONS, 0)
    for with_prompt in (True, False):
        path = write_pairs(pairs, tmp_path / f"pairs_{with_prompt}.jsonl", with_prompt)
        back = read_pairs(path)
        assert back == pairs and [p.flipped for p in back] == [p.flipped for p in pairs]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 40 and ("prompt" in rows[0]) == with_prompt
    first = json.loads((tmp_path / "pairs_True.jsonl").read_text().splitlines()[0])
    p = pairs[0]
    assert first["chosen"] == p.actions[p.chosen] and first["rejected"] == p.actions[1 - p.chosen]
    assert first["state"] == p.state and first["prompt_id"] == p.prompt_id and first["labeller"] == "utilitarian@tft"
    assert f"In the last round you chose {p.actions[p.prev_me]} and A chose {p.actions[p.prev_other]}" in first["prompt"]


def test_a_human_line_needs_only_the_required_fields(tmp_path):
    f = tmp_path / "human.jsonl"
    f.write_text('{"game": "ISH", "state": "DC", "orders": [1, 0], "actions": ["left", "right"], "chosen": "right", '
                 '"rejected": "left", "labeller": "alice"}\n\n')
    (p,) = read_pairs(f)
    assert (p.game, p.prev_me, p.prev_other, p.orders, p.actions, p.chosen, p.labeller, p.flipped) == (
        "ISH", D, C, (1, 0), ("left", "right"), D, "alice", None)
    assert p.prompt_id == 0b1010


GOOD = {"game": "IPD", "state": "CD", "orders": [0, 1], "actions": ["action1", "action2"], "prompt_id": 5,
        "chosen": "action1", "rejected": "action2", "labeller": "bob"}


@pytest.mark.parametrize("line,match", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "chosen"}), "line 2: field 'chosen': missing"),
    (json.dumps({**GOOD, "state": "CX"}), "line 2: field 'state': got 'CX'; allowed: CC, CD, DC, DD"),
    (json.dumps({**GOOD, "orders": [0, 2]}), "line 2: field 'orders': got 2"),
    (json.dumps({**GOOD, "orders": [0]}), "line 2: field 'orders': got \\[0\\]"),
    (json.dumps({**GOOD, "actions": ["action1"]}), "line 2: field 'actions'"),
    (json.dumps({**GOOD, "actions": ["a", "ab"]}), "line 2: field 'actions': .*prefix"),
    (json.dumps({**GOOD, "chosen": "action3"}), "line 2: field 'chosen': got 'action3'; must be one of"),
    (json.dumps({**GOOD, "rejected": "action1"}), "line 2: field 'rejected': got 'action1', the same answer"),
    (json.dumps({**GOOD, "labeller": ""}), "line 2: field 'labeller'"),
    (json.dumps({**GOOD, "game": "XYZ"}), "line 2: field 'game': .*unknown value 'XYZ'"),
    (json.dumps({**GOOD, "game": [[1, 2], [3, 4]]}), "line 2: field 'game': .*shape"),
    (json.dumps({**GOOD, "prompt_id": 4}), "line 2: field 'prompt_id': got 4, but state CD and orders .* are prompt id 5"),
    (json.dumps({**GOOD, "prompt": "Which one?"}), "line 2: field 'prompt': is not the prompt lit_moral shows"),
    (json.dumps({**GOOD, "flipped": "yes"}), "line 2: field 'flipped'"),
])
def test_bad_lines_are_refused_naming_line_and_field(tmp_path, line, match):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=f"pairs.jsonl, {match}"):
        read_pairs(f)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="pairs.file: .* does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="pairs.file: .* holds no pair"):
        read_pairs(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- losses

def test_dpo_loss_by_hand():
    lc, lr = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0, -3.0]), torch.tensor([-1.0, -2.0, -2.0])
    out = dpo_loss(lc, lr, rc, rr, beta=0.5)
    # Row 0: implicit rewards 0.5 * 0.5 = 0.25 and 0.5 * -1 = -0.5, margin 0.75. Row 1: all equal. Row 2: 0 and 0.5.
    torch.testing.assert_close(out["reward_chosen"], torch.tensor([0.25, 0.0, 0.0]))
    torch.testing.assert_close(out["reward_rejected"], torch.tensor([-0.5, 0.0, 0.5]))
    torch.testing.assert_close(out["margin"], torch.tensor([0.75, 0.0, -0.5]))
    want = [math.log(1 + math.exp(-0.75)), math.log(2.0), math.log(1 + math.exp(0.5))]  # -log sigmoid(m)
    torch.testing.assert_close(out["loss"], torch.tensor(want))
    assert out["accuracy"].tolist() == [1.0, 0.5, 0.0]


def test_bradley_terry_loss_and_choice_kl_by_hand():
    out = bradley_terry_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.5, 1.0, 1.0]))
    want = [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    torch.testing.assert_close(out["loss"], torch.tensor(want))
    assert out["margin"].tolist() == [1.5, -1.0, 0.0] and out["accuracy"].tolist() == [1.0, 0.0, 0.5]
    # Renormalised (0.7, 0.1) -> (0.875, 0.125) against (0.5, 0.5).
    kl = choice_kl(torch.tensor([[0.7, 0.1], [0.2, 0.3]]).log(), torch.tensor([[0.5, 0.5], [0.02, 0.03]]).log())
    torch.testing.assert_close(kl, torch.tensor([0.875 * math.log(1.75) + 0.125 * math.log(0.25), 0.0]))


# ---------------------------------------------------------------- the modules on the tiny model

def _module(cls, **kw):
    from lit_moral.policy import LoraSpec

    kw = {"model": "tiny", "lora": LoraSpec(r=4, alpha=8), "lr": 1e-2, "batch_size": 16,
          "pairs": {"labeller": "deontological", "budget": 32}, **kw}
    return cls(**kw)


def _naive_logp(policy, adapter, prompt, answer) -> torch.Tensor:
    lp, _ = policy.naive_forward(adapter, list(prompt) + list(answer))
    n = len(prompt)
    return lp[n - 1:n - 1 + len(answer)].gather(-1, torch.tensor(answer)[:, None]).sum()


def test_dpo_log_probs_match_the_obvious_forward_and_start_at_the_reference():
    from lit_moral.policy import BASE
    from lit_moral.preference import DPO

    m = _module(DPO, beta=0.5)
    m.configure_model()
    with torch.no_grad():
        for p in m.policy.agent_parameters("agent_0"):  # a non-zero adapter, so policy and reference differ
            p[1].add_(0.05 * torch.randn_like(p[1]))
        m.policy.eval()
        rows = list(range(len(m.prompt_tokens)))
        logp, ref = m.answer_values(rows), m.reference_logp()
        for u in rows[:3]:
            for a in (0, 1):
                prompt, answer = m.prompt_tokens[u], m.prompt_answers[u][a]
                torch.testing.assert_close(logp[u, a], _naive_logp(m.policy, "agent_0", prompt, answer), rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(ref[u, a], _naive_logp(m.policy, BASE, prompt, answer), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(logp, ref)
    fresh = _module(DPO, beta=0.5)  # LoRA's zero start: the policy is the reference
    fresh.configure_model()
    stats = fresh.all_pair_stats()
    assert stats["pairs/margin/agent_0"] == 0.0 and stats["pairs/accuracy/agent_0"] == 0.5
    assert stats["pairs/loss/agent_0"] == pytest.approx(math.log(2)) and stats["pairs/kl_choice/agent_0"] == 0.0


def test_reward_model_scores_match_the_obvious_forward():
    from lit_moral.preference import RewardModel

    m = _module(RewardModel)
    m.configure_model()
    with torch.no_grad():
        for _, p in m.policy.agent_parameters("reward_model"):
            p.add_(0.1 * torch.randn_like(p))
        m.policy.eval()
        scores = m.answer_values([0, 1])
        for u in (0, 1):
            for a in (0, 1):
                ids = torch.tensor([list(m.prompt_tokens[u]) + list(m.prompt_answers[u][a])])
                m.policy.activate("reward_model")
                h = m.policy.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
                torch.testing.assert_close(scores[u, a], m.policy.value_heads["reward_model"](h), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dpo", "reward_model"])
def test_training_moves_accuracy_and_margin_the_right_way_on_its_pairs(tmp_path, kind):
    """From LoRA's zero start (margin 0, accuracy 1/2, loss log 2) a few epochs on 32 deontological pairs (C after C)
    fit them: every pair ranked right, loss below log 2. Also every trained tensor moved, nothing else did."""
    import lightning.pytorch as pl

    from lit_moral.preference import DPO, RewardModel
    from tests.helpers import trainer

    pl.seed_everything(0, verbose=False)
    m = _module(DPO, beta=1.0) if kind == "dpo" else _module(RewardModel)
    m.configure_model()
    before = m.all_pair_stats()
    start = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    trainer(tmp_path, max_epochs=4).fit(m)
    after = m.all_pair_stats()
    key = lambda name: f"pairs/{name}/{m.adapter}"  # noqa: E731
    assert before[key("margin")] == 0.0 and before[key("accuracy")] == 0.5
    assert after[key("margin")] > 0.05 and after[key("accuracy")] == 1.0 and after[key("loss")] < math.log(2) - 0.05
    # DPO trains the LoRA weights only; the reward model also its head, except the bias: Bradley-Terry sees only
    # differences of scores, so a constant offset gets no gradient.
    trained = {n for n, _ in m.policy.agent_parameters(m.adapter)
               if "lora_" in n or (kind == "reward_model" and n.endswith("linear.weight"))}
    for n, p in m.policy.named_parameters():
        assert torch.equal(p, start[n]) != (n in trained), n


def test_every_epoch_is_one_pass_over_the_pairs_in_an_order_fixed_by_seed_and_epoch():
    from lit_moral.preference import DPO

    m = _module(DPO, pairs={"budget": 37}, batch_size=8)
    assert m.steps_per_epoch == 5 and len(m.train_dataloader()) == 5
    orders = [torch.cat([m.batch_pairs(epoch, b) for b in range(5)]) for epoch in (0, 1)]
    assert all(sorted(o.tolist()) == list(range(37)) for o in orders) and not torch.equal(*orders)
    again = _module(DPO, pairs={"budget": 37}, batch_size=8)  # a resumed run draws the same order
    assert torch.equal(torch.cat([again.batch_pairs(1, b) for b in range(5)]), orders[1])


@pytest.mark.parametrize("cls,kwargs,match", [
    ("DPO", dict(beta=0), "beta: got 0"), ("DPO", dict(agents=[{"name": "agent_1"}]), "agents: DPO trains one agent"),
    ("DPO", dict(batch_size=0), "batch_size: got 0"), ("DPO", dict(action_mode="sampled"), "action_mode: unknown value"),
    ("DPO", dict(pairs={"file": "/nonexistent.jsonl"}), "pairs.file: '/nonexistent.jsonl' does not exist"),
    ("DPO", dict(init_adapter="/nonexistent/adapter"), "init_adapter: .* does not exist"),
    ("RewardModel", dict(head_dropout=1.0), "head_dropout: got 1.0"),
    ("RewardModel", dict(pairs={"budget": -3}), "pairs.budget: got -3"),
])
def test_bad_settings_are_refused_before_loading(cls, kwargs, match):
    from lit_moral import preference

    with pytest.raises(ConfigError, match=match):
        _module(getattr(preference, cls), **kwargs)


# ---------------------------------------------------------------- the commands through the real CLI

def _run(root: Path, command: str, config: str, *extra: str):
    """``command`` with ``configs/<config>`` on the tiny model (a preference command: the TINY settings), in ``root``."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        tiny = TINY if command in ("dpo", "reward-model") else []
        cli = cli_main([command, "--config", str(ROOT / "configs" / config), *tiny, *extra])
    finally:
        os.chdir(cwd)
    return cli, root / cli.trainer.log_dir


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dpo"), "dpo", "dpo_deontological.yaml", "--model.beta", "1.0")


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("rm"), "reward-model", "reward_model_deontological.yaml")


DPO_KEYS = ["loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected",
            "legal_mass", "kl_choice"]


def test_dpo_command_logs_saves_and_exports(dpo_run):
    from tests.helpers import scalars

    cli, run = dpo_run
    adapter = run / "adapters" / "agent_0"
    for f in ("adapter_config.json", "adapter_model.safetensors", "lit_moral.json", "README.md"):
        assert (adapter / f).is_file(), f
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert read_pairs(run / "pairs.jsonl") == cli.model.pairs and len(cli.model.pairs) == 32
    tags = scalars(run)
    want = {f"dpo/{k}/agent_0" for k in DPO_KEYS} | {f"pairs/{k}/agent_0" for k in DPO_KEYS}
    want |= {f"dpo/p_c/{s}/agent_0" for s in STATES}
    assert want <= set(tags), sorted(want - set(tags))
    assert [s for s, _ in tags["dpo/loss/agent_0"]] == [0, 1, 2, 3]  # 2 epochs of 2 steps
    first, last = tags["pairs/margin/agent_0"][0], tags["pairs/margin/agent_0"][-1]
    assert first == (0, 0.0) and last[1] > 0  # step 0 is LoRA's zero start: the reference
    card = (adapter / "README.md").read_text()
    assert "DPO on preference pairs" in card and "deontological@tft" in card and "warm-up" not in card


def test_dpo_adapter_loads_into_plain_peft(dpo_run, tiny_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, run = dpo_run
    folder = run / "adapters" / "agent_0"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(folder))
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) and any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)


def test_dpo_checkpoint_reads_as_a_one_agent_moral_ppo_checkpoint(dpo_run):
    import inspect

    from lit_moral.agent import Agent
    from lit_moral.evaluation import load_weights
    from lit_moral.module import MoralPPO
    from tests.helpers import tiny_module

    cli, run = dpo_run
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    ppo = tiny_module()
    ppo.configure_model()
    ppo_lora = {k for k in ppo.state_dict() if "lora_" in k}
    assert set(state["state_dict"]) == ppo_lora  # policy.model....lora_A.agent_0.weight, and nothing else
    hp = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    assert set(hp) <= set(inspect.signature(MoralPPO.__init__).parameters)
    assert {"model", "lora", "actions", "game", "agents"} <= set(hp)
    load_weights(ppo, str(ckpt))  # MoralPPO's loader: on_load_checkpoint (fingerprint) + weights
    a, b = Agent.load(str(ckpt)), Agent.load(str(run / "adapters" / "agent_0"))
    r = ppo.renderer
    with torch.no_grad():
        ppo.policy.eval()
        seq = ppo.policy.candidate_logprobs([("agent_0", r.token_ids[p]) for p in range(4)], r.action_ids)["seq_logp"]
    for agent in (a, b):  # states CC, option orders 0..3 = prompt ids 0..3
        assert agent.probabilities("C", "C")["C"] == pytest.approx(float(torch.softmax(seq, -1)[:, 0].mean()), abs=1e-5)
    p_c = cli.model.last_stats["dpo/p_c/CC/agent_0"]
    assert a.probabilities("C", "C")["C"] == pytest.approx(p_c, abs=1e-5)


def test_the_test_command_evaluates_a_dpo_checkpoint(dpo_run, tmp_path, monkeypatch):
    from lit_moral.report import read_csv

    _, run = dpo_run
    monkeypatch.chdir(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    cli_main(["test", "--config", str(ROOT / "configs" / "debug.yaml"), "--ckpt_path", str(ckpt),
              "--model.evaluation.episodes", "2", "--model.evaluation.rounds", "2", "--model.evaluation.games", "[IPD]",
              "--model.evaluation.variants", "[new_tokens]", "--model.evaluation.plots", "false"])
    rows = read_csv(run / "evaluation" / "summary.csv")
    assert {r["model"] for r in rows} == {"agent_0", "base"}


def test_dpo_can_start_from_a_saved_adapter_with_the_base_as_reference(dpo_run):
    from lit_moral.preference import DPO

    cli, run = dpo_run
    m = _module(DPO, beta=1.0, init_adapter=str(run / "adapters" / "agent_0"))
    m.configure_model()
    stats = m.all_pair_stats()  # the same pairs (same seed): the first run's final numbers, reference unchanged
    for k in ("pairs/margin/agent_0", "pairs/loss/agent_0", "pairs/kl_choice/agent_0"):
        assert stats[k] == pytest.approx(cli.model.last_stats[k], abs=1e-5)
    assert stats["pairs/margin/agent_0"] > 0
    with pytest.raises(ConfigError, match="init_adapter: the adapter has lora.r = 4, the run has lora.r = 8"):
        DPO(model="tiny", init_adapter=str(run / "adapters" / "agent_0"))


def test_reward_model_command_logs_saves_and_resumes(rm_run):
    from tests.helpers import scalars

    cli, run = rm_run
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = set(state["state_dict"])
    assert keys and all(".reward_model." in k for k in keys)
    assert {"policy.value_heads.reward_model.linear.weight", "policy.value_heads.reward_model.linear.bias"} <= keys
    assert state["lit_moral"]["kind"] == "reward_model" and state["lit_moral"]["pairs"]["count"] == 32
    tags = scalars(run)
    names = ["loss", "accuracy", "margin", "score_chosen", "score_rejected"]
    assert {f"rm/{k}/reward_model" for k in names} | {f"pairs/{k}/reward_model" for k in names} <= set(tags)
    assert tags["pairs/accuracy/reward_model"][0] == (0, 0.5) and tags["pairs/margin/reward_model"][-1][1] > 0
    resumed, _ = _run(run.parents[2], "reward-model", "reward_model_deontological.yaml",
                      "--ckpt_path", str(ckpt), "--trainer.max_epochs", "3")
    assert resumed.trainer.global_step == 6 and Path(resumed.trainer.log_dir).resolve() == run.resolve()


def test_a_checkpoint_of_the_other_kind_is_refused_before_any_file_is_touched(rm_run, dpo_run):
    _, rm = rm_run
    _, dpo = dpo_run
    config = (rm / "config.yaml").read_text()
    for command, config_file, ckpt, match in (
            ("dpo", "dpo_deontological.yaml", rm, "action_mode: checkpoint has None, config has 'constrained'"),
            ("reward-model", "reward_model_deontological.yaml", dpo,
             "action_mode: checkpoint has 'constrained', config has None"),
            ("fit", "debug.yaml", rm, "action_mode: checkpoint has None, config has 'constrained'")):
        with pytest.raises(ConfigError, match=f"ckpt_path: checkpoint does not match this run \\(.*{match}"):
            _run(rm.parents[2], command, config_file, "--ckpt_path", str(ckpt / "checkpoints" / "last.ckpt"))
    assert (rm / "config.yaml").read_text() == config


# ---------------------------------------------------------------- the learned reward for RL

def test_learned_reward_scores_samples_alike_shared_or_standalone(rm_run):
    from lit_moral.preference import LearnedReward
    from lit_moral.preference.reward_model import score_answers
    from tests.helpers import tiny_module

    _, run = rm_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    ppo = tiny_module()
    ppo.configure_model()
    r = ppo.renderer
    with torch.no_grad():
        ppo.policy.eval()
        before = ppo.policy.candidate_logprobs([("agent_0", r.token_ids[p]) for p in range(16)], r.action_ids)["seq_logp"]
    keys_before = set(ppo.state_dict())
    shared = LearnedReward.load(ckpt, ppo.policy, model="tiny", actions=("action1", "action2"))
    alone = LearnedReward.load(ckpt, center=False)
    pid, act = torch.arange(16).repeat(2), torch.tensor([C, D, ILLEGAL, C] * 8)
    got, raw = shared.rewards(r.token_ids, r.action_ids, pid, act), alone.rewards(r.token_ids, r.action_ids, pid, act)
    with torch.no_grad():  # the obvious path: each answer after its prompt, one at a time
        want = torch.stack([score_answers(alone.policy, "reward_model", alone.head, [r.token_ids[p]], [r.action_ids[a]])[0]
                            for p in range(16) for a in (0, 1)]).view(16, 2).cpu()
    legal = act != ILLEGAL
    torch.testing.assert_close(raw[legal], want[pid, act.clamp(max=1)][legal], rtol=1e-4, atol=1e-5)
    centred = want - want.mean(-1, keepdim=True)
    torch.testing.assert_close(got[legal], centred[pid, act.clamp(max=1)][legal], rtol=1e-4, atol=1e-5)
    assert (got[~legal] == -6.0).all() and (raw[~legal] == -6.0).all()
    # Sharing the RL run's base changes nothing of the agent: its outputs, trainable weights and checkpoint keys.
    with torch.no_grad():
        after = ppo.policy.candidate_logprobs([("agent_0", r.token_ids[p]) for p in range(16)], r.action_ids)["seq_logp"]
    torch.testing.assert_close(after, before)
    assert set(ppo.state_dict()) == keys_before and ppo.policy.model.active_adapter == "agent_0"
    assert not any(p.requires_grad for n, p in ppo.policy.named_parameters() if ".reward_model." in n)


def test_learned_reward_is_memoised_and_fills_rollout_samples(rm_run, monkeypatch):
    from lit_moral.preference import LearnedReward
    from lit_moral.preference.reward_model import learned_rewards
    from lit_moral.rollout import merge, play
    from tests.helpers import tiny_module

    _, run = rm_run
    ppo = tiny_module()
    ppo.configure_model()
    learned = LearnedReward.load(str(run / "checkpoints" / "last.ckpt"), ppo.policy)
    samples = merge(play(ppo.sampler, ppo.matches(), ppo.game, 2, ppo.rewards, ppo.streams)["agent_0"])
    reward = learned_rewards(learned, ppo.renderer, samples)
    assert reward.shape == samples.reward.shape and reward.dtype == torch.float32
    calls = []
    real = ppo.policy.forward_tree
    monkeypatch.setattr(ppo.policy, "forward_tree", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = learned_rewards(learned, ppo.renderer, samples)  # every (prompt, answer) already scored: no forward
    assert calls == [] and torch.equal(again, reward)
    table = learned.rewards(ppo.renderer.token_ids, ppo.renderer.action_ids, torch.arange(16).repeat_interleave(2),
                            torch.tensor([C, D] * 16)).view(16, 2)
    torch.testing.assert_close(reward, table[samples.pid, samples.action])


def test_learned_reward_refuses_bad_checkpoints_by_field(rm_run, dpo_run):
    from lit_moral.preference import LearnedReward
    from lit_moral.preference.reward_model import check_learned

    _, rm = rm_run
    _, dpo = dpo_run
    with pytest.raises(ConfigError, match="reward.learned: '/nonexistent.ckpt' does not exist"):
        LearnedReward.load("/nonexistent.ckpt")
    with pytest.raises(ConfigError, match="reward.learned: .* is a 'dpo' checkpoint, not a reward model's"):
        LearnedReward.load(str(dpo / "checkpoints" / "last.ckpt"))
    ckpt = str(rm / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="reward.learned: the reward model was trained on model 'tiny', the run uses"):
        LearnedReward.load(ckpt, model="smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="ranks the action strings \\['action1', 'action2'\\], the run shows"):
        LearnedReward.load(ckpt, actions=("action3", "action4"))
    # The same checks without loading any model, for an RL module's __init__, naming its own field.
    with pytest.raises(ConfigError, match="agents\\[0\\].reward.learned: the reward model was trained on model 'tiny'"):
        check_learned(ckpt, model="smollm2-135m-instruct", field="agents[0].reward.learned")
    hp = check_learned(ckpt, model="tiny", actions=("action1", "action2"))
    assert hp["model"] == "tiny" and tuple(hp["actions"]) == ("action1", "action2")


def test_rm_ppo_route_trains_on_the_reward_models_scores(rm_run, tmp_path):
    """``reward: {learned: <ckpt>}``: fit replaces every sample's reward by the reward model's (centred) score;
    the reward model's adapter stays frozen and out of the RL checkpoint."""
    from lit_moral.module import AgentConfig
    from lit_moral.preference import LearnedReward
    from tests.helpers import tiny_module, trainer

    _, run = rm_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    m = tiny_module(agents=[AgentConfig("agent_0", {"learned": ckpt})], episodes_per_iteration=4, rounds_per_episode=2)
    m.configure_model()
    rm_before = {n: p.detach().clone() for n, p in m.policy.model.named_parameters() if "reward_model" in n}
    trainer(tmp_path).fit(m)
    s = m.last_samples["agent_0"]
    ref = LearnedReward.load(ckpt).rewards(m.renderer.token_ids, m.renderer.action_ids, s.pid, s.action)
    torch.testing.assert_close(s.reward, ref)  # the learned score, not the (zero-weight) intrinsic reward
    assert not torch.equal(s.reward, torch.zeros_like(s.reward))
    after = dict(m.policy.model.named_parameters())
    assert rm_before and all(torch.equal(v, after[n]) for n, v in rm_before.items())
    assert not any("reward_model" in k for k in m.state_dict())


def test_learned_reward_setting_is_checked_before_any_model_loads(rm_run):
    from lit_moral.module import AgentConfig
    from tests.helpers import tiny_module

    _, run = rm_run
    with pytest.raises(ConfigError, match=r"agents\[0\].reward.learned: '/nope.ckpt' does not exist"):
        tiny_module(agents=[AgentConfig("agent_0", {"learned": "/nope.ckpt"})])
    with pytest.raises(ConfigError, match="one key 'learned'"):
        tiny_module(agents=[AgentConfig("agent_0", {"learned": str(run), "game": 1.0})])
