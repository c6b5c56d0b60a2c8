"""One frozen base model, one LoRA adapter and one value head per agent, and the forward engine.

The engine computes hidden states for a set of *unique* prompts (each with the adapter to run it
under) and continuations of them, in one batched pass per tree level:

* prompt prefixes shared by several prompts are run once and their key/value cache is reused by
  every prompt below them (a prefix tree of at most ``prefix_levels`` levels);
* continuation tokens (actions, generated tokens) run on the cached prompt;
* the vocabulary projection is applied only at the positions whose log-probs are needed.

Every level is right-padded with an explicit 4D attention mask and explicit position ids, so each
real token sees exactly the tokens it would see in a plain full-sequence forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import DynamicCache

from lit_moral.padding import pad_rows, pad_steps
from lit_moral.prefix_tree import auto_levels, build_prompt_tree
from lit_moral.trunk import TRUNK_MODEL_TYPES, Trunk

BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches: the reference policy


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings (paper: r=64, alpha=32, dropout 0.05, all linear layers).

    Attributes:
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input during updates (duplicates in a batch share one mask).
        target_modules: module names to adapt, or "all-linear".
        layers: adapt only the top ``layers`` decoder layers (peft's ``layers_to_transform``); 0 = all layers.
            With a Llama-family model the layers below carry no adapter, so their outputs are computed once
            per prompt under no_grad and shared by every agent, the reference, the rollout and every update epoch.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    layers: int = 0


class ValueHead(nn.Module):
    """Dropout + linear on the last hidden state (paper section 6)."""

    def __init__(self, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h: [..., H]`` -> ``[...]`` values (computed in float32)."""
        return self.linear(self.dropout(h.float())).squeeze(-1)


@dataclass
class TreeOutput:
    """Hidden states from :meth:`Policy.forward_tree`.

    Attributes:
        prompt_last: ``[U, H]`` hidden state at the last token of each unique prompt.
        cont: ``[N, T, H]`` hidden state at each continuation input token (right-padded).
        cont_len: ``[N]`` number of real continuation input tokens.
    """

    prompt_last: torch.Tensor
    cont: torch.Tensor | None
    cont_len: torch.Tensor | None


class Policy(nn.Module):
    """A frozen causal LM with one LoRA adapter and one value head per agent.

    Args:
        model: a Hugging Face causal LM (its weights are frozen).
        agents: agent names; each is an adapter name and a value-head key.
        lora: LoRA settings shared by all agents.
        value_dropout: dropout in the value heads.
        prefix_levels: levels of the shared-prefix tree (1 = no prefix reuse, 0 = chosen per batch
            as the smallest depth that runs the fewest tokens).
    """

    def __init__(self, model: nn.Module, agents: Sequence[str], lora: LoraSpec | None = None,
                 value_dropout: float = 0.0, prefix_levels: int = 0) -> None:
        super().__init__()
        lora = lora or LoraSpec()
        n_layers = model.config.get_text_config().num_hidden_layers
        if not 0 <= lora.layers <= n_layers:
            raise ValueError(f"lora.layers: got {lora.layers}; the model has {n_layers} decoder layers")
        top = list(range(n_layers - lora.layers, n_layers)) if lora.layers else None
        targets = lora.target_modules
        if top is not None and targets == "all-linear":  # peft takes layers_to_transform with named modules only
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.get_decoder().layers.named_modules()
                              if isinstance(m, nn.Linear)})
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, layers_to_transform=top,
                         target_modules=targets, bias="none", task_type="CAUSAL_LM")
        self.agents = list(agents)
        self.model = get_peft_model(model, cfg, adapter_name=self.agents[0])
        for name in self.agents[1:]:
            self.model.add_adapter(name, cfg)
        hidden = model.config.get_text_config().hidden_size
        self.value_heads = nn.ModuleDict({a: ValueHead(hidden, value_dropout) for a in self.agents})
        self.prefix_levels = prefix_levels
        # Divides every logit (the sampling temperature of action_mode reason; 1 elsewhere): rollout and update
        # log-probs are those of the tempered distribution, as TRL's PPO computes them.
        self.temperature = 1.0
        # Set by gradient checkpointing: update forwards run whole sequences (see _forward_flat).
        self.flat_when_training = False
        self._softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        split = n_layers - lora.layers if lora.layers else 0
        self.trunk = Trunk(self.decoder, split) if split and model.config.model_type in TRUNK_MODEL_TYPES else None

    # ---- adapters from files ----------------------------------------------------------------
    def load_adapter_state(self, agent: str, state: dict[str, torch.Tensor]) -> None:
        """Copy LoRA weights saved in peft's format (``adapter_model.safetensors`` keys, no adapter name) into
        ``agent``'s adapter; every LoRA tensor of the adapter must be in ``state``, with the same shape."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state, adapter_name=agent)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{agent}." in k]
        if missing:
            raise ValueError(f"the saved adapter lacks {len(missing)} LoRA tensors of this model, e.g. {missing[0]}")

    def add_frozen_adapter(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Add an adapter ``name`` (same LoRA settings, no value head, never trained) holding ``state`` (peft
        format), e.g. the format warm-up shown beside the trained agents in an evaluation."""
        if name in self.model.peft_config:
            return
        self.model.add_adapter(name, self.model.peft_config[self.agents[0]])
        self.load_adapter_state(name, state)
        for n, p in self.model.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(False)

    # ---- parameters -------------------------------------------------------------------------
    def agent_parameters(self, agent: str) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of one agent's LoRA weights and value head, selected by name (names as in
        ``Policy.named_parameters``)."""
        lora = [(f"model.{n}", p) for n, p in self.model.named_parameters() if "lora_" in n and f".{agent}." in n]
        head = [(f"value_heads.{agent}.{n}", p) for n, p in self.value_heads[agent].named_parameters()]
        return lora + head

    def base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"model.{n}", p) for n, p in self.model.named_parameters() if "lora_" not in n]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute decoder layers in the backward pass (large models); update forwards then run whole
        sequences instead of the prefix tree, since checkpointed layers drop KV caches."""
        base = self.model.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name (the old one warns)
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.flat_when_training = True

    def activate(self, agent: str) -> None:
        """Make ``agent`` the active adapter (peft also makes only its LoRA weights trainable)."""
        self.model.set_adapter(agent)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_base_model().get_decoder()

    # ---- engine -----------------------------------------------------------------------------
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary projection of selected hidden states ``[..., H]`` -> ``[..., V]`` float32."""
        logits = self.lm_head(h).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits / self.temperature if self.temperature != 1.0 else logits

    def extend(self, tokens: list[list[int]], adapters: list[str], cache: DynamicCache | None = None,
               past_mask: torch.Tensor | None = None, past_len: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Run right-padded rows of ``tokens`` (row i under ``adapters[i]``) on top of ``cache`` (rows already
        selected to these rows) through the whole decoder.

        Returns:
            ``(hidden [B, T, H], cache, key mask [B, K], lengths so far [B])``; pass the last three back to extend
            the same rows (cache-based generation, :mod:`lit_moral.generate`).
        """
        return self._run_level(tokens, adapters, cache, past_mask, past_len)

    def _run_level(self, tokens: list[list[int]], adapters: list[str], cache: DynamicCache | None,
                   past_mask: torch.Tensor | None, past_len: torch.Tensor | None, embeds: list | None = None,
                   decoder: nn.Module | None = None) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Run one right-padded level on top of ``cache`` (already selected to these rows), through ``decoder``
        (default: the whole decoder), from token ids or, for the top of a shared trunk, from ``embeds``
        (per row ``[len, H]`` trunk hidden states)."""
        device = self.lm_head.weight.device
        n, t = len(tokens), max(len(x) for x in tokens)
        ids = torch.zeros(n, t, dtype=torch.long, device=device)
        own = torch.zeros(n, t, dtype=torch.bool, device=device)
        for i, x in enumerate(tokens):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            own[i, :len(x)] = True
        lens = own.sum(1)
        start = past_len if past_len is not None else torch.zeros(n, dtype=torch.long, device=device)
        pos = start[:, None] + torch.arange(t, device=device)[None]
        key_mask = own if past_mask is None else torch.cat([past_mask, own], 1)
        p = key_mask.shape[1] - t
        causal = torch.arange(key_mask.shape[1], device=device)[None, :] <= (p + torch.arange(t, device=device))[:, None]
        keep = key_mask[:, None, None, :] & causal[None, None]
        dtype = self.lm_head.weight.dtype
        mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        net = decoder or self.decoder
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        kwargs[_cache_name(type(net))] = cache
        if embeds is not None:  # the top layers of a shared trunk: inputs are the trunk's hidden states
            kwargs["inputs_embeds"] = torch.stack([pad_steps(e.T, t).T for e in embeds])
            del kwargs["input_ids"]
        # The frozen trunk holds no adapter: it runs as is, whatever the mode.
        context = contextlib.nullcontext() if self.trunk is not None and decoder is self.trunk.bottom else \
            self._adapters(adapters)
        with context:
            out = net(**kwargs)
        return out.last_hidden_state, out[_cache_name(type(net))], key_mask, start + lens

    def _adapters(self, adapters: Sequence[str]):
        """Run each row under its named adapter, whatever adapter happens to be active.

        In eval mode every batch (mixed or not) goes through peft's per-row adapter hooks, BASE rows with no
        adapter. In train mode peft allows one adapter per batch: that adapter is activated if it is not.
        """
        names = list(adapters)
        if not self.training:
            return self.model.base_model._enable_peft_forward_hooks(adapter_names=names)
        if len(set(names)) > 1 or names[0] == BASE:
            raise ValueError(f"a training forward runs one agent's adapter; got {sorted(set(names))}")
        if self.model.active_adapter != names[0]:
            self.activate(names[0])
        return contextlib.nullcontext()

    def forward_tree(self, prompts: Sequence[tuple[str, Sequence[int]]],
                     conts: Sequence[tuple[int, Sequence[int]]] = ()) -> TreeOutput:
        """Hidden states for unique prompts and continuation inputs.

        Args:
            prompts: unique ``(adapter, token ids)``; adapter is an agent name or ``BASE``. In train
                mode all prompts must use the active adapter (peft allows mixed batches in eval only).
            conts: ``(prompt index, input token ids)``; each row's tokens are fed after its prompt.
                Rows may be empty (then ``cont_len`` is 0 and only ``prompt_last`` is meaningful).

        Returns:
            A :class:`TreeOutput`.
        """
        if self.flat_when_training and self.training and torch.is_grad_enabled():
            return self._forward_flat(prompts, conts)
        trunk = self.trunk.hidden(self, prompts, conts) if self.trunk is not None else None
        depth = self.prefix_levels or auto_levels(prompts)
        levels, leaf = build_prompt_tree(prompts, min(depth, min(len(t) for _, t in prompts)))
        levels = [lv for lv in levels if lv.tokens]
        cache = mask = plen = h = None
        decoder = self.trunk.top if trunk is not None else None
        for d, lv in enumerate(levels):
            if d > 0:
                idx = torch.tensor(lv.parent, device=self.lm_head.weight.device)
                cache.batch_select_indices(idx)
                mask, plen = mask[idx], plen[idx]
            embeds = None if trunk is None else [
                trunk[tuple(prompts[i][1])][start:start + len(tok)] for (i, start), tok in zip(lv.source, lv.tokens)]
            h, cache, mask, plen = self._run_level(lv.tokens, lv.adapter, cache, mask, plen, embeds, decoder)
        last = levels[-1]
        lens = torch.tensor([len(x) for x in last.tokens], device=h.device)
        leaf_t = torch.tensor(leaf, device=h.device)
        prompt_last = h[leaf_t, lens[leaf_t] - 1]
        rows = [(i, list(t)) for i, t in conts if len(t) > 0]
        if not rows:
            zero = torch.zeros(len(conts), dtype=torch.long, device=h.device)
            return TreeOutput(prompt_last, None, zero if conts else None)
        # Continuations: only non-empty rows run; empty rows get zero-length entries.
        sel = torch.tensor([leaf[i] for i, _ in rows], device=h.device)
        cache.batch_select_indices(sel)
        embeds = None if trunk is None else [trunk[(tuple(prompts[i][1]), tuple(t))] for i, t in rows]
        hc, _, _, _ = self._run_level([t for _, t in rows], [prompts[i][0] for i, _ in rows], cache,
                                      mask[sel], plen[sel], embeds, decoder)
        cont_h = hc.new_zeros(len(conts), hc.shape[1], hc.shape[2])
        nonempty = torch.tensor([k for k, (_, t) in enumerate(conts) if len(t) > 0], device=h.device)
        cont_h = cont_h.index_copy(0, nonempty, hc)
        cont_len = torch.tensor([len(t) for _, t in conts], device=h.device)
        return TreeOutput(prompt_last, cont_h, cont_len)

    def _forward_flat(self, prompts: Sequence[tuple[str, Sequence[int]]],
                      conts: Sequence[tuple[int, Sequence[int]]]) -> TreeOutput:
        """``forward_tree`` without key/value reuse: one pass over each whole (prompt + continuation).

        Used for updates under gradient checkpointing, because transformers' checkpointed layers drop
        any KV cache (``GradientCheckpointingLayer``). Deduplication and the selective vocabulary
        projection still apply; prefix sharing does not.
        """
        seqs = [(prompts[i][0], list(prompts[i][1]) + list(c)) for i, c in conts]
        first_row = {i: k for k, (i, _) in reversed(list(enumerate(conts)))}
        alone = [i for i in range(len(prompts)) if i not in first_row]
        for i in alone:
            first_row[i] = len(seqs)
            seqs.append((prompts[i][0], list(prompts[i][1])))
        embeds = decoder = None
        if self.trunk is not None:
            trunk, decoder = self.trunk.hidden(self, prompts, conts), self.trunk.top
            def full(k: int, i: int) -> torch.Tensor:  # trunk hidden states of row k: its prompt, then its continuation
                p = tuple(prompts[i][1])
                c = tuple(conts[k][1]) if k < len(conts) else ()
                return torch.cat([trunk[p], trunk[(p, c)]]) if c else trunk[p]

            embeds = [full(k, i) for k, i in enumerate([i for i, _ in conts] + alone)]
        h, _, _, _ = self._run_level([t for _, t in seqs], [a for a, _ in seqs], None, None, None, embeds, decoder)
        dev = h.device
        plen = torch.tensor([len(t) for _, t in prompts], device=dev)
        rows = torch.tensor([first_row[i] for i in range(len(prompts))], device=dev)
        prompt_last = h[rows, plen - 1]
        if not conts:
            return TreeOutput(prompt_last, None, None)
        cont_len = torch.tensor([len(c) for _, c in conts], device=dev)
        t = int(cont_len.max())
        if t == 0:
            return TreeOutput(prompt_last, None, cont_len)
        start = plen[torch.tensor([i for i, _ in conts], device=dev)]
        pos = (start[:, None] + torch.arange(t, device=dev)[None]).clamp(max=h.shape[1] - 1)
        cont_h = h[torch.arange(len(conts), device=dev)[:, None], pos]
        cont_h = cont_h * (torch.arange(t, device=dev)[None] < cont_len[:, None])[..., None]
        return TreeOutput(prompt_last, cont_h, cont_len)

    def values(self, h: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
        """Values of hidden states ``h: [N, ..., H]``, row i through the value head of ``adapters[i]``."""
        out = h.new_zeros(h.shape[:-1], dtype=torch.float32)
        for a in set(adapters):
            if a not in self.value_heads:  # BASE, or a frozen adapter without a head
                continue
            idx = torch.tensor([i for i, x in enumerate(adapters) if x == a], device=h.device)
            out = out.index_copy(0, idx, self.value_heads[a](h[idx]))
        return out

    def continuation_logprobs(self, prompts: Sequence[tuple[str, Sequence[int]]],
                              conts: Sequence[tuple[int, Sequence[int]]], *, entropy: bool = False,
                              values: bool = True, next_token: bool = False) -> dict[str, torch.Tensor]:
        """Per-token log-probs (full vocabulary) of continuation tokens after their prompts.

        Args:
            prompts: unique ``(adapter, token ids)``.
            conts: ``(prompt index, tokens)``: the log-prob of every token is computed; rows need >= 1
                token unless ``next_token``.
            entropy: also return the full-vocabulary entropy at each scored position.
            values: also return the value (row's own head) at each scored position.
            next_token: also return the next-token log-probs after each whole continuation.

        Returns:
            ``logp [N, T]``, ``mask [N, T]`` and optionally ``entropy [N, T]``, ``values [N, T]``,
            ``next_logp [N, V]``; position t predicts token t.
        """
        n = len(conts)
        t = max(len(c) for _, c in conts)
        feed = [(i, list(c) if next_token else list(c)[:-1]) for i, c in conts]
        tree = self.forward_tree(prompts, feed)
        p_idx = torch.tensor([i for i, _ in conts], device=tree.prompt_last.device)
        first = tree.prompt_last[p_idx]  # predicts token 0
        width = t + 1 if next_token else t
        hs = [first[:, None]]
        if tree.cont is not None and tree.cont.shape[1] > 0:
            hs.append(tree.cont[:, : width - 1])
        h = torch.cat(hs, 1)
        if h.shape[1] < width:
            h = torch.cat([h, h.new_zeros(n, width - h.shape[1], h.shape[2])], 1)
        lens = torch.tensor([len(c) for _, c in conts], device=h.device)
        tok = torch.zeros(n, max(t, 1), dtype=torch.long, device=h.device)
        for k, (_, c) in enumerate(conts):
            tok[k, :len(c)] = torch.tensor(list(c), dtype=torch.long)
        mask = torch.arange(max(t, 1), device=h.device)[None] < lens[:, None]
        scored = h[:, :t] if t > 0 else h[:, :0]
        out: dict[str, torch.Tensor] = {"mask": mask[:, :t]}
        if t > 0:
            logits = self.logits(scored)
            logp_all = torch.log_softmax(logits, -1)
            out["logp"] = logp_all.gather(-1, tok[:, :t, None]).squeeze(-1) * mask[:, :t]
            if entropy:
                out["entropy"] = -(logp_all.exp() * logp_all).sum(-1) * mask[:, :t]
        if values:
            adapters = [prompts[i][0] for i, _ in conts]
            out["values"] = self.values(scored, adapters) * mask[:, :t] if t > 0 else None
            out["prompt_values"] = self.values(first, adapters)
        if next_token:
            h_next = h[torch.arange(n, device=h.device), lens]
            out["next_logp"] = torch.log_softmax(self.logits(h_next), -1)
            if values:
                out["next_values"] = self.values(h_next, [prompts[i][0] for i, _ in conts])
        return out

    def candidate_logprobs(self, prompts: Sequence[tuple[str, Sequence[int]]],
                           candidates: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Whole-string log-probs of each candidate after each unique prompt (protocol section 9).

        Returns:
            ``seq_logp [U, K]`` (full-vocabulary log-prob of each candidate's token string) and
            ``values [U]`` (value at the last prompt token; 0 for BASE rows).
        """
        k = len(candidates)
        conts = [(u, candidates[j]) for u in range(len(prompts)) for j in range(k)]
        out = self.continuation_logprobs(prompts, conts)
        seq = out["logp"].sum(-1).view(len(prompts), k)
        return {"seq_logp": seq, "values": out["prompt_values"].view(len(prompts), k)[:, 0]}

    def score_samples(self, agent: str, prompt_table: Sequence[Sequence[int]], pid: torch.Tensor, *,
                      candidates: Sequence[Sequence[int]] | None = None, choice: torch.Tensor | None = None,
                      responses: Sequence[Sequence[int]] | None = None, naive: bool = False,
                      ) -> dict[str, torch.Tensor]:
        """Log-probs, values and entropies of sampled actions under ``agent`` (with gradient if enabled).

        Constrained mode (``candidates`` and ``choice`` given): one step per sample, the policy being the
        distribution over the candidate strings renormalised to sum to 1. Free mode (``responses``):
        one step per generated token, full vocabulary.

        Identical (prompt, response) samples are computed once and scattered back (exact without
        dropout; with dropout, duplicates share one mask). ``naive=True`` runs the obvious path instead:
        one full forward per sample with full-sequence, full-vocabulary logits, for tests and benchmarks.

        Args:
            agent: adapter / value-head name (must be the active adapter in train mode).
            prompt_table: token ids by prompt id.
            pid: ``[n]`` prompt id of each sample.
            candidates: the legal action strings' token ids, C first.
            choice: ``[n]`` index of the sampled candidate.
            responses: ``n`` generated token sequences.

        Returns:
            ``logp, values, entropy, mask``: ``[n, T]``.
        """
        if naive:
            return self._score_naive(agent, prompt_table, pid, candidates, choice, responses)
        pids = pid.tolist()
        if candidates is not None:
            uniq = sorted(set(pids))
            where = {p: i for i, p in enumerate(uniq)}
            out = self.candidate_logprobs([(agent, prompt_table[p]) for p in uniq], candidates)
            logq = torch.log_softmax(out["seq_logp"], -1)
            u = torch.tensor([where[p] for p in pids], device=logq.device)
            logp = logq[u].gather(1, choice.to(logq.device)[:, None])
            ent = -(logq.exp() * logq).sum(-1)[u][:, None]
            mask = torch.ones_like(logp, dtype=torch.bool)
            return {"logp": logp, "values": out["values"][u][:, None], "entropy": ent, "mask": mask}
        keys = [(p, tuple(r)) for p, r in zip(pids, responses)]
        uniq_keys = sorted(set(keys))
        uniq_p = sorted({p for p, _ in uniq_keys})
        where_p = {p: i for i, p in enumerate(uniq_p)}
        where_k = {k: i for i, k in enumerate(uniq_keys)}
        out = self.continuation_logprobs([(agent, prompt_table[p]) for p in uniq_p],
                                         [(where_p[p], r) for p, r in uniq_keys], entropy=True)
        u = torch.tensor([where_k[k] for k in keys], device=out["logp"].device)
        return {"logp": out["logp"][u], "values": out["values"][u], "entropy": out["entropy"][u],
                "mask": out["mask"][u]}

    def naive_forward(self, adapter: str, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The obvious path for one sequence: full forward, full-vocabulary log-probs at every position.

        Returns:
            ``(logp [L, V], value [L])`` (values 0 for BASE).
        """
        ids = torch.tensor([list(tokens)], device=self.lm_head.weight.device)
        if adapter == BASE:
            with self.model.disable_adapter():
                out = self.model(input_ids=ids, output_hidden_states=True)
            return torch.log_softmax(out.logits[0].float() / self.temperature, -1), torch.zeros(ids.shape[1])
        self.activate(adapter)
        out = self.model(input_ids=ids, output_hidden_states=True)
        return (torch.log_softmax(out.logits[0].float() / self.temperature, -1),
                self.value_heads[adapter](out.hidden_states[-1][0]))

    def _score_naive(self, agent, prompt_table, pid, candidates, choice, responses) -> dict[str, torch.Tensor]:
        """The obvious path: per-sample full forwards, full-vocabulary logits at every position."""
        self.activate(agent)
        rows_logp, rows_val, rows_ent = [], [], []
        device = self.lm_head.weight.device
        for k, p in enumerate(pid.tolist()):
            prompt = list(prompt_table[p])
            seqs = [list(c) for c in candidates] if candidates is not None else [list(responses[k])]
            logps, ents, vals = [], [], []
            for seq in seqs:
                ids = torch.tensor([prompt + seq], device=device)
                out = self.model(input_ids=ids, output_hidden_states=True)
                logits = out.logits[0].float() / self.temperature
                lp_all = torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(seq) - 1], -1)
                logps.append(lp_all.gather(-1, torch.tensor(seq, device=device)[:, None]).squeeze(-1))
                ents.append(-(lp_all.exp() * lp_all).sum(-1))
                hs = out.hidden_states[-1][0, len(prompt) - 1: len(prompt) + len(seq) - 1]
                vals.append(self.value_heads[agent](hs))
            if candidates is not None:
                logq = torch.log_softmax(torch.stack([x.sum() for x in logps]), -1)
                rows_logp.append(logq[int(choice[k])].view(1))
                rows_ent.append((-(logq.exp() * logq).sum()).view(1))
                rows_val.append(vals[0][:1])
            else:
                rows_logp.append(logps[0])
                rows_ent.append(ents[0])
                rows_val.append(vals[0])
        logp, mask = pad_rows(rows_logp)
        return {"logp": logp, "values": pad_rows(rows_val)[0], "entropy": pad_rows(rows_ent)[0], "mask": mask}


@functools.cache
def _cache_name(decoder_type: type) -> str:
    """The key/value cache's keyword (and output field): ``cache`` since transformers 5.x renamed it, the old
    ``past_key_values`` before (which 5.x still takes, with a deprecation warning on every run)."""
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"
