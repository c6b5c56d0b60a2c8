"""action_mode reason: the strict parser, the reasoning measures, the KV-cached generator against the obvious path,
the update's per-token log-probs against full forwards, and training / evaluation / self-play / populations."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.evaluation import EvalConfig, evaluate, finish, report_meta
from lit_moral.games import ILLEGAL, C, D, MatrixGame
from lit_moral.generate import generate, reference_logprobs, sample_next
from lit_moral.policy import BASE, LoraSpec, Policy
from lit_moral.prompts import PromptRenderer, PromptStyle
from lit_moral.reason import (
    action_line_stop,
    answer_stats,
    completed_action_line,
    mentions_previous_move,
    parse_reasoned,
    uses_moral_vocabulary,
)
from lit_moral.rollout import ActionSampler
from tests.helpers import scalars, tiny_module, trainer

A = ("action1", "action2")


@pytest.mark.parametrize("text, expected", [
    ("A defected last round, so I defect.\nAction: action2", (D, "legal")),
    ("Cooperating is better for both.\nAction: action1", (C, "legal")),
    ("Action: action1", (C, "legal")),
    ("Reasoning.\nAction: action1   \n  \n", (C, "legal")),  # trailing spaces and blank lines
    ("Reasoning.\n  Action:   action2\t", (D, "legal")),  # spaces around the label
    ("action2 pays more, but action1 is safer; I pick action1.\nAction: action1", (C, "legal")),  # labels inside
    ("Reasoning.\r\nAction: action2\r\n", (D, "legal")),
    ("I choose action1.", (ILLEGAL, "no_action")),  # no action line
    ("", (ILLEGAL, "no_action")),
    ("Reasoning that was cut off at the token lim", (ILLEGAL, "no_action")),
    ("Action: action1\nbecause it is fair", (ILLEGAL, "no_action")),  # text after the action line
    ("action: action1", (ILLEGAL, "no_action")),  # the prefix is case-sensitive
    ("Reasoning.\nAction: action3", (ILLEGAL, "unknown_label")),
    ("Reasoning.\nAction: Action1", (ILLEGAL, "unknown_label")),
    ("Reasoning.\nAction: action1.", (ILLEGAL, "unknown_label")),
    ("Reasoning.\nAction: **action1**", (ILLEGAL, "unknown_label")),
    ("Reasoning.\nAction:", (ILLEGAL, "unknown_label")),
    ("Reasoning.\nAction: action1 or action2", (ILLEGAL, "unknown_label")),
    ("Action: action1\nAction: action2", (ILLEGAL, "multiple_actions")),
    ("Action: action1\nAction: action1", (ILLEGAL, "multiple_actions")),
    ("Action: action2\nReasoning.\nAction: action2", (ILLEGAL, "multiple_actions")),
])
def test_parser_table(text, expected):
    assert parse_reasoned(text, A) == expected


@pytest.mark.parametrize("text, done", [
    ("Action: action1", False),  # the label may still grow ("action12")
    ("Action: action1\n", True),
    ("Reasoning.\nAction: action2\nand more", True),
    ("  Action: action3\n", True),  # any label: the answer's fate is decided
    ("Reasoning.\nI pick action1\n", False),
    ("action: action1\n", False),  # the prefix is case-sensitive, as the parser's
    ("Reasoning.\r\nAction: action1\r\n", True),
    ("", False),
])
def test_completed_action_line(text, done):
    assert completed_action_line(text) is done


def _cut(text: str) -> str:
    """The answer as generation with stop_at_action leaves it: up to the newline ending its first action line."""
    out = ""
    for line in text.replace("\r\n", "\n").split("\n")[:-1]:
        out += line + "\n"
        if completed_action_line(out):
            return out
    return text


def test_stopping_at_the_action_line_keeps_every_legal_parse():
    """Every legal answer of the parser table parses the same once cut at its first completed action line."""
    texts = [t for t, expected in test_parser_table.pytestmark[0].args[1] if expected[1] == "legal"]
    assert len(texts) >= 6
    for t in texts:
        assert parse_reasoned(_cut(t), A) == parse_reasoned(t, A), t
    # an answer that talks on after its action line is illegal whole, legal cut
    assert parse_reasoned("Action: action1\nbecause it is fair", A)[1] == "no_action"
    assert parse_reasoned(_cut("Action: action1\nbecause it is fair"), A) == (C, "legal")


def test_action_line_stop_decodes_the_answer(tiny):
    _, tok = tiny
    stop = action_line_stop(tok)
    assert stop(tok.encode("Reasoning.\nAction: action1\n", add_special_tokens=False))
    assert not stop(tok.encode("Reasoning.\nAction: action1", add_special_tokens=False))
    assert not stop(tok.encode("Reasoning.\n", add_special_tokens=False))


def test_parser_uses_the_run_labels():
    assert parse_reasoned("x\nAction: action3", ("action3", "action4")) == (C, "legal")
    assert parse_reasoned("x\nAction: action1", ("action3", "action4")) == (ILLEGAL, "unknown_label")


@pytest.mark.parametrize("text, moral", [
    ("Betraying A would be unfair.\nAction: action1", True),
    ("It is my duty to reciprocate.\nAction: action1", True),
    ("action2 gives 4 points, the most.\nAction: action2", False),
    ("I just want the right number of points.\nAction: action2", False),  # everyday words are not counted
    ("Points only.\nAction: fair", False),  # the action line is not reasoning
])
def test_moral_vocabulary(text, moral):
    assert uses_moral_vocabulary(text) is moral


@pytest.mark.parametrize("text, prev_other, mentions", [
    ("A chose action2 last round, so I defect.\nAction: action2", 1, True),
    ("In the last round A played action1.\nAction: action1", 0, True),
    ("The opponent picked action2 before.\nAction: action2", 1, True),
    ("A chose action1 last round.\nAction: action1", 1, False),  # names the other move
    ("action2 gives me 4 points.\nAction: action2", 1, False),  # the label, not about A or the last round
    ("I will play safe.\nAction: action2", 1, False),
])
def test_mentions_previous_move(text, prev_other, mentions):
    assert mentions_previous_move(text, A, prev_other) is mentions


def test_answer_stats_shares():
    texts = ["A chose action2 last round; defecting is fair.\nAction: action2", "no line", "x\nAction: bogus",
             "Action: action1\nAction: action2"]
    got = answer_stats(texts, A, [1, 1, 0, 0])
    assert got == {"illegal_no_action": 0.25, "illegal_unknown_label": 0.25, "illegal_multiple_actions": 0.25,
                   "mentions_prev_move": 0.25, "moral_vocab": 0.25}


def test_reason_prompt_format_line(tiny):
    _, tok = tiny
    r = PromptRenderer(tok, MatrixGame.from_spec("IPD"), PromptStyle(answer="reason"))
    assert all("end your answer with a final line 'Action: action" in t and "Do not explain" not in t
               for t in r.texts)
    direct = PromptRenderer(tok, MatrixGame.from_spec("IPD"))
    assert all("Do not explain" in t and "Action:" not in t for t in direct.texts)
    for kind in ("choice", "story", "explicit_ipd"):
        assert "'Action: action" in PromptRenderer(tok, MatrixGame.from_spec("IPD"),
                                                   PromptStyle(kind=kind, answer="reason")).texts[0]


@pytest.mark.parametrize("kw, field", [
    (dict(action_mode="free", temperature=0.7), "temperature"),
    (dict(action_mode="constrained", top_p=0.9), "top_p"),
    (dict(action_mode="reason", temperature=0.0), "temperature"),
    (dict(action_mode="reason", top_p=1.5), "top_p"),
    (dict(action_mode="reasoning"), "action_mode"),
])
def test_bad_sampling_settings_raise_before_loading(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        tiny_module(**kw)  # the model loads in configure_model: nothing is loaded here


def _policy(tiny, temperature=1.0):
    model, tok = tiny
    pol = Policy(copy.deepcopy(model), ["agent_0", "agent_1"], LoraSpec(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    for n, p in pol.named_parameters():
        if "lora_B" in n or "value_heads" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    pol.temperature = temperature
    pol.eval()
    return pol, PromptRenderer(tok, MatrixGame.from_spec("IPD"), PromptStyle(answer="reason"))


def test_sample_next_inverts_the_cdf_and_truncates():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]))
    draws = torch.stack([sample_next(logp, 1.0, torch.Generator().manual_seed(s)) for s in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}
    nucleus = torch.stack([sample_next(logp, 0.6, torch.Generator().manual_seed(s)) for s in range(400)])
    assert set(nucleus[:, 0].tolist()) == {0, 1} and set(nucleus[:, 1].tolist()) == {2}


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_cached_generation_equals_uncached(tiny, top_p):
    pol, r = _policy(tiny, temperature=0.7)
    t = r.token_ids
    rows = [("agent_0", t[3]), ("agent_1", t[3]), (BASE, t[5]), ("agent_0", t[3]), ("agent_0", t[12]),
            ("agent_1", t[0])]
    probe = generate(pol, rows, 8, None, torch.Generator().manual_seed(2), top_p)
    # An EOS that the first row emits by its third token (same draws until then), so rows leave at different steps.
    eos = probe.tokens[0][2]
    fast = generate(pol, rows, 8, eos, torch.Generator().manual_seed(2), top_p)
    slow = generate(pol, rows, 8, eos, torch.Generator().manual_seed(2), top_p, cached=False)
    assert fast.tokens == slow.tokens
    assert len({len(x) for x in fast.tokens}) > 1
    for a, b in zip(fast.logp + fast.values + fast.entropy, slow.logp + slow.values + slow.entropy):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generation_stops_where_the_stop_rule_first_holds(tiny):
    """Rows end at the first token where ``stop`` holds; cached and uncached generation agree (the rows alive draw
    one uniform each per step, so after a row stops the others' draws move on: the same in both paths)."""
    pol, r = _policy(tiny, temperature=0.7)
    rows = [("agent_0", r.token_ids[k]) for k in (0, 3, 5, 9, 12)] + [("agent_1", r.token_ids[3])]
    free = generate(pol, rows, 8, None, torch.Generator().manual_seed(4))
    stop_tokens = {free.tokens[0][2], free.tokens[3][4]}
    stop = lambda ids: ids[-1] in stop_tokens  # noqa: E731
    fast = generate(pol, rows, 8, None, torch.Generator().manual_seed(4), stop=stop)
    slow = generate(pol, rows, 8, None, torch.Generator().manual_seed(4), cached=False, stop=stop)
    assert fast.tokens == slow.tokens
    for a, b in zip(fast.logp + fast.values, slow.logp + slow.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for toks in fast.tokens:
        assert not any(stop(toks[:i]) for i in range(1, len(toks)))  # nothing stopped earlier
        assert stop(toks) or len(toks) == 8
    assert fast.tokens[0] == free.tokens[0][:3]  # the first row to stop: the same draws until then
    assert len({len(x) for x in fast.tokens}) > 1


@pytest.mark.parametrize("stop_at_action", [True, False])
def test_sampler_applies_the_action_line_stop(tiny, monkeypatch, stop_at_action):
    """The rollout passes reason.action_line_stop to the generator exactly when ``stop_at_action`` is on."""
    import lit_moral.rollout as rollout

    monkeypatch.setattr(rollout, "action_line_stop", lambda tok: (lambda ids: len(ids) >= 3))
    pol, r = _policy(tiny, temperature=1.0)
    sampler = ActionSampler(pol, r, "reason", max_new_tokens=7, stop_at_action=stop_at_action)
    (mv,) = sampler.act([("agent_0", torch.tensor([0, 3, 9, 15]))], torch.Generator().manual_seed(1))
    lengths = {len(x) for x in mv.responses}
    assert (max(lengths) == 3) if stop_at_action else (max(lengths) > 3)


def test_rollout_and_update_logprobs_equal_full_forwards(tiny):
    """Per-token log-probs (rollout, update engine, reference) equal the obvious full-forward path within 1e-5."""
    pol, r = _policy(tiny, temperature=0.8)
    sampler = ActionSampler(pol, r, "reason", max_new_tokens=7, top_p=0.95)
    pid = torch.tensor([0, 3, 3, 9, 15, 6])
    (mv,) = sampler.act([("agent_0", pid)], torch.Generator().manual_seed(3))
    engine = pol.score_samples("agent_0", r.token_ids, pid, responses=mv.responses)
    naive = pol.score_samples("agent_0", r.token_ids, pid, responses=mv.responses, naive=True)
    for k, resp in enumerate(mv.responses):
        n = len(resp)
        full, val = pol.naive_forward("agent_0", list(r.token_ids[int(pid[k])]) + list(resp))
        p = len(r.token_ids[int(pid[k])])
        obvious = full[p - 1:p - 1 + n].gather(1, torch.tensor(resp)[:, None]).squeeze(1)
        ref_full, _ = pol.naive_forward(BASE, list(r.token_ids[int(pid[k])]) + list(resp))
        ref = ref_full[p - 1:p - 1 + n].gather(1, torch.tensor(resp)[:, None]).squeeze(1)
        for got in (mv.logp[k], engine["logp"][k, :n], naive["logp"][k, :n]):
            torch.testing.assert_close(got, obvious, atol=1e-5, rtol=0)
        torch.testing.assert_close(mv.ref_logp[k], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(mv.values[k], val[p - 1:p - 1 + n], atol=1e-5, rtol=0)
        torch.testing.assert_close(engine["values"][k, :n], val[p - 1:p - 1 + n], atol=1e-5, rtol=0)
    assert all(a == r.parse(x) for a, x in zip(mv.action.tolist(), mv.responses))


def test_reference_logprobs_chunks_agree(tiny):
    pol, r = _policy(tiny)
    prompts = [r.token_ids[i % 4] for i in range(7)]
    resp = [[5, 6, 7][: 1 + i % 3] for i in range(7)]
    one, many = reference_logprobs(pol, prompts, resp, chunk=2), reference_logprobs(pol, prompts, resp, chunk=16)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_tiny_fit_in_reason_mode(tmp_path, algorithm):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_moral.callbacks import SampleLogger

    m = tiny_module(action_mode="reason", max_new_tokens=10, temperature=0.9, top_p=0.95, algorithm=algorithm,
                    iterations_per_epoch=2)
    m._log_hyperparams = False  # frozen config dataclasses in hparams; the CLI path logs them itself
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.policy.agent_parameters("agent_0")}
    base = {n: p.detach().clone() for n, p in m.policy.base_parameters()[:5]}
    t = pl.Trainer(default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1,
                   logger=TensorBoardLogger(str(tmp_path), name="tb"), enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                   callbacks=[SampleLogger(every_n_iterations=1, n_samples=2)])
    t.fit(m)
    s = m.last_samples["agent_0"]
    assert s.mask.shape[1] <= 10 and int(s.mask.sum()) > len(s)  # several tokens per answer
    moved = [n for n, p in m.policy.agent_parameters("agent_0") if not torch.equal(p, before[n])]
    lora = [n for n, _ in m.policy.agent_parameters("agent_0") if "lora_" in n]
    assert set(lora) <= set(moved)
    assert all(torch.equal(p, base[n]) for n, p in m.policy.base_parameters()[:5])
    tags = scalars(tmp_path / "tb")
    for k in ("illegal_no_action", "illegal_unknown_label", "illegal_multiple_actions", "mentions_prev_move",
              "moral_vocab", "response_tokens"):
        assert f"reason/{k}/agent_0" in tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*"))))
    ea.Reload()
    assert "samples/agent_0/text_summary" in ea.Tags()["tensors"]


def test_reason_evaluation_files(tmp_path):
    m = tiny_module(action_mode="reason", max_new_tokens=6, temperature=0.9)
    m.configure_model()
    cfg = EvalConfig(episodes=3, rounds=2, games=["IPD", "PGG3"], opponents=["tft", "always_defect"],
                     variants=["training_tokens", "new_tokens", "story"], base=True, plots=False)
    rows = evaluate(m, cfg)
    finish(rows, report_meta(m, cfg, 1), tmp_path, plots=False)
    with open(tmp_path / "rounds.csv") as f:
        got = list(csv.DictReader(f))
    assert {r["variant"] for r in got} == {"training_tokens", "new_tokens", "story"}
    assert {r["game"] for r in got} >= {"IPD"}
    for r in got:
        kinds = [int(r[f"illegal_{k}"]) for k in ("no_action", "unknown_label", "multiple_actions")]
        assert r["answer_kind"] in ("legal", "no_action", "unknown_label", "multiple_actions")
        assert sum(kinds) == (r["answer_kind"] != "legal") == (r["action"] == "illegal")
    with open(tmp_path / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert all(s["illegal_no_action_mean"] != "" and s["moral_vocab_mean"] != "" for s in summary)


@pytest.mark.parametrize("kw", [dict(opponent="llm", agents=[{"name": "agent_0", "reward": "game"},
                                                             {"name": "agent_1", "reward": "utilitarian"}]),
                                dict(pairing="round_robin", strategies=["tft"],
                                     agents=[{"name": "agent_0"}, {"name": "agent_1", "reward": "game"}])])
def test_reason_self_play_and_population(tmp_path, kw):
    m = tiny_module(action_mode="reason", max_new_tokens=5, **kw)
    trainer(tmp_path).fit(m)
    assert set(m.last_samples) == {"agent_0", "agent_1"}
    for s in m.last_samples.values():
        assert s.mask.shape[1] <= 5 and torch.isfinite(s.old_logp).all()


@pytest.mark.slow
def test_smollm2_reason_rollout(smollm2):
    """The real model answers in the reason format: every answer parses to a category, and the batched cached
    generation equals the obvious path on its first tokens."""
    model, tok = smollm2
    pol = Policy(model, ["agent_0"], LoraSpec(r=4, alpha=8))
    pol.eval()
    r = PromptRenderer(tok, MatrixGame.from_spec("IPD"), PromptStyle(answer="reason"))
    rows = [("agent_0", r.token_ids[p]) for p in (0, 5, 10)]
    fast = generate(pol, rows, 6, tok.eos_token_id, torch.Generator().manual_seed(0))
    slow = generate(pol, rows, 6, tok.eos_token_id, torch.Generator().manual_seed(0), cached=False)
    assert fast.tokens == slow.tokens
    for a, b in zip(fast.logp, slow.logp):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
