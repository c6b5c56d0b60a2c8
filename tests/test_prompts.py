"""Prompt rendering, prompt ids and answer parsing (protocol sections 3-4)."""

from __future__ import annotations

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.games import ILLEGAL, C, D, MatrixGame
from lit_moral.prompts import (
    N_PROMPT_IDS,
    PromptRenderer,
    PromptStyle,
    may_become_legal,
    parse_action,
    prompt_bits,
    prompt_id,
    render_text,
    validate_actions,
)

IPD = MatrixGame.from_spec("IPD")
STYLE = PromptStyle()
ACTS = ("action1", "action2")


@pytest.fixture(scope="module")
def renderer(tiny):
    _, tokenizer = tiny
    return PromptRenderer(tokenizer, IPD, STYLE)


# ---------------------------------------------------------------- render_text


def test_render_text_contains_every_field():
    # prev_me = D, prev_other = C: last round M got 4 and A got 0 (IPD)
    text = render_text(IPD, STYLE, D, C, 0, 0)
    lines = text.split("\n")
    # (1) both action strings as options
    assert "action1 or action2" in lines[0]
    assert "agent A" in lines[0]
    # (2) row player
    assert "row player" in lines[1]
    # (3) table with all eight payoff numbers of IPD, labelled by the action strings
    assert "| | A plays action1 | A plays action2 |" in lines
    assert "| you play action1 | you get 3, A gets 3 | you get 0, A gets 4 |" in lines
    assert "| you play action2 | you get 4, A gets 0 | you get 1, A gets 1 |" in lines
    # (4) last round moves and points
    last = [ln for ln in lines if "last round" in ln]
    assert len(last) == 1
    assert "you chose action2 and A chose action1" in last[0]
    assert "you got 4 points and A got 0 points" in last[0]
    # (5) selfish question, (6) format line, (7) answer cue, in that order
    i_table = lines.index("| you play action1 | you get 3, A gets 3 | you get 0, A gets 4 |")
    i_last = lines.index(last[0])
    i_q = next(i for i, ln in enumerate(lines) if "highest possible score in points" in ln)
    i_fmt = next(i for i, ln in enumerate(lines) if ln.startswith("Answer with exactly one of action1 or action2"))
    assert 1 < i_table < i_last < i_q < i_fmt == len(lines) - 2
    assert lines[-1] == "Your answer:"


@pytest.mark.parametrize(
    "prev_me,prev_other,words,points",
    [
        (C, C, "you chose action1 and A chose action1", "you got 3 points and A got 3 points"),
        (C, D, "you chose action1 and A chose action2", "you got 0 points and A got 4 points"),
        (D, C, "you chose action2 and A chose action1", "you got 4 points and A got 0 points"),
        (D, D, "you chose action2 and A chose action2", "you got 1 points and A got 1 points"),
    ],
)
def test_last_round_every_state(prev_me, prev_other, words, points):
    text = render_text(IPD, STYLE, prev_me, prev_other, 0, 0)
    assert words in text and points in text


def test_last_round_points_other_game():
    bos = MatrixGame.from_spec("BOS")
    text = render_text(bos, STYLE, D, D, 0, 0)
    assert "you got 2 points and A got 3 points" in text
    assert "| you play action1 | you get 3, A gets 2 | you get 0, A gets 0 |" in text


def test_no_game_names_or_moral_words():
    for pid in range(N_PROMPT_IDS):
        text = render_text(IPD, STYLE, *prompt_bits(pid)).lower()
        for word in ("prisoner", "dilemma", "cooperat", "defect"):
            assert word not in text


def test_order_bits_change_option_order():
    t00 = render_text(IPD, STYLE, C, C, 0, 0).split("\n")
    t10 = render_text(IPD, STYLE, C, C, 1, 0).split("\n")
    t01 = render_text(IPD, STYLE, C, C, 0, 1).split("\n")
    assert t00[0].endswith("either action1 or action2.")
    assert t10[0].endswith("either action2 or action1.")
    assert t01[0] == t00[0]
    fmt = lambda lines: next(ln for ln in lines if ln.startswith("Answer with"))  # noqa: E731
    assert fmt(t00).startswith("Answer with exactly one of action1 or action2 ")
    assert fmt(t01).startswith("Answer with exactly one of action2 or action1 ")
    assert fmt(t10) == fmt(t00)
    # order bits do not touch the table
    assert t00[2:6] == t10[2:6] == t01[2:6]


def test_all_16_prompt_ids_distinct():
    texts = {render_text(IPD, STYLE, *prompt_bits(pid)) for pid in range(N_PROMPT_IDS)}
    assert N_PROMPT_IDS == 16 and len(texts) == 16


def test_new_tokens_style():
    style = PromptStyle(actions=("action3", "action4"))
    text = render_text(IPD, style, C, D, 0, 0)
    assert "action3 or action4" in text
    assert "| you play action4 | you get 4, A gets 0 | you get 1, A gets 1 |" in text
    assert "action1" not in text and "action2" not in text


# ---------------------------------------------------------------- table orders


def _table_lines(order):
    lines = render_text(IPD, PromptStyle(table_order=order), C, C, 0, 0).split("\n")
    return lines[2:6]


def test_table_order_original():
    assert _table_lines("original") == [
        "| | A plays action1 | A plays action2 |",
        "|---|---|---|",
        "| you play action1 | you get 3, A gets 3 | you get 0, A gets 4 |",
        "| you play action2 | you get 4, A gets 0 | you get 1, A gets 1 |",
    ]


def test_table_order_reversed():
    assert _table_lines("reversed") == [
        "| | A plays action2 | A plays action1 |",
        "|---|---|---|",
        "| you play action2 | you get 1, A gets 1 | you get 4, A gets 0 |",
        "| you play action1 | you get 0, A gets 4 | you get 3, A gets 3 |",
    ]


def test_table_order_permuted():
    assert _table_lines("permuted") == [
        "| | A plays action1 | A plays action2 |",
        "|---|---|---|",
        "| you play action2 | you get 4, A gets 0 | you get 1, A gets 1 |",
        "| you play action1 | you get 3, A gets 3 | you get 0, A gets 4 |",
    ]


def test_table_order_rejects_unknown():
    with pytest.raises(ConfigError, match="table_order"):
        PromptStyle(table_order="shuffled")


# ---------------------------------------------------------------- prompt ids


def test_prompt_id_bits_round_trip():
    for pid in range(N_PROMPT_IDS):
        bits = prompt_bits(pid)
        assert all(b in (0, 1) for b in bits)
        t = [torch.tensor([b]) for b in bits]
        assert prompt_id(*t).item() == pid
    assert prompt_bits(0) == (0, 0, 0, 0)
    assert prompt_bits(15) == (1, 1, 1, 1)
    assert prompt_bits(0b1010) == (1, 0, 1, 0)
    assert prompt_id(torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([1, 1])).tolist() \
        == [0b1011, 0b0101]


# ---------------------------------------------------------------- renderer with the tiny tokenizer


def test_renderer_texts_and_tokens(renderer, tiny):
    _, tok = tiny
    assert len(renderer.texts) == len(renderer.token_ids) == 16
    assert len(set(renderer.texts)) == 16
    assert len({tuple(t) for t in renderer.token_ids}) == 16
    for pid, text in enumerate(renderer.texts):
        assert render_text(IPD, STYLE, *prompt_bits(pid)) in text
    assert renderer.max_prompt_len == max(len(t) for t in renderer.token_ids)
    assert renderer.action_ids == [tok("action1", add_special_tokens=False).input_ids,
                                   tok("action2", add_special_tokens=False).input_ids]


def test_renderer_parse(renderer, tiny):
    _, tok = tiny
    assert renderer.parse(tok("action1", add_special_tokens=False).input_ids) == C
    assert renderer.parse(tok(" action2\n", add_special_tokens=False).input_ids) == D
    assert renderer.parse(tok("action3", add_special_tokens=False).input_ids) == ILLEGAL


@pytest.mark.parametrize("text, live", [
    ("", True), ("  ", True), ("a", True), (" act", True), ("action", True), ("action2", True), ("action1 \n", True),
    ("\u00e9\ufffd", True),  # a character split across tokens may still decode to anything
    ("action12", False), ("action3", False), ("b", False), ("The", False), ("action1 x", False), ("I would", False),
])
def test_may_become_legal_exactly_when_some_continuation_parses(text, live):
    assert may_become_legal(text, ACTS) is live
    # the definition, checked by brute force over short continuations built from the answers' own characters
    if "\ufffd" not in text:
        tails = ["", " ", "\n", "1", "2", "n", "on", "ion1", "tion1", "ction2", "action1", "n1 ", "1 \n"]
        assert any(parse_action(text + t, ACTS) != ILLEGAL for t in tails) is live


def test_renderer_may_become_legal_reads_the_decoded_tokens(renderer, tiny):
    _, tok = tiny
    ids = tok("action1", add_special_tokens=False).input_ids
    assert all(renderer.may_become_legal(ids[:k]) for k in range(len(ids) + 1))
    assert not renderer.may_become_legal(tok("action15", add_special_tokens=False).input_ids)
    assert not renderer.may_become_legal(tok("no", add_special_tokens=False).input_ids)


def test_sample_ids_shuffles_orders(renderer):
    n = 4000
    g = torch.Generator().manual_seed(0)
    prev_me = torch.randint(0, 2, (n,), generator=g)
    prev_other = torch.randint(0, 2, (n,), generator=g)
    ids = renderer.sample_ids(prev_me, prev_other, torch.Generator().manual_seed(1))
    assert ids.shape == (n,)
    assert ids.min().item() >= 0 and ids.max().item() < 16
    bits = torch.tensor([prompt_bits(i) for i in ids.tolist()])
    assert torch.equal(bits[:, 0], prev_me) and torch.equal(bits[:, 1], prev_other)
    for col in (2, 3):
        frac = bits[:, col].float().mean().item()
        assert abs(frac - 0.5) < 0.04  # std ~0.008
    # the two orders are drawn independently: all four combinations appear ~25%
    combo = bits[:, 2] * 2 + bits[:, 3]
    counts = torch.bincount(combo, minlength=4).float() / n
    assert (counts - 0.25).abs().max().item() < 0.04
    # seeded
    again = renderer.sample_ids(prev_me, prev_other, torch.Generator().manual_seed(1))
    assert torch.equal(ids, again)


def test_sample_ids_without_shuffle(renderer):
    prev_me = torch.tensor([0, 0, 1, 1])
    prev_other = torch.tensor([0, 1, 0, 1])
    ids = renderer.sample_ids(prev_me, prev_other, torch.Generator().manual_seed(0), shuffle=False)
    assert ids.tolist() == [0, 4, 8, 12]


# ---------------------------------------------------------------- parsing and validation


@pytest.mark.parametrize(
    "text,want",
    [
        ("action1", C),
        ("action2", D),
        (" action1", C),
        ("action2 ", D),
        ("\naction1\n", C),
        ("\t action2 \n\n", D),
        ("Action1", ILLEGAL),
        ("ACTION2", ILLEGAL),
        ("action1.", ILLEGAL),
        ("action12", ILLEGAL),
        ("action", ILLEGAL),
        ("action1 action2", ILLEGAL),
        ("I choose action1", ILLEGAL),
        ("", ILLEGAL),
        ("   ", ILLEGAL),
        ("action3", ILLEGAL),
    ],
)
def test_parse_action(text, want):
    assert parse_action(text, ACTS) == want


def test_parse_action_new_tokens():
    assert parse_action("action3", ("action3", "action4")) == C
    assert parse_action("action4\n", ("action3", "action4")) == D
    assert parse_action("action1", ("action3", "action4")) == ILLEGAL


def test_validate_actions_accepts():
    assert validate_actions(["action1", "action2"]) == ("action1", "action2")
    assert validate_actions(("X", "Y")) == ("X", "Y")


@pytest.mark.parametrize(
    "bad,fragment",
    [
        (["action1", "action1"], "differ"),
        (["", "action2"], "non-empty"),
        (["action1", "   "], "non-empty"),
        ([" action1", "action2"], "whitespace"),
        (["action1", "action2\n"], "whitespace"),
        (["act", "action2"], "prefix"),
        (["action1", "action1x"], "prefix"),
        ("action1", "exactly two"),
        (["a", "b", "c"], "exactly two"),
    ],
)
def test_validate_actions_rejects(bad, fragment):
    with pytest.raises(ConfigError) as e:
        validate_actions(bad, field="eval.actions")
    assert "eval.actions" in str(e.value)
    assert fragment in str(e.value)


def test_prompt_style_validates_actions():
    with pytest.raises(ConfigError, match="actions"):
        PromptStyle(actions=("action1", "action1"))


# ---------------------------------------------------------------- system prompt

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat template: a default system turn when there is none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NO_SYSTEM_ROLE = (  # a template that refuses a system turn (as Gemma-2's does)
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _with_template(tiny, template):
    import copy

    tok = copy.deepcopy(tiny[1])
    tok.chat_template = template
    return tok


def test_no_system_text_by_default_even_where_the_template_inserts_one(tiny):
    tok = _with_template(tiny, SMOLLM2_TEMPLATE)
    text = PromptRenderer(tok, IPD, PromptStyle()).texts[0]
    assert "SmolLM" not in text and "helpful" not in text
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nYou are playing a game")
    # the tiny model's own template inserts nothing: no system turn at all
    assert PromptRenderer(tiny[1], IPD, PromptStyle()).texts[0].startswith("<|user|>\nYou are playing a game")


def test_system_prompt_setting(tiny):
    tok = _with_template(tiny, SMOLLM2_TEMPLATE)
    text = PromptRenderer(tok, IPD, PromptStyle(system_prompt="Be brief.")).texts[0]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nYou are playing")
    # a template without a system role: the system text opens the user turn
    tok = _with_template(tiny, NO_SYSTEM_ROLE)
    text = PromptRenderer(tok, IPD, PromptStyle(system_prompt="Be brief.")).texts[0]
    assert text.startswith("<|user|>\nBe brief.\n\nYou are playing")
    assert PromptRenderer(tok, IPD, PromptStyle()).texts[0].startswith("<|user|>\nYou are playing")
    with pytest.raises(ConfigError, match="system_prompt"):
        PromptStyle(system_prompt=3)


def test_column_player_prompts_of_an_asymmetric_game(tiny):
    bos = MatrixGame.from_spec("BOS")
    r = PromptRenderer(tiny[1], bos, STYLE)
    assert len(r.token_ids) == 32 and r.view_offset == (0, 16)
    ids = r.sample_ids(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.Generator(), shuffle=False, seat=1)
    assert ids.tolist() == [16, 24]
    assert "| you play action1 | you get 2, A gets 3 |" in r.texts[16]
    assert "| you play action1 | you get 3, A gets 2 |" in r.texts[0]
    assert len(PromptRenderer(tiny[1], IPD, STYLE).token_ids) == 16  # symmetric: one view


# ---------------------------------------------------------------- memory of k rounds


def test_memory_two_prompts_show_both_rounds_and_keep_the_newest_in_bits_3_and_2(tiny):
    from lit_moral.prompts import history_of

    r = PromptRenderer(tiny[1], IPD, PromptStyle(memory=2))
    assert r.n_ids == 64 and len(r.texts) == 64 and len(set(r.texts)) == 64
    pid = int(prompt_id(torch.tensor([[1, 0]]), torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([1]))[0])
    assert history_of(pid, 2) == [(1, 0), (0, 1)] and prompt_bits(pid)[:2] == (0, 1)
    text = r.texts[pid]
    assert ("Two rounds ago you chose action2 and A chose action1, so you got 4 points and A got 0 points. "
            "In the last round you chose action1 and A chose action2, so you got 0 points and A got 4 points.") in text
    # memory 1 is the paper's prompt, unchanged
    one = PromptRenderer(tiny[1], IPD, PromptStyle())
    assert one.texts == PromptRenderer(tiny[1], IPD, STYLE).texts and one.n_ids == 16
    with pytest.raises(ConfigError, match="memory"):
        PromptStyle(memory=0)


def test_memory_histories_in_play(tiny):
    """Every round's prompt shows the players' real last k moves (oldest first); TFT still copies the newest."""
    import copy

    from lit_moral.opponents import make_opponent
    from lit_moral.policy import LoraSpec, Policy
    from lit_moral.prompts import history_of
    from lit_moral.rewards import RewardSpec
    from lit_moral.rollout import ActionSampler, Match, play
    from lit_moral.seeding import Streams

    pol = Policy(copy.deepcopy(tiny[0]), ["agent_0"], LoraSpec(r=4, alpha=8))
    pol.eval()
    r = PromptRenderer(tiny[1], IPD, PromptStyle(memory=3))
    sampler = ActionSampler(pol, r, "constrained")
    out = play(sampler, [Match(("agent_0", make_opponent("tft")), 16)], IPD, 4, {"agent_0": RewardSpec.parse("game")},
               Streams.from_seed(0))["agent_0"][0]
    rounds = out.action.view(4, 16)
    other = out.other_action.view(4, 16)
    for t in range(1, 4):  # round t's prompt ends with round t-1's moves, after the moves of rounds before
        for g in range(16):
            h = history_of(int(out.pid.view(4, 16)[t, g]), 3)
            assert h[-1] == (int(rounds[t - 1, g]), int(other[t - 1, g]))
            if t >= 2:
                assert h[-2] == (int(rounds[t - 2, g]), int(other[t - 2, g]))
        assert torch.equal(other[t], rounds[t - 1])  # TFT copies the newest move


def test_every_reward_type_has_a_persona_baseline():
    """The evaluation's persona baselines cover every named value of the reward library, each rendered as the
    prompt's opening (the base model told the value in words)."""
    from lit_moral.evaluation import EvalConfig
    from lit_moral.games import MatrixGame
    from lit_moral.prompts import PERSONAS, PromptStyle, render_text
    from lit_moral.rewards import COMPONENTS

    assert set(PERSONAS) == set(COMPONENTS)
    game = MatrixGame.from_spec("IPD")
    texts = {name: render_text(game, PromptStyle(persona=name), 0, 0, 0, 0) for name in PERSONAS}
    assert all(t.startswith(PERSONAS[n]) for n, t in texts.items()) and len(set(texts.values())) == len(PERSONAS)
    EvalConfig(personas=list(PERSONAS))  # every one is accepted by the evaluation's settings
