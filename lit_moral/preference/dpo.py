"""DPO: agent_0's LoRA adapter trained on preference pairs, with the adapter-disabled base as the reference.

The preference route of protocol section 11 without a reward model (Rafailov et al. 2023): for each pair, the
whole-answer log-probs (sum over the answer's tokens, full vocabulary, after the RL runs' prompt) of the chosen
and rejected action strings under agent_0 and under the base with adapters disabled (the same reference as
PPO's KL penalty, also when the adapter starts from ``init_adapter``), and the loss
``-log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))`` (:func:`lit_moral.preference.losses.dpo_loss`).
The reference log-probs are computed once (the base is frozen).

Run it with ``python -m lit_moral dpo --config configs/dpo_deontological.yaml``. Like ``fit`` it writes
``<run>/checkpoints/last.ckpt`` and ``<run>/adapters/agent_0/`` (peft format, with ``lit_moral.json`` for
:meth:`lit_moral.agent.Agent.load`), and ``<run>/pairs.jsonl``: the pairs it trained on. The checkpoint reads as
a one-agent MoralPPO checkpoint: the same LoRA keys (``policy.model....lora_A.agent_0.weight``), hyperparameters
that are all MoralPPO arguments (model, dtype, agents, game, actions, action_mode, lora, lr, seed, run_name,
system_prompt, init_adapter) and MoralPPO's ``lit_moral`` section (fingerprint, zero counters), so
``python -m lit_moral test --config <a PPO config> --ckpt_path <it>`` and ``python -m lit_moral evaluate``
evaluate it as they evaluate a PPO agent. DPO's own settings (beta, pairs, batch_size) are in the run's
``config.yaml`` and in ``checkpoint["lit_moral"]["dpo"]``.

TensorBoard, every step (the batch's pairs): ``dpo/loss/agent_0``, ``dpo/accuracy/agent_0`` (share of pairs whose
chosen answer has the higher implicit reward; equal counts 1/2), ``dpo/margin/agent_0`` (implicit reward of chosen
minus rejected), ``dpo/reward_chosen/agent_0``, ``dpo/reward_rejected/agent_0`` (``beta * (logp - ref)``),
``dpo/logp_chosen/agent_0``, ``dpo/logp_rejected/agent_0``, ``dpo/legal_mass/agent_0`` (probability of the two
strings at all: DPO can lower both, which matters in free mode) and ``dpo/kl_choice/agent_0``: the **exact** KL
from the base of the choice between the two strings renormalised (the constrained-mode policy; not a
full-vocabulary or sampled estimate). The same means over *all* training pairs, at step 0 and after every
epoch: ``pairs/<name>/agent_0``; and ``dpo/p_c/<state>/agent_0``: P(C's string | state) renormalised, over the
four option orders, in the run's game.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from lit_moral import models
from lit_moral.adapters import read_adapter
from lit_moral.callbacks import AdapterExport
from lit_moral.errors import ConfigError, check_choice, check_positive
from lit_moral.policy import BASE, LoraSpec, Policy
from lit_moral.preference.losses import choice_kl, dpo_loss
from lit_moral.preference.pairs import STATES, PairConfig, labeller_name, write_pairs
from lit_moral.preference.training import PairTrainer
from lit_moral.prompts import N_PROMPT_IDS, prompt_bits

# MoralPPO has no such arguments: kept out of the hyperparameters so that the checkpoint parses as MoralPPO's.
OWN_SETTINGS = ("beta", "pairs", "batch_size")


class DPO(PairTrainer):
    """agent_0's LoRA adapter trained with DPO on preference pairs, against the adapter-disabled base.

    Args:
        model: model spec (as MoralPPO's).
        dtype: weights dtype.
        agents: None or ``[{name: agent_0}]``: DPO trains agent_0 (kept for readers of the checkpoint, which see it
            as a one-agent MoralPPO's).
        game: the game of the labeller's pairs (unless ``pairs.games``) and the game the agent is evaluated on.
        actions: the two action strings, C first (the labeller's pairs use them; a file's pairs carry their own).
        action_mode: the action mode of the PPO runs the agent is compared with (recorded in the checkpoint, where the
            evaluation reads it); DPO trains whole-string log-probs either way.
        lora: LoRA settings (as the PPO runs compared with, and as ``init_adapter``'s).
        lr: Adam learning rate.
        beta: DPO's inverse temperature: the implicit reward is ``beta * (logp - ref)``.
        pairs: where the pairs come from: the moral labeller (reward, opponent model, ties, noise, budget) or a file.
        batch_size: pairs per optimizer step; an epoch is one pass over the pairs.
        seed: seed of the labeller's and the batch order's streams (the CLI links it to ``seed_everything``).
        run_name: name used for the checkpoint folder.
        system_prompt: as MoralPPO's (None: no system turn).
        init_adapter: start agent_0 from this saved adapter (a peft folder or lit_moral ``.ckpt``, e.g. a Game-trained
            agent to unlearn); the reference stays the adapter-disabled base.
    """

    kind = "dpo"
    section = "dpo"
    adapter = "agent_0"

    def __init__(self, model: str = models.SMOLLM2, dtype: str = "float32", agents: list[dict] | None = None,
                 game: str | list = "IPD", actions: tuple[str, str] = ("action1", "action2"),
                 action_mode: Literal["constrained", "free"] = "constrained",
                 lora: LoraSpec = LoraSpec(),  # noqa: B008 - frozen: safe, and jsonargparse documents its fields
                 lr: float = 1e-4, beta: float = 0.1,
                 pairs: PairConfig = PairConfig(),  # noqa: B008 - frozen, as lora
                 batch_size: int = 32, seed: int | None = 0, run_name: str = "dpo", system_prompt: str | None = None,
                 init_adapter: str | None = None) -> None:
        super().__init__()
        seed = self.resolve_seed(seed)
        self.save_hyperparameters(ignore=list(OWN_SETTINGS))
        names = [a.get("name") if isinstance(a, dict) else getattr(a, "name", a) for a in (agents or [])]
        if agents is not None and names != ["agent_0"]:
            raise ConfigError(f"agents: DPO trains one agent, agent_0; got {names!r} (leave agents out)")
        check_choice("action_mode", action_mode, ("constrained", "free"))
        check_positive("beta", beta)
        self.beta = float(beta)
        self._setup(model=model, dtype=dtype, lora=lora, game=game, actions=actions, system_prompt=system_prompt,
                    pairs=pairs, batch_size=batch_size, lr=lr, seed=seed, init_adapter=init_adapter)
        self.agent_names = [self.adapter]
        self._ref: torch.Tensor | None = None

    def build_policy(self, base) -> Policy:
        policy = Policy(base, [self.adapter], self.lora)
        if self.hparams.init_adapter:
            policy.load_adapter_state(self.adapter, read_adapter(self.hparams.init_adapter))
        return policy

    def configure_optimizers(self):
        return torch.optim.Adam([p for n, p in self.policy.agent_parameters(self.adapter) if "lora_" in n], lr=self.lr)

    # ---- log-probs ----------------------------------------------------------------------------------------
    def _logprobs(self, rows: list[int], adapter: str) -> torch.Tensor:
        prompts, conts = self.answer_inputs(rows)
        out = self.policy.continuation_logprobs([(adapter, t) for _, t in prompts], conts, values=False)
        return out["logp"].sum(-1).view(len(rows), 2)  # logp is 0 beyond each answer's tokens

    def answer_values(self, rows: list[int]) -> torch.Tensor:
        """``[len(rows), 2]`` whole-answer log-probs of C's and D's string under agent_0 (with gradient if enabled)."""
        return self._logprobs(rows, self.adapter)

    @torch.no_grad()
    def reference_logp(self) -> torch.Tensor:
        """``[U, 2]`` whole-answer log-probs under the adapter-disabled base, for every prompt row (computed once)."""
        if self._ref is None:
            was = self.policy.training
            self.policy.eval()  # BASE rows run through peft's per-row hooks, which need eval mode
            try:
                self._ref = torch.cat([self._logprobs(rows, BASE) for rows in self.row_chunks()])
            finally:
                self.policy.train(was)
        return self._ref

    def pair_stats(self, idx: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[b]`` DPO loss, implicit rewards, margin, accuracy, log-probs, legal mass and choice KL of pairs ``idx``,
        from agent_0's log-probs ``values [U, 2]`` of the prompt rows ``rows [U]``."""
        ref = self.reference_logp()[rows.to(self._ref.device)].to(values.device)
        lc, lr, inv = self.gather_pairs(idx, values, rows)
        rc, rr, _ = self.gather_pairs(idx, ref, rows)
        out = dpo_loss(lc, lr, rc, rr, self.beta)
        out.update(logp_chosen=lc, logp_rejected=lr, legal_mass=values.exp().sum(-1)[inv],
                   kl_choice=choice_kl(values, ref)[inv])
        return out

    # ---- behaviour ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def p_cooperate(self) -> dict[str, float]:
        """``dpo/p_c/<state>/agent_0``: P(C's string | state), renormalised over the two strings, mean over the four
        option orders, in the run's game with the run's action strings."""
        was = self.policy.training
        self.policy.eval()
        try:
            r = self.renderer(self.game, self.style.actions)
            seq = self.policy.candidate_logprobs([(self.adapter, r.token_ids[p]) for p in range(N_PROMPT_IDS)],
                                                 r.action_ids)["seq_logp"]
        finally:
            self.policy.train(was)
        p_c = torch.softmax(seq, -1)[:, 0]
        out = {}
        for s, name in enumerate(STATES):
            rows = [p for p in range(N_PROMPT_IDS) if prompt_bits(p)[0] * 2 + prompt_bits(p)[1] == s]
            out[f"dpo/p_c/{name}/{self.adapter}"] = float(p_c[rows].mean())
        return out

    def all_pair_stats(self) -> dict[str, float]:
        return {**super().all_pair_stats(), **self.p_cooperate()}

    def on_fit_start(self) -> None:
        run = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        if run is not None and self.trainer.is_global_zero:
            write_pairs(self.pairs, run / "pairs.jsonl")

    # ---- checkpoints: read as a one-agent MoralPPO's ------------------------------------------------------
    def fingerprint(self) -> dict:
        """As :meth:`lit_moral.module.MoralPPO.fingerprint`, so MoralPPO's loaders accept the checkpoint."""
        return {"model": self.hparams.model, "agents": [self.adapter], "lora_r": self.lora.r,
                "lora_target_modules": self.lora.target_modules, "action_mode": self.hparams.action_mode}

    def checkpoint_section(self) -> dict:
        cfg = asdict(self.pair_cfg)
        return {**super().checkpoint_section(), "fingerprint": self.fingerprint(), "episode": 0, "iteration": 0,
                "opponent": None, "learners": {}, "rng": [],
                "dpo": {"beta": self.beta, "batch_size": self.batch_size, "pairs": cfg}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        theirs = checkpoint["lit_moral"].get("fingerprint", {})
        diff = [f"{k}: checkpoint has {theirs.get(k)!r}, config has {v!r}" for k, v in self.fingerprint().items()
                if theirs.get(k) != v]
        if diff:
            raise ConfigError("ckpt_path: checkpoint does not match this run (" + "; ".join(diff) + ")")

    def configure_callbacks(self):
        from lit_moral.callbacks import Progress

        have = self.trainer.callbacks if self._trainer is not None else []
        return [cls() for cls in (PreferenceExport, Progress) if not any(isinstance(c, cls) for c in have)]


class PreferenceExport(AdapterExport):
    """:class:`~lit_moral.callbacks.AdapterExport` with a model card that says how a DPO agent was trained."""

    @staticmethod
    def _export(trainer, pl_module, tmp: Path) -> None:
        import json

        from lit_moral.adapters import finish_export, model_card
        from lit_moral.agent import EXPORT_INFO, export_info

        agent = pl_module.adapter
        pl_module.policy.model.save_pretrained(str(tmp), selected_adapters=[agent])
        folder = tmp / agent if (tmp / agent).is_dir() else tmp
        cfg = pl_module.pair_cfg
        source = cfg.file or f"labeller {labeller_name(cfg)}, ties {cfg.ties}, noise {cfg.noise:g}"
        lora = pl_module.lora
        facts = {"stage": "DPO on preference pairs (reference: the adapter-disabled base)", "pairs": len(pl_module.pairs),
                 "pairs from": source, "beta": pl_module.beta, "game": pl_module.game.name,
                 "action strings": " / ".join(pl_module.style.actions), "optimizer steps": pl_module.global_step,
                 "started from": pl_module.hparams.init_adapter or "LoRA's zero start",
                 "LoRA": f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, targets {lora.target_modules}",
                 "learning rate": pl_module.lr, "seed": pl_module.seed}
        metrics = dict(pl_module.current_stats())
        finish_export(folder, pl_module.hparams.model, model_card(agent, pl_module.hparams.model, facts, metrics))
        (folder / EXPORT_INFO).write_text(json.dumps(export_info(pl_module, agent), indent=1) + "\n")
