"""Batched, KV-cached sampling of long answers (``action_mode: reason``), with per-token log-probs and values.

One call generates for every row at once (all games of a round, all agents, each row under its own adapter in one
mixed-adapter batch): the distinct prompts run once, their key/value cache is copied to the rows that share them,
and each step feeds one token per unfinished row on top of the cache; rows that emitted EOS leave the batch. Each
step records the sampled token, its log-prob under the policy (full vocabulary, at the policy's temperature), the
value and the entropy at the position that predicted it, exactly what :meth:`Policy.score_samples` recomputes in
the update (position ``t`` predicts token ``t``).

``cached=False`` is the obvious path for tests: every step reruns each row's whole sequence from scratch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lit_moral.policy import BASE, Policy


@dataclass
class Generated:
    """Per-row results of :func:`generate`: ``tokens`` (ids, EOS included when emitted) and ``[T_i]`` tensors
    ``logp``, ``values``, ``entropy`` (CPU)."""

    tokens: list[list[int]]
    logp: list[torch.Tensor]
    values: list[torch.Tensor]
    entropy: list[torch.Tensor]


def sample_next(logp: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """``[B]`` tokens drawn from ``logp [B, V]`` (nucleus-truncated to ``top_p``) by inverting the CDF at one
    uniform draw per row, so equal distributions give equal tokens whatever computed them."""
    probs = logp.float().exp()
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator).to(cdf.device) * cdf[:, -1:]
    j = torch.searchsorted(cdf, u).clamp(max=probs.shape[1] - 1)
    return (j if order is None else order.gather(1, j)).squeeze(1)


def _step_outputs(policy: Policy, h: torch.Tensor, adapters: list[str]) -> tuple[torch.Tensor, ...]:
    """``(logp [B, V], values [B], entropy [B])`` at hidden states ``h [B, H]``."""
    lp = torch.log_softmax(policy.logits(h), -1)
    return lp, policy.values(h, adapters), -(lp.exp() * lp).sum(-1)


def _assemble(steps: list[tuple], n: int) -> Generated:
    """Per-row sequences from per-step ``(row ids, tokens, logp, values, entropy)`` of the rows alive then."""
    tok, lp, val, ent = ([[] for _ in range(n)] for _ in range(4))
    for rows, t, lps, v, e in steps:
        for k, r in enumerate(rows):
            tok[r].append(int(t[k]))
            lp[r].append(lps[k])
            val[r].append(v[k])
            ent[r].append(e[k])
    stack = lambda xs: [torch.stack(x).cpu() for x in xs]  # noqa: E731
    return Generated(tok, stack(lp), stack(val), stack(ent))


@torch.no_grad()
def generate(policy: Policy, rows: Sequence[tuple[str, Sequence[int]]], max_new_tokens: int, eos: int | None,
             generator: torch.Generator, top_p: float = 1.0, cached: bool = True,
             stop: Callable[[list[int]], bool] | None = None) -> Generated:
    """Sample up to ``max_new_tokens`` tokens after each row's prompt (policy in eval mode).

    Args:
        policy: the Policy; ``policy.temperature`` scales the logits.
        rows: ``(adapter, prompt token ids)`` per row (agent names; ``BASE`` for the adapter-disabled model).
        max_new_tokens: generation length limit.
        eos: the token that ends a row (kept in its tokens), or None.
        generator: the sampling stream (one uniform per alive row and step).
        top_p: nucleus sampling mass (1 = the full distribution).
        cached: False runs the obvious path (whole sequences each step, no cache).
        stop: a row also ends once ``stop(its tokens so far)`` is true (e.g. a completed ``Action:`` line).
    """
    if not cached:
        return _generate_uncached(policy, rows, max_new_tokens, eos, generator, top_p, stop)
    uniq = sorted({(a, tuple(t)) for a, t in rows})
    where = {k: i for i, k in enumerate(uniq)}
    h, cache, mask, plen = policy.extend([list(t) for _, t in uniq], [a for a, _ in uniq])
    dev = h.device
    lens = torch.tensor([len(t) for _, t in uniq], device=dev)
    idx = torch.tensor([where[(a, tuple(t))] for a, t in rows], device=dev)
    last = h[torch.arange(len(uniq), device=dev), lens - 1][idx]
    cache.batch_select_indices(idx)
    mask, plen = mask[idx], plen[idx]
    alive, adapters, steps = list(range(len(rows))), [a for a, _ in rows], []
    resp = [[] for _ in rows]
    for step in range(max_new_tokens):
        names = [adapters[r] for r in alive]
        lp, val, ent = _step_outputs(policy, last, names)
        tok = sample_next(lp, top_p, generator)
        steps.append((alive, tok.tolist(), lp.gather(1, tok[:, None]).squeeze(1), val, ent))
        keep = _still_going(alive, tok.tolist(), resp, eos, stop)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(alive):
            sel = torch.tensor(keep, device=dev)
            cache.batch_select_indices(sel)
            mask, plen, tok = mask[sel], plen[sel], tok[sel]
            alive = [alive[k] for k in keep]
        h, cache, mask, plen = policy.extend([[t] for t in tok.tolist()], [adapters[r] for r in alive], cache,
                                             mask, plen)
        last = h[:, 0]
    return _assemble(steps, len(rows))


def _still_going(alive: list[int], tokens: list[int], resp: list[list[int]], eos: int | None,
                 stop: Callable[[list[int]], bool] | None) -> list[int]:
    """Append each alive row's new token to ``resp``; the positions (in ``alive``) of the rows that go on."""
    keep = []
    for k, (r, t) in enumerate(zip(alive, tokens)):
        resp[r].append(t)
        if t != eos and (stop is None or not stop(resp[r])):
            keep.append(k)
    return keep


def _generate_uncached(policy, rows, max_new_tokens, eos, generator, top_p, stop=None) -> Generated:
    """The obvious path: each step, one full forward per alive row over its prompt and tokens so far."""
    resp = [[] for _ in rows]
    alive, steps = list(range(len(rows))), []
    for _ in range(max_new_tokens):
        outs = [policy.naive_forward(rows[r][0], list(rows[r][1]) + resp[r]) for r in alive]
        lp = torch.stack([o[0][-1] for o in outs])
        val = torch.stack([o[1][-1] for o in outs])
        tok = sample_next(lp, top_p, generator)
        steps.append((alive, tok.tolist(), lp.gather(1, tok[:, None]).squeeze(1), val, -(lp.exp() * lp).sum(-1)))
        alive = [alive[k] for k in _still_going(alive, tok.tolist(), resp, eos, stop)]
        if not alive:
            break
    return _assemble(steps, len(rows))


@torch.no_grad()
def reference_logprobs(policy: Policy, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       chunk: int = 16) -> list[torch.Tensor]:
    """``[T_i]`` per-token log-probs of each response under the adapter-disabled base (the KL reference), in
    chunks of ``chunk`` rows (a chunk holds ``[chunk, T, V]`` logits); distinct prompts run once per chunk."""
    out: list[torch.Tensor] = []
    for k in range(0, len(prompts), chunk):
        part = list(zip(prompts[k:k + chunk], responses[k:k + chunk]))
        uniq = sorted({tuple(p) for p, _ in part})
        where = {p: i for i, p in enumerate(uniq)}
        res = policy.continuation_logprobs([(BASE, list(p)) for p in uniq], [(where[tuple(p)], list(r)) for p, r in part],
                                           values=False)
        out += [res["logp"][i, :len(r)].cpu() for i, (_, r) in enumerate(part)]
    return out


__all__ = ["Generated", "generate", "reference_logprobs", "sample_next"]
