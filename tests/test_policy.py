"""The forward engine against the obvious path, and adapter bookkeeping."""

from __future__ import annotations

import pytest
import torch

from lit_moral.games import MatrixGame
from lit_moral.policy import BASE, LoraSpec, Policy
from lit_moral.prefix_tree import auto_levels, build_prompt_tree
from lit_moral.prompts import PromptRenderer


def _policy(tiny, agents=("agent_0", "agent_1"), levels=0, perturb=True, seed=0, layers=0):
    model, tok = tiny
    import copy

    pol = Policy(copy.deepcopy(model), list(agents), LoraSpec(r=4, alpha=8, layers=layers), prefix_levels=levels)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        for n, p in pol.named_parameters():
            if "lora_B" in n or "value_heads" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.3
    return pol, PromptRenderer(tok, MatrixGame.from_spec("IPD"))


def test_prompt_tree_paths_rebuild_every_prompt():
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        levels = int(torch.randint(1, 5, (1,), generator=g))
        base = torch.randint(0, 6, (int(torch.randint(0, 10, (1,), generator=g)),), generator=g).tolist()
        prompts = []
        for _ in range(int(torch.randint(1, 8, (1,), generator=g))):
            tail = torch.randint(0, 4, (int(torch.randint(levels, 12, (1,), generator=g)),), generator=g).tolist()
            prompts.append((["a", "b"][int(torch.randint(0, 2, (1,), generator=g))], base + tail))
        lv, leaf = build_prompt_tree(prompts, levels)
        for i, (adapter, toks) in enumerate(prompts):
            row, rebuilt = leaf[i], []
            for d in reversed(range(levels)):
                assert lv[d].adapter[row] == adapter and len(lv[d].tokens[row]) >= 1
                rebuilt = lv[d].tokens[row] + rebuilt
                row = lv[d].parent[row]
            assert rebuilt == toks


def test_auto_levels_shares_the_rules_prefix(tiny):
    _, tok = tiny
    r = PromptRenderer(tok, MatrixGame.from_spec("IPD"))
    prompts = [("agent_0", r.token_ids[i]) for i in range(16)]
    lv = auto_levels(prompts)
    levels, _ = build_prompt_tree(prompts, lv)
    tokens = sum(len(t) for level in levels for t in level.tokens)
    assert lv > 1
    assert tokens < 0.5 * sum(len(t) for _, t in prompts)


@pytest.mark.parametrize("levels", [1, 3, 0])
def test_tree_forward_matches_full_forward(tiny, levels):
    pol, r = _policy(tiny, levels=levels)
    pol.eval()
    prompts = [("agent_0", r.token_ids[i]) for i in range(16)] + [("agent_1", r.token_ids[3]), (BASE, r.token_ids[7])]
    conts = [(i, r.action_ids[i % 2]) for i in range(len(prompts))] + [(0, r.action_ids[1])]
    with torch.no_grad():
        out = pol.continuation_logprobs(prompts, conts, entropy=True, next_token=True)
        for k, (pi, c) in enumerate(conts):
            adapter, p = prompts[pi]
            ids = torch.tensor([list(p) + list(c)])
            if adapter == BASE:
                with pol.model.disable_adapter():
                    logits = pol.model(input_ids=ids).logits[0]
            else:
                pol.activate(adapter)
                logits = pol.model(input_ids=ids).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            want = lp[len(p) - 1: len(p) + len(c) - 1].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            torch.testing.assert_close(out["logp"][k, :len(c)], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["next_logp"][k], lp[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_score_samples_equals_naive_with_gradients(tiny, mode, checkpointing):
    """Every optimisation on (dedup, prefix tree, action-position projection) vs the obvious path; with
    gradient checkpointing the update forward runs whole sequences and must give the same numbers."""
    pol, r = _policy(tiny)
    if checkpointing:
        pol.enable_gradient_checkpointing()
        assert pol.flat_when_training and all(layer.gradient_checkpointing for layer in pol.decoder.layers)
    pol.train()  # dropout is 0: train mode must not change numbers
    pol.activate("agent_0")
    g = torch.Generator().manual_seed(0)
    pid = torch.randint(0, 16, (24,), generator=g)
    pid[:6] = pid[0]  # duplicates
    kwargs = {}
    if mode == "constrained":
        kwargs = {"candidates": r.action_ids, "choice": torch.randint(0, 2, (24,), generator=g)}
    else:
        vocab = len(r.tokenizer)
        kwargs = {"responses": [tuple(torch.randint(0, vocab, (int(1 + k % 2),), generator=g).tolist())
                                for k in range(24)]}
        kwargs["responses"][1] = kwargs["responses"][0]
    params = [p for _, p in pol.agent_parameters("agent_0")]
    results = []
    for naive in (False, True):
        out = pol.score_samples("agent_0", r.token_ids, pid, naive=naive, **kwargs)
        loss = (out["logp"] * torch.linspace(-1, 1, out["logp"].numel()).view_as(out["logp"])).sum() \
            + (out["values"] ** 2).sum() + out["entropy"].sum()
        grads = torch.autograd.grad(loss, params)
        results.append((out, loss.detach(), grads))
    (fast, lf, gf), (slow, ls, gs) = results
    for k in ("logp", "values", "entropy", "mask"):
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lf, ls, rtol=1e-5, atol=1e-5)
    # The criterion: 1e-5 relative, for each gradient tensor as a whole (norm of the difference).
    # Element by element, fp32 sums in another order differ by up to ~5e-5 on near-zero entries, depending on
    # the thread count, so the per-element check only bounds gross errors.
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(gf, gs))
    assert rel <= 1e-5, rel


def test_policy_equals_reference_at_init(tiny):
    pol, r = _policy(tiny, perturb=False)
    pol.eval()
    prompts = [("agent_0", r.token_ids[i]) for i in range(4)] + [(BASE, r.token_ids[i]) for i in range(4)]
    with torch.no_grad():
        out = pol.candidate_logprobs(prompts, r.action_ids)
    torch.testing.assert_close(out["seq_logp"][:4], out["seq_logp"][4:], rtol=0, atol=0)


def test_agent_parameters_selected_by_name(tiny):
    pol, _ = _policy(tiny, perturb=False)
    a0 = {n for n, _ in pol.agent_parameters("agent_0")}
    a1 = {n for n, _ in pol.agent_parameters("agent_1")}
    assert a0 and a1 and not a0 & a1
    assert all("agent_0" in n for n in a0) and all("agent_1" in n for n in a1)
    assert not any(p.requires_grad for _, p in pol.base_parameters())
    pol.activate("agent_1")  # peft flips requires_grad; selection by name must not care
    assert {n for n, _ in pol.agent_parameters("agent_0")} == a0


@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_batched_memoised_rollout_equals_one_at_a_time(tiny, mode):
    """The sampler's batched, deduplicated, mixed-adapter forward vs one full forward per key."""
    from lit_moral.rollout import ActionSampler

    pol, r = _policy(tiny)
    pol.eval()
    fast = ActionSampler(pol, r, mode)
    slow = ActionSampler(pol, r, mode, naive=True)
    prefixes = [()] if mode == "constrained" else [(), tuple(r.action_ids[0][:1]), tuple(r.action_ids[1][:2])]
    keys = [(a, p, pre) for a in ("agent_0", "agent_1", BASE) for p in range(16) for pre in prefixes]
    with torch.no_grad():
        fast._resolve(keys)
        slow._resolve(keys)
    for k in keys:
        torch.testing.assert_close(fast._memo[k][0], slow._memo[k][0], rtol=1e-5, atol=1e-5)
        if k[0] != BASE:
            torch.testing.assert_close(fast._memo[k][1], slow._memo[k][1], rtol=1e-5, atol=1e-5)
    if mode == "free":  # a first step alone also fills the step after each legal answer's first token, exactly
        fresh = ActionSampler(pol, r, mode)
        with torch.no_grad():
            fresh._resolve([(a, p, ()) for a in ("agent_0", BASE) for p in (0, 9)])
        first = r.action_ids[0][:1]
        assert r.action_ids[1][:1] == first and len(fresh._memo) == 2 * 2 * 2
        for a in ("agent_0", BASE):
            for p in (0, 9):
                torch.testing.assert_close(fresh._memo[(a, p, tuple(first))][0], slow._memo[(a, p, tuple(first))][0],
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("active", ["agent_0", "agent_1"])
@pytest.mark.parametrize("named", ["agent_0", "agent_1", BASE])
def test_single_adapter_batch_runs_the_named_adapter(tiny, active, named):
    """A batch whose rows all name one adapter runs that adapter, whichever is active (eval: every path;
    train: the named adapter is activated), against one full forward per prompt under that adapter."""
    pol, r = _policy(tiny)
    prompts = [(named, r.token_ids[i]) for i in (0, 5, 10)]
    conts = [(k, r.action_ids[k % 2]) for k in range(3)]
    want = []
    with torch.no_grad():
        for (_, tokens), (_, c) in zip(prompts, conts):
            logp, _ = pol.naive_forward(named, list(tokens) + list(c))
            n = len(tokens)
            want.append(logp[n - 1:n - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
    pol.eval()
    pol.activate(active)
    with torch.no_grad():
        got = pol.continuation_logprobs(prompts, conts, values=False)["logp"]
    for k in range(3):
        torch.testing.assert_close(got[k, :len(want[k])], want[k], rtol=1e-5, atol=1e-5)
    if named != BASE:
        pol.train()
        pol.activate(active)
        got = pol.continuation_logprobs(prompts, conts, values=False)["logp"].detach()
        for k in range(3):
            torch.testing.assert_close(got[k, :len(want[k])], want[k], rtol=1e-5, atol=1e-5)


def _loss_and_grads(pol, r, mode, agent="agent_0"):
    g = torch.Generator().manual_seed(0)
    pid = torch.randint(0, 16, (24,), generator=g)
    pid[:6] = pid[0]
    if mode == "constrained":
        kwargs = {"candidates": r.action_ids, "choice": torch.randint(0, 2, (24,), generator=g)}
    else:
        vocab = len(r.tokenizer)
        kwargs = {"responses": [tuple(torch.randint(0, vocab, (int(1 + k % 2),), generator=g).tolist()) for k in range(24)]}
    params = [p for _, p in pol.agent_parameters(agent)]
    out = pol.score_samples(agent, r.token_ids, pid, **kwargs)
    loss = (out["logp"] * torch.linspace(-1, 1, out["logp"].numel()).view_as(out["logp"])).sum() \
        + (out["values"] ** 2).sum() + out["entropy"].sum()
    return out, loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_shared_trunk_equals_the_all_layers_path(tiny, mode, checkpointing):
    """LoRA on the top layer only: the engine runs the frozen lower layer once (shared, no grad) and the top from
    its hidden states; log-probs, values, entropies and gradients equal the whole-decoder path of the same model."""
    pol, r = _policy(tiny, layers=1)
    assert pol.trunk is not None and pol.trunk.split == 1
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in pol.agent_parameters("agent_0") if ".layers." in n}
    assert adapted == {"1"}  # peft adapted the top layer only
    if checkpointing:
        pol.enable_gradient_checkpointing()
    pol.train()
    pol.activate("agent_0")
    fast = _loss_and_grads(pol, r, mode)
    assert pol.trunk.memo  # the trunk's outputs were kept
    trunk, pol.trunk = pol.trunk, None  # the same partial-LoRA model, whole decoder
    slow = _loss_and_grads(pol, r, mode)
    for k in ("logp", "values", "entropy", "mask"):
        torch.testing.assert_close(fast[0][k], slow[0][k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(fast[2], slow[2]))
    assert rel <= 1e-5, rel
    # in eval mode, a mixed batch of both agents and the reference through the trunk equals the whole decoder
    pol.eval()
    prompts = [(a, r.token_ids[i]) for a in ("agent_0", "agent_1", BASE) for i in (0, 7)]
    with torch.no_grad():
        want = pol.candidate_logprobs(prompts, r.action_ids)["seq_logp"]
        pol.trunk = trunk
        got = pol.candidate_logprobs(prompts, r.action_ids)["seq_logp"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("all_dead", [False, True])
def test_cut_illegal_gives_the_full_paths_actions_and_draws(tiny, all_dead):
    """Free mode with ``cut_illegal``: a stand-in policy with known next-token distributions (legal answers, dead
    first tokens, live prefixes that die later; or every first token dead); every action, every legal answer, every
    draw before a cut and the stream left after it equal the full path's; cut rows stop at their dead token and need
    no forwards after it."""
    from lit_moral.games import ILLEGAL
    from lit_moral.rollout import ActionSampler

    _, tok = tiny
    r = PromptRenderer(tok, MatrixGame.from_spec("IPD"))
    (c1, c2, c3, c4), d4 = r.action_ids[0], r.action_ids[1][3]
    vocab = len(tok)
    dead = [t for t in range(100, vocab) if not r.may_become_legal([t]) and not r.may_become_legal([c1, c2, t])][:4]
    assert len(dead) == 4 and r.may_become_legal([c1, c2])

    def dist(prefix):  # log-probs; no end-of-text, so a full row always runs to max_new_tokens
        first = {dead[0]: .5, dead[1]: .5} if all_dead else {c1: .4, dead[0]: .3, dead[1]: .3}
        mass = {(): first, (c1,): {c2: .5, dead[2]: .5}, (c1, c2): {c3: .6, dead[3]: .4},
                (c1, c2, c3): {c4: .5, d4: .5}}.get(tuple(prefix), {t: .01 for t in range(100, 200)})
        p = torch.zeros(vocab)
        p[list(mass)] = torch.tensor(list(mass.values()))
        return (p / p.sum()).log()

    class StandIn(ActionSampler):
        def _resolve(self, keys):
            self.asked = getattr(self, "asked", set()) | set(keys)
            for k in keys:
                self._memo.setdefault(k, (dist(k[2]), torch.tensor(0.0)))

    pid = torch.arange(16).repeat(25)
    out = {}
    for cut in (False, True):
        s = StandIn(None, r, "free", max_new_tokens=4, with_reference=False, cut_illegal=cut)
        g = torch.Generator().manual_seed(3)
        (moves,) = s.act([("agent_0", pid)], g)
        out[cut] = (moves, s.asked, torch.rand(4, generator=g))  # where the stream was left
    (full, full_keys, full_next), (cut, cut_keys, cut_next) = out[False], out[True]
    assert torch.equal(cut.action, full.action) and torch.equal(cut_next, full_next)
    assert {int(a) for a in full.action.unique()} == ({ILLEGAL} if all_dead else {0, 1, ILLEGAL})
    legal = full.action != ILLEGAL
    for j in range(len(pid)):
        f, c = full.responses[j], cut.responses[j]
        assert len(f) == 4 and f[:len(c)] == c
        assert (c == f) if legal[j] else (len(c) < 4 or not r.may_become_legal(c))
        torch.testing.assert_close(torch.stack(list(cut.logp[j])), torch.stack(list(full.logp[j]))[:len(c)])
    assert sum(len(c) < 4 for c in cut.responses) > 100  # the cut happened, at every depth
    assert {len(c) for c in cut.responses} == ({1} if all_dead else {1, 2, 3, 4})
    assert cut_keys < full_keys and all(r.may_become_legal(k[2]) for k in cut_keys)
