"""Supervised format warm-up: teach a small model to answer with one of the two labels its prompt lists.

SmolLM2-135M-Instruct puts ~0.1% of its probability on the two legal answer strings, so free generation
(the paper's regime: 2 tokens at temperature 1, exact match, -6 for anything else) gives PPO no signal about
*which* move is better. As in the alignment recipe for game agents (Jelley et al. 2024, protocol section 11)
and the usual small-model practice, a short supervised stage teaches the output format first:

* next-token loss on the answer string given the training prompt, into the agent's LoRA adapter;
* it teaches the **format, not a strategy**: every sampled prompt (a game table, a memory-1 state and two
  option orders) is trained on *both* of its labels, so the targets are exactly 50/50 in every state and
  option order, and nothing prefers cooperation or defection;
* over many label pairs (``pairs``) that never include the evaluation tokens ``action3``/``action4`` nor the
  training tokens ``action1``/``action2``: what is learnt is "answer with one of the two labels listed".

Run it with ``python -m lit_moral warmup --config configs/warmup_format.yaml``; it exports the adapter in
peft format (``<run>/adapters/agent_0/``) and a checkpoint like ``fit``; ``fit --model.init_adapter <that
folder>`` starts PPO from it (the KL reference stays the adapter-disabled base). TensorBoard: ``warmup/loss``,
``warmup/illegal_rate/<labels>`` (sampled as the paper samples), ``warmup/legal_mass/<labels>`` (probability of
the two label strings) and ``warmup/p_c/<state>/<labels>`` (P(first label | state), over option orders).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lit_moral import models
from lit_moral.errors import ConfigError, check_choice, check_positive
from lit_moral.games import GAME_NAMES, ILLEGAL, MatrixGame
from lit_moral.policy import LoraSpec, Policy
from lit_moral.prompts import N_PROMPT_IDS, PromptRenderer, PromptStyle, prompt_bits, validate_actions
from lit_moral.rollout import ActionSampler
from lit_moral.seeding import generator

# Two-token labels in SmolLM2's tokenizer ("<word>", "<digit>"), digits mixed so that no pair is the evaluation's
# action3/action4 or the training's action1/action2 (nor any other action1..action4 string). These 24 made the
# committed warm-up (docs/results/warmup); six more pairs with the digits 3/4 and 1/2 on other words, tried to
# remove SmolLM2's preference for "action3" over "action4", did not reduce it (P(first label | D, C) 0.687 vs
# 0.700 after 19 steps) and were dropped.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("option1", "option2"), ("choice3", "choice7"), ("move2", "move5"), ("play4", "play9"), ("pick1", "pick6"),
    ("button3", "button8"), ("select2", "select7"), ("answer5", "answer1"), ("item6", "item3"), ("key9", "key4"),
    ("card7", "card2"), ("token8", "token5"), ("plan1", "plan9"), ("route4", "route6"), ("door2", "door8"),
    ("task3", "task5"), ("mode7", "mode1"), ("step6", "step4"), ("action5", "action8"), ("action9", "action6"),
    ("option8", "option3"), ("choice5", "choice9"), ("move7", "move4"), ("card1", "card6"),
)
MEASURE_PAIRS: tuple[tuple[str, str], ...] = (("action1", "action2"), ("action3", "action4"))
STATES = ("CC", "CD", "DC", "DD")  # (my previous move, the other's previous move)


def _label(pair: Sequence[str]) -> str:
    return f"{pair[0]}-{pair[1]}"


def balanced_batch(n: int, pairs: int, games: int, gen: torch.Generator) -> list[tuple[int, int, int, int]]:
    """``n`` training prompts ``(pair, game, prompt id, target)``, each prompt twice: once per label.

    Every sampled prompt (pair, game, state, option orders) is listed with target 0 and target 1, so the
    targets are exactly balanced in every memory-1 state and option order.
    """
    pair = torch.randint(0, pairs, (n,), generator=gen).tolist()
    game = torch.randint(0, games, (n,), generator=gen).tolist()
    pid = torch.randint(0, N_PROMPT_IDS, (n,), generator=gen).tolist()
    return [(pair[i], game[i], pid[i], t) for i in range(n) for t in (0, 1)]


class FormatWarmup(pl.LightningModule):
    """One LoRA adapter (``agent_0``) on a frozen base, trained to answer with a listed label (see module doc).

    Args:
        model: model spec (as MoralPPO's).
        dtype: weights dtype.
        lora: LoRA settings (must match the PPO run that starts from this adapter).
        pairs: label pairs to train on (default: DEFAULT_PAIRS); action1..action4 are refused.
        games: games whose tables the training prompts show.
        prompts_per_step: prompts per optimizer step (each with both labels as targets).
        steps_per_epoch: optimizer steps per Lightning epoch (bound runs with ``trainer.max_epochs``).
        lr: Adam learning rate.
        measure_every: steps between measurements of illegal rate and P(C | state) (and at the end).
        measure_samples: sampled answers per prompt per measured label pair (16 prompts).
        max_new_tokens: tokens sampled when measuring (the paper's free mode: 2).
        system_prompt: as MoralPPO's (None: no system turn).
        seed: seed of the prompt and measurement streams (the CLI links it to ``seed_everything``).
        run_name: name used for the checkpoint folder.
    """

    def __init__(self, model: str = models.SMOLLM2, dtype: str = "float32", lora: LoraSpec = LoraSpec(),  # noqa: B008
                 pairs: list[tuple[str, str]] | None = None, games: list[str] | None = None, prompts_per_step: int = 8,
                 steps_per_epoch: int = 10, lr: float = 2e-4, measure_every: int = 10, measure_samples: int = 8,
                 max_new_tokens: int = 2, system_prompt: str | None = None, seed: int | None = 0,
                 run_name: str = "warmup") -> None:
        super().__init__()
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.save_hyperparameters()
        models.validate_model_spec(model)
        check_choice("dtype", dtype, models.DTYPES)
        self.pairs = [validate_actions(p, "pairs") for p in (pairs or DEFAULT_PAIRS)]
        banned = {f"action{k}" for k in range(1, 5)}
        if any(a in banned for p in self.pairs for a in p):
            raise ConfigError("pairs: the warm-up must not train on action1..action4 (the training and evaluation "
                              "tokens): it teaches the format, not these strings")
        self.games = [MatrixGame.from_spec(g, "games") for g in (games or list(GAME_NAMES))]
        for name, v in (("prompts_per_step", prompts_per_step), ("steps_per_epoch", steps_per_epoch),
                        ("measure_every", measure_every), ("measure_samples", measure_samples),
                        ("max_new_tokens", max_new_tokens), ("lr", lr)):
            check_positive(name, v)
        self.lora = lora or LoraSpec()
        self.agent_names = ["agent_0"]
        self.step_gen = generator(seed, "warmup", "prompts")
        self.policy: Policy | None = None
        self.tokenizer = None
        self._renderers: dict[tuple, PromptRenderer] = {}
        self.strict_loading = False
        self.last_measure: dict[str, float] = {}

    # ---- model and data -----------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        with torch.random.fork_rng(devices=[]):
            base, self.tokenizer = models.load(self.hparams.model, self.hparams.dtype)
        self.policy = Policy(base, self.agent_names, self.lora)
        for p in {*self.pairs, *MEASURE_PAIRS}:
            for s in p:
                n = len(self.tokenizer(s, add_special_tokens=False).input_ids)
                if n > self.hparams.max_new_tokens:
                    raise ConfigError(f"pairs: {s!r} takes {n} tokens in this tokenizer, but answers are "
                                      f"{self.hparams.max_new_tokens} tokens long (max_new_tokens)")

    def renderer(self, pair: Sequence[str], game: MatrixGame) -> PromptRenderer:
        key = (tuple(pair), game.name, tuple(game.payoffs.flatten().tolist()))
        if key not in self._renderers:
            style = PromptStyle(actions=tuple(pair), system_prompt=self.hparams.system_prompt)
            self._renderers[key] = PromptRenderer(self.tokenizer, game, style)
        return self._renderers[key]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(self.hparams.steps_per_epoch), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.Adam([p for _, p in self.policy.agent_parameters("agent_0")], lr=self.hparams.lr)

    # ---- training ---------------------------------------------------------------------------------
    def loss(self, batch: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Mean negative log-likelihood per answer token of each (prompt, target label)."""
        prompts, where, conts = [], {}, []
        for pair, game, pid, target in batch:
            r = self.renderer(self.pairs[pair], self.games[game])
            key = (pair, game, pid)
            if key not in where:
                where[key] = len(prompts)
                prompts.append(("agent_0", r.token_ids[pid]))
            conts.append((where[key], r.action_ids[target]))
        out = self.policy.continuation_logprobs(prompts, conts, values=False)
        return -(out["logp"] * out["mask"]).sum() / out["mask"].sum()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.policy.train()
        self.policy.activate("agent_0")
        rows = balanced_batch(self.hparams.prompts_per_step, len(self.pairs), len(self.games), self.step_gen)
        loss = self.loss(rows)
        self.log("warmup/loss", loss, on_step=True, prog_bar=True, batch_size=len(rows))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (self.global_step % self.hparams.measure_every) == 0:
            self.last_measure = self.measure()
            self.log_dict(self.last_measure, on_step=True, batch_size=1)

    def on_train_end(self) -> None:
        self.last_measure = self.measure()
        exp = getattr(self.logger, "experiment", None) if self.logger else None
        if exp is not None and hasattr(exp, "add_scalar"):
            for k, v in self.last_measure.items():
                exp.add_scalar(k, v, global_step=self.global_step)

    # ---- measurement ------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, game: str = "IPD") -> dict[str, float]:
        """Illegal rate of sampled answers (the paper's sampling) and P(first label | state), per measured pair.

        Returns:
            ``warmup/illegal_rate/<labels>``, ``warmup/legal_mass/<labels>`` and ``warmup/p_c/<state>/<labels>``.
        """
        was = self.policy.training
        self.policy.eval()
        gen = generator(self.hparams.seed, "warmup", "measure", self.global_step)
        out: dict[str, float] = {}
        try:
            for pair in MEASURE_PAIRS:
                r = self.renderer(pair, MatrixGame.from_spec(game))
                sampler = ActionSampler(self.policy, r, "free", self.hparams.max_new_tokens, with_reference=False,
                                        cut_illegal=True)
                pid = torch.arange(N_PROMPT_IDS).repeat(self.hparams.measure_samples)
                (moves,) = sampler.act([("agent_0", pid)], gen)
                label = _label(pair)
                out[f"warmup/illegal_rate/{label}"] = float((moves.action == ILLEGAL).float().mean())
                seq = self.policy.candidate_logprobs([("agent_0", r.token_ids[p]) for p in range(N_PROMPT_IDS)],
                                                     r.action_ids)["seq_logp"]
                out[f"warmup/legal_mass/{label}"] = float(seq.exp().sum(-1).mean())
                p_c = torch.softmax(seq, -1)[:, 0]
                for s, name in enumerate(STATES):
                    rows = [p for p in range(N_PROMPT_IDS) if prompt_bits(p)[0] * 2 + prompt_bits(p)[1] == s]
                    out[f"warmup/p_c/{name}/{label}"] = float(p_c[rows].mean())
        finally:
            self.policy.train(was)
        return out

    # ---- checkpoints (as MoralPPO's: trainable state only) --------------------------------------
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if "lora_" in k}

    def check_finite_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        for k, v in state_dict.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise FloatingPointError(f"refusing to write a checkpoint: {k} is not finite")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_moral"] = {"kind": "format_warmup", "measure": dict(self.last_measure),
                                   "step": self.global_step, "step_gen": self.step_gen.get_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lit_moral", {})
        if "step_gen" in state:
            self.step_gen.set_state(state["step_gen"])

    def configure_callbacks(self):
        from lit_moral.callbacks import AdapterExport, Progress

        have = self.trainer.callbacks if self._trainer is not None else []
        return [cls() for cls in (AdapterExport, Progress) if not any(isinstance(c, cls) for c in have)]
