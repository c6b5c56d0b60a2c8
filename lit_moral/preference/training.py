"""What DPO and the reward model share: settings checks, the pairs as prompts and answers, batches, checkpoints.

Both train one LoRA adapter on the frozen base on the same pairs (:mod:`lit_moral.preference.pairs`), shown
with the prompt of the RL runs (:class:`lit_moral.prompts.PromptRenderer`: same game table, state, option orders,
action strings, chat template and system prompt). A pair's prompt is one of at most 16 prompt ids per game and
action strings, so every distinct prompt is run once per batch with both of its answers (C's and D's string),
and each pair reads its chosen and rejected answer from that ``[U, 2]`` table.

An epoch is one pass over the pairs in a random order drawn from ``(seed, kind, "minibatch", epoch)``, the
same on every resume; ``trainer.max_epochs`` bounds the run.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lit_moral import models
from lit_moral.adapters import check_adapter
from lit_moral.config import validate_lora
from lit_moral.errors import ConfigError, check_choice, check_positive
from lit_moral.games import MatrixGame
from lit_moral.policy import LoraSpec, Policy
from lit_moral.preference.pairs import PairConfig, game_key, load_pairs, matrix_game
from lit_moral.prompts import PromptRenderer, PromptStyle, validate_actions
from lit_moral.seeding import generator

# Checkpoints store the pair settings in their hyperparameters; allow them under weights_only loading.
torch.serialization.add_safe_globals([PairConfig, LoraSpec])


class PairTrainer(pl.LightningModule):
    """Base of :class:`~lit_moral.preference.dpo.DPO` and :class:`~lit_moral.preference.reward_model.RewardModel`.

    Subclasses set ``kind`` (checkpoint kind and random-stream name), ``section`` (log section of the step
    statistics), ``adapter`` (the trained adapter) and ``saves_head`` (whether its scalar head is trained and
    checkpointed), call :meth:`_setup` from ``__init__`` and implement :meth:`build_policy`, :meth:`answer_values`,
    :meth:`pair_stats` and ``configure_optimizers``.
    """

    kind = "pairs"
    section = "pairs"
    adapter = "agent_0"
    saves_head = False  # whether the adapter's value head is trained (and checkpointed)

    def _setup(self, *, model: str, dtype: str, lora: LoraSpec, game, actions, system_prompt, pairs, batch_size: int,
               lr: float, seed: int, init_adapter: str | None = None) -> None:
        """Check every cheap setting and make (or read) the pairs, before any model is loaded."""
        models.validate_model_spec(model)
        check_choice("dtype", dtype, models.DTYPES)
        self.lora = lora or LoraSpec()
        validate_lora(self.lora)
        self.game = MatrixGame.from_spec(game, "game")
        self.style = PromptStyle(actions=validate_actions(actions), system_prompt=system_prompt)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ConfigError(f"batch_size: got {batch_size!r}; must be a whole number > 0")
        check_positive("batch_size", batch_size)
        check_positive("lr", lr)
        if not math.isfinite(lr):
            raise ConfigError(f"lr: got {lr!r}; must be a finite number > 0")
        if init_adapter is not None:
            check_adapter(init_adapter, self.lora)
        self.pair_cfg = PairConfig(**pairs) if isinstance(pairs, dict) else (pairs or PairConfig())
        self.pairs = load_pairs(self.pair_cfg, self.style.actions, seed, game)
        self.seed, self.batch_size, self.lr = seed, batch_size, lr
        self.policy: Policy | None = None
        self.tokenizer = None
        self.strict_loading = False
        self.last_stats: dict[str, float] = {}
        self._stats_step: int | None = None
        self._renderers: dict[tuple, PromptRenderer] = {}
        self._order: tuple[int, torch.Tensor] | None = None

    @staticmethod
    def resolve_seed(seed: int | None) -> int:
        """``seed_everything: true`` gives None: the seed Lightning drew (as MoralPPO)."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed

    # ---- model and prompts --------------------------------------------------------------------------------
    def build_policy(self, base) -> Policy:
        raise NotImplementedError

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        # Loading may build and initialise weights (the tiny model): keep it off torch's global RNG (as MoralPPO).
        with torch.random.fork_rng(devices=[]):
            base, self.tokenizer = models.load(self.hparams.model, self.hparams.dtype)
        self.policy = self.build_policy(base)
        self._encode(getattr(base.config, "max_position_embeddings", None))

    def renderer(self, game, actions: tuple[str, str]) -> PromptRenderer:
        """The RL prompt of ``game`` (a pair's game key or the run's game) with ``actions`` and the run's system prompt."""
        key = (game_key(game), tuple(actions))
        if key not in self._renderers:
            style = PromptStyle(actions=tuple(actions), system_prompt=self.style.system_prompt)
            self._renderers[key] = PromptRenderer(self.tokenizer, matrix_game(key[0]), style)
        return self._renderers[key]

    def _encode(self, context: int | None) -> None:
        """Distinct prompts of the pairs (``prompt_tokens``, ``prompt_answers``: C's and D's tokens) and, per pair,
        its prompt row (``pair_prompt [P]``) and chosen action code (``pair_chosen [P]``)."""
        rows: dict[tuple, int] = {}
        self.prompt_tokens, self.prompt_answers, where = [], [], []
        for p in self.pairs:
            key = (p.game, p.actions, p.prompt_id)
            if key not in rows:
                r = self.renderer(p.game, p.actions)
                rows[key] = len(self.prompt_tokens)
                self.prompt_tokens.append(r.token_ids[p.prompt_id])
                self.prompt_answers.append(r.action_ids)
            where.append(rows[key])
        self.pair_prompt = torch.tensor(where)
        self.pair_chosen = torch.tensor([p.chosen for p in self.pairs])
        need = max(len(t) + max(len(a) for a in ans) for t, ans in zip(self.prompt_tokens, self.prompt_answers))
        if context is not None and need > context:
            raise ConfigError(f"model: the pairs' prompts and answers need {need} tokens but {self.hparams.model!r} "
                              f"has a context of {context}")

    def answer_inputs(self, rows: list[int]) -> tuple[list[tuple[str, list[int]]], list[tuple[int, list[int]]]]:
        """``(prompts, conts)`` for :class:`~lit_moral.policy.Policy`: the prompt rows under the trained adapter, each
        followed by its two answers (C's, then D's), so row ``2u + a`` is answer ``a`` after prompt ``u``."""
        prompts = [(self.adapter, self.prompt_tokens[u]) for u in rows]
        conts = [(i, list(self.prompt_answers[u][a])) for i, u in enumerate(rows) for a in (0, 1)]
        return prompts, conts

    def answer_values(self, rows: list[int]) -> torch.Tensor:
        """``[len(rows), 2]`` the trained quantity (log-prob or score) of C's and D's answer after each prompt row."""
        raise NotImplementedError

    def row_chunks(self) -> list[list[int]]:
        """Every prompt row, in fixed chunks of ``batch_size`` rows: whole-set passes (the reference, the statistics)
        run the same batches, so a policy equal to its reference gives bit-equal log-probs."""
        rows = list(range(len(self.prompt_tokens)))
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def answer_table(self) -> torch.Tensor:
        """``[U, 2]`` :meth:`answer_values` of every prompt row, by :meth:`row_chunks`."""
        return torch.cat([self.answer_values(rows) for rows in self.row_chunks()])

    # ---- batches ------------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.pairs) / self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.steps_per_epoch), batch_size=None)

    def batch_pairs(self, epoch: int, batch_idx: int) -> torch.Tensor:
        """``[b]`` pair indices of batch ``batch_idx`` of ``epoch`` (a fresh order every epoch, the same on resume)."""
        if self._order is None or self._order[0] != epoch:
            order = torch.randperm(len(self.pairs), generator=generator(self.seed, self.kind, "minibatch", epoch))
            self._order = (epoch, order)
        return self._order[1][batch_idx * self.batch_size:(batch_idx + 1) * self.batch_size]

    def gather_pairs(self, idx: torch.Tensor, values: torch.Tensor, rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen and rejected answers' entries of ``values [U, 2]`` for pairs ``idx [b]`` whose prompts are the
        rows ``rows [U]``: ``(chosen [b], rejected [b], inverse [b])`` (``inverse``: each pair's row in ``values``)."""
        inv = torch.searchsorted(rows, self.pair_prompt[idx]).to(values.device)
        c = self.pair_chosen[idx].to(values.device)
        ar = torch.arange(len(idx), device=values.device)
        return values[inv][ar, c], values[inv][ar, 1 - c], inv

    def pair_stats(self, idx: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[b]`` per-pair loss and statistics of pairs ``idx [b]``, from ``values [U, 2]`` (:meth:`answer_values`) of
        the sorted prompt rows ``rows [U]`` (with gradient when ``values`` has one)."""
        raise NotImplementedError

    def training_step(self, batch: int, batch_idx: int) -> torch.Tensor:
        """One optimizer step on batch ``batch`` of the epoch's order (the loader's item, not the loop counter: a
        distributed sampler gives each process its own batches): the pairs' mean loss; their statistics are logged
        as ``<section>/<name>/<adapter>``."""
        self.policy.train()
        self.policy.activate(self.adapter)
        idx = self.batch_pairs(self.current_epoch, int(batch))
        rows = torch.unique(self.pair_prompt[idx])  # the batch's distinct prompts: each runs once, with both answers
        stats = self.pair_stats(idx, self.answer_values(rows.tolist()), rows)
        self.log_dict({f"{self.section}/{k}/{self.adapter}": v.detach().mean() for k, v in stats.items()}, on_step=True,
                      batch_size=len(idx))
        self.log("loss", stats["loss"].detach().mean(), prog_bar=True, logger=False, batch_size=len(idx))
        return stats["loss"].mean()

    @torch.no_grad()
    def all_pair_stats(self) -> dict[str, float]:
        """Means over every training pair of :meth:`pair_stats`, in eval mode, as ``pairs/<name>/<adapter>``."""
        was = self.policy.training
        self.policy.eval()
        try:
            values = self.answer_table()
        finally:
            self.policy.train(was)
        stats = self.pair_stats(torch.arange(len(self.pairs)), values, torch.arange(len(self.prompt_tokens)))
        return {f"pairs/{k}/{self.adapter}": float(v.mean()) for k, v in stats.items()}

    def current_stats(self) -> dict[str, float]:
        """:meth:`all_pair_stats` of the current weights, computed once per optimizer step (callbacks that save
        checkpoints and export adapters run before the module's own epoch-end hook, and read it too)."""
        if self._stats_step != self.global_step:
            self.last_stats, self._stats_step = self.all_pair_stats(), self.global_step
        return self.last_stats

    def log_direct(self, values: dict[str, float], step: int) -> None:
        """Write scalars to TensorBoard outside the hooks where ``self.log`` works (before the first step)."""
        exp = getattr(self.logger, "experiment", None) if self._trainer is not None and self.logger else None
        if exp is not None and hasattr(exp, "add_scalar"):
            for k, v in values.items():
                exp.add_scalar(k, v, global_step=step)

    def on_train_start(self) -> None:
        self.log_direct(self.current_stats(), self.global_step)  # the start (step 0): what training moves away from

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.current_stats(), on_epoch=True, batch_size=1)

    # ---- checkpoints: trainable state only ----------------------------------------------------------------
    def _trainable_key(self, key: str) -> bool:
        if "lora_" in key and f".{self.adapter}." in key:
            return True
        return self.saves_head and f"value_heads.{self.adapter}." in key

    def state_dict(self, *args, **kwargs):
        """Only the trained adapter's LoRA weights (and its head, if trained): not the frozen base."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if self._trainable_key(k)}

    def check_finite_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Refuse to save (FloatingPointError) when a trainable weight holds a NaN or infinity."""
        for k, v in state_dict.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise FloatingPointError(f"refusing to write a checkpoint at step {self.global_step}: {k} is not finite")

    def checkpoint_section(self) -> dict:
        """What ``checkpoint["lit_moral"]`` holds: kind, pair settings and count, last statistics."""
        return {"kind": self.kind, "pairs": {"count": len(self.pairs), "labeller": sorted({p.labeller for p in self.pairs})},
                "stats": dict(self.current_stats()), "step": self.global_step}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite_weights(checkpoint["state_dict"])
        checkpoint["lit_moral"] = self.checkpoint_section()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        kind = checkpoint.get("lit_moral", {}).get("kind")
        if kind != self.kind:
            raise ConfigError(f"ckpt_path: a {kind or 'non-lit_moral'!r} checkpoint, not a {self.kind!r} one; resume a "
                              f"{self.kind} run from its own <run>/checkpoints/last.ckpt")
