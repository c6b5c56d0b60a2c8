"""The frozen trunk of a partial-LoRA model, computed once per distinct token sequence and shared.

With LoRA on the top decoder layers only (``lora.layers``), the layers below carry no adapter: their outputs are
the same for every agent and for the reference (adapter-disabled) model, and they never change during training.
:class:`Trunk` computes them once per distinct prompt (and continuation), under no_grad and through the same
prefix tree as the engine, and keeps them; :class:`lit_moral.policy.Policy` then runs only the top layers, from
those hidden states, for the rollout, the reference and every update epoch.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_moral.prefix_tree import auto_levels, build_prompt_tree

BASE = "__base__"  # as lit_moral.policy.BASE: no adapter (the trunk has none anyway)


# Models whose decoder can be run from hidden states (``inputs_embeds`` is used as the layers' input as is): the
# shared trunk splits them at a layer. Gemma's decoders scale their input embeddings, so they run whole.
TRUNK_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_TRUNK_MEMO = 4096  # distinct sequences whose trunk outputs are kept (the 2-token modes have a few dozen)


class Trunk:
    """The frozen lower layers of a partial-LoRA model, computed once per distinct token sequence.

    With LoRA on the top ``L - split`` layers only, layers ``0 .. split-1`` (and the embeddings) are the same for
    every agent and the reference, and do not change during training: their output at every position of a prompt
    (and of a continuation after it) is computed once under no_grad, through the same prefix tree, and kept; the
    engine then runs only the top layers, from those hidden states, with gradient when training.

    Attributes:
        split: the first adapted layer. bottom, top: views of the decoder holding layers below / from ``split``
            (sharing their modules and weights; not registered, so parameters are not counted twice).
    """

    def __init__(self, decoder: nn.Module, split: int) -> None:
        import copy

        self.split = split
        self.bottom, self.top = copy.copy(decoder), copy.copy(decoder)
        for view, layers, norm in ((self.bottom, decoder.layers[:split], nn.Identity()),
                                   (self.top, decoder.layers[split:], decoder.norm)):
            view._modules = dict(decoder._modules)
            view._modules["layers"], view._modules["norm"] = nn.ModuleList(list(layers)), norm
        self.memo: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def hidden(self, policy, prompts, conts) -> dict[tuple, torch.Tensor]:
        """``memo`` after computing what is missing: prompt tokens -> ``[L, H]``, (prompt, continuation) -> ``[T, H]``."""
        want_p = {tuple(t) for _, t in prompts}
        want_c = {(tuple(prompts[i][1]), tuple(c)) for i, c in conts if len(c)}
        missing_c = sorted(k for k in want_c if k not in self.memo)
        missing_p = sorted({p for p in want_p if p not in self.memo} | {p for p, _ in missing_c})
        if missing_p:
            if len(self.memo) > _TRUNK_MEMO:
                self.memo.clear()
                return self.hidden(policy, prompts, conts)
            self._compute(policy, missing_p, missing_c)
        return self.memo

    def _compute(self, policy, prompts: list[tuple], conts: list[tuple]) -> None:
        tree_prompts = [(BASE, list(p)) for p in prompts]
        levels, leaf = build_prompt_tree(tree_prompts, min(auto_levels(tree_prompts), min(len(p) for p in prompts)))
        levels = [lv for lv in levels if lv.tokens]
        cache = mask = plen = None
        hs = []
        for d, lv in enumerate(levels):
            if d > 0:
                idx = torch.tensor(lv.parent, device=policy.lm_head.weight.device)
                cache.batch_select_indices(idx)
                mask, plen = mask[idx], plen[idx]
            h, cache, mask, plen = policy._run_level(lv.tokens, lv.adapter, cache, mask, plen, decoder=self.bottom)
            hs.append(h)
        for i, p in enumerate(prompts):  # each prompt's hidden states: its path of nodes, top to bottom
            row, parts = leaf[i], []
            for d in range(len(levels) - 1, -1, -1):
                parts.append(hs[d][row, :len(levels[d].tokens[row])])
                row = levels[d].parent[row]
            self.memo[p] = torch.cat(parts[::-1])
        if conts:
            where = {p: i for i, p in enumerate(prompts)}
            sel = torch.tensor([leaf[where[p]] for p, _ in conts], device=policy.lm_head.weight.device)
            cache.batch_select_indices(sel)
            hc, _, _, _ = policy._run_level([list(c) for _, c in conts], [BASE] * len(conts), cache, mask[sel],
                                            plen[sel], decoder=self.bottom)
            for k, key in enumerate(conts):
                self.memo[key] = hc[k, :len(key[1])]
