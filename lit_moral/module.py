"""The LightningModule: one PPO iteration per ``training_step`` (manual optimization).

An iteration: play ``episodes_per_iteration`` games of ``rounds_per_episode`` rounds for every
match in parallel -> rewards (total and components) -> KL penalty against the base model ->
advantages -> ``ppo_epochs`` x minibatches of (forward, loss, ``manual_backward``, clip, step) per
trained agent -> metrics and logs. Hyperparameters and schedules count *episodes* (games), as the
paper does; ``self.episode`` is saved in checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from lit_moral import models
from lit_moral.adapters import check_adapter, read_adapter
from lit_moral.errors import ConfigError, check_choice, check_positive
from lit_moral.evaluation import EvalConfig
from lit_moral.games import ACTION_TYPES, MatrixGame
from lit_moral.metrics import ActionTypes, CooperationRate, IllegalRate, MoralRegret
from lit_moral.opponents import LLM_OPPONENT, OPPONENT_NAMES, Opponent, make_opponent
from lit_moral.padding import pad_steps
from lit_moral.policy import LoraSpec, Policy
from lit_moral.ppo import KLController, PPOConfig, RunningMoments, explained_variance, gae, kl_rewards, ppo_loss, whiten
from lit_moral.prompts import PromptRenderer, PromptStyle, validate_actions
from lit_moral.rewards import RewardSpec
from lit_moral.rollout import ActionSampler, AgentSamples, Match, merge, play
from lit_moral.seeding import Streams, opponent_seed

AGENT_NAME = re.compile(r"^agent_[01]$")


@dataclass
class AgentConfig:
    """One LLM agent.

    Attributes:
        name: ``agent_0`` or ``agent_1`` (also the LoRA adapter name).
        reward: a named reward (game, deontological, utilitarian, game_deontological) or a mapping
            component -> weight, e.g. ``{game: 1.0, utilitarian: 0.5}``.
        train: update this agent (False keeps its adapter fixed, e.g. a frozen opponent).
    """

    name: str = "agent_0"
    reward: str | dict[str, float] = "deontological"
    train: bool = True


# Checkpoints store these config dataclasses in their hyperparameters; allow them under weights_only loading.
torch.serialization.add_safe_globals([AgentConfig, LoraSpec, PPOConfig])


class _Iterations(IterableDataset):
    """Yields the indices of the iterations left in this epoch; an IterableDataset so Lightning adds no sampler.

    Args:
        n: iterations per epoch.
        done: returns how many iterations were played so far (the module's checkpointed counter), so an
            epoch resumed from a mid-epoch checkpoint plays only the iterations that remain.
    """

    def __init__(self, n: int, done: Callable[[], int]) -> None:
        self.n = n
        self.done = done

    def __iter__(self):
        return iter(range(self.done() % self.n, self.n))

    def __len__(self) -> int:
        return self.n


class _IterationLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable: its position is the module's iteration counter.

    The counter is saved with the module, so the loader's own state is only informative; declaring it
    stateful tells Lightning that a mid-epoch resume continues exactly where it stopped.
    """

    def state_dict(self) -> dict:
        return {"position": self.dataset.done() % self.dataset.n}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the position follows the module's restored iteration counter."""


def _validate_lora(lora: LoraSpec) -> None:
    """LoRA sizes are whole numbers > 0 and dropout a probability, checked before any model loads."""
    for name in ("r", "alpha"):
        v = getattr(lora, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"lora.{name}: got {v!r}; must be a whole number > 0")
    if not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout: got {lora.dropout!r}; must be a number in [0, 1)")


class MoralPPO(pl.LightningModule):
    """LLM agents (LoRA adapters on one frozen base) trained with PPO on game and moral rewards.

    Args:
        model: model spec: ``smollm2-135m-instruct`` (offline default), ``gemma-3-270m``, ``tiny``,
            a local directory or a hub id already in the local cache.
        dtype: weights dtype: float32, bfloat16 or float16.
        agents: one or two agents (default: one deontological ``agent_0``).
        opponent: each agent's fixed opponent (tft, always_cooperate, always_defect, random), or
            ``llm``: agent_0 and agent_1 play each other.
        game: game name (IPD, ISH, ICN, BOS, ICD) or a ``[2, 2, 2]`` payoff list.
        rounds_per_episode: rounds per game (paper: 5 vs fixed strategies, 3 for two learners).
        episodes_per_iteration: games played in parallel per PPO iteration, per match (the paper: 1).
        iterations_per_epoch: PPO iterations per Lightning epoch (bound runs with ``trainer.max_epochs``).
        action_mode: ``constrained`` (choose among the legal strings) or ``free`` (generate, exact-match).
        actions: the two action strings, C first.
        max_new_tokens: tokens generated in free mode (paper: 2).
        xi: deontological penalty (paper: 3).
        illegal_penalty: reward for an illegal answer (paper: -6).
        lora: LoRA settings.
        value_head_dropout: value-head dropout (paper: 0.1).
        ppo: PPO settings.
        lr: Adam learning rate (paper: 1.41e-5).
        prefix_levels: shared-prefix tree depth in the forward engine (0 = automatic, 1 = no prefix reuse).
        seed: seed of every random stream of the run: initial states, option orders, sampling, minibatches and
            each opponent get their own stream derived from it (and from the process rank). The CLI links it to
            ``seed_everything``, which also seeds adapter initialisation and dropout.
        run_name: name used for the checkpoint folder.
        naive: run the obvious path instead of the engine (per-sample full forwards, full-vocabulary
            logits, no deduplication, prefix reuse or memoisation); for benchmarks and tests only.
        evaluation: what ``python -m lit_moral test`` and the Evaluation callback play (games, opponents,
            prompt variants, episodes, seed, output folder); see ``lit_moral.evaluation.EvalConfig``.
        gradient_checkpointing: recompute decoder layers in the backward pass (large models on small
            GPUs); update forwards then run whole sequences instead of reusing the prompt prefix.
        system_prompt: None (default, as the paper): no system turn; a template that inserts a default system
            text of its own (SmolLM2's) gets an empty system turn instead. A string: that system text.
        init_adapter: start every agent's adapter from this saved adapter (a peft folder such as the format
            warm-up's ``<run>/adapters/agent_0``, or a lit_moral ``.ckpt``) instead of LoRA's zero start; its
            LoRA settings must match ``lora``. The KL reference stays the adapter-disabled base, and the
            evaluation shows the adapter alone as the ``warmup`` row.
    """

    def __init__(
        self,
        model: str = models.SMOLLM2,
        dtype: str = "float32",
        agents: list[AgentConfig] | None = None,
        opponent: str = "tft",
        game: str | list = "IPD",
        rounds_per_episode: int = 5,
        episodes_per_iteration: int = 64,
        iterations_per_epoch: int = 10,
        action_mode: Literal["constrained", "free"] = "constrained",
        actions: tuple[str, str] = ("action1", "action2"),
        max_new_tokens: int = 2,
        xi: float = 3.0,
        illegal_penalty: float = -6.0,
        lora: LoraSpec = LoraSpec(),  # noqa: B008 - frozen: safe, and jsonargparse documents its fields
        value_head_dropout: float = 0.0,
        ppo: PPOConfig = PPOConfig(),  # noqa: B008 - frozen, as lora
        lr: float = 1.41e-5,
        prefix_levels: int = 0,
        seed: int | None = 0,
        run_name: str = "run",
        naive: bool = False,
        evaluation: EvalConfig = EvalConfig(),  # noqa: B008 - copied below, never mutated
        gradient_checkpointing: bool = False,
        system_prompt: str | None = None,
        init_adapter: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False
        if seed is None:  # seed_everything: true (see cli._module_seed): the seed Lightning drew
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.save_hyperparameters()
        # Validate everything cheap before any model is loaded.
        self.agent_cfgs = [a if isinstance(a, AgentConfig) else AgentConfig(**a) for a in (agents or [AgentConfig()])]
        self._validate(model, opponent, rounds_per_episode, episodes_per_iteration, iterations_per_epoch,
                       action_mode, actions, max_new_tokens, lr, prefix_levels, dtype)
        self.game = MatrixGame.from_spec(game, "game")
        _validate_lora(lora or LoraSpec())
        if init_adapter is not None:
            check_adapter(init_adapter, lora or LoraSpec())
        self.style = PromptStyle(actions=tuple(actions), system_prompt=system_prompt)
        self.rewards = {a.name: RewardSpec.parse(a.reward, xi, illegal_penalty, f"agents[{i}].reward")
                        for i, a in enumerate(self.agent_cfgs)}
        self.lora = lora or LoraSpec()
        self.ppo_cfg = ppo or PPOConfig()
        self.agent_names = [a.name for a in self.agent_cfgs]
        self.trained = [a.name for a in self.agent_cfgs if a.train]
        self.opponent_name = opponent
        self.kl_ctl = {a: self._new_kl() for a in self.agent_names}
        self.moments = {a: RunningMoments() for a in self.agent_names}
        # One opponent (and random stream) per (agent, strategy), kept across switches: a Random opponent met
        # again after a schedule switch continues its stream instead of replaying it.
        self.opponents: dict[tuple[str, str], Opponent] = {}
        self.set_opponent(opponent)
        self.episode = 0
        self.iteration = 0
        self.streams = Streams.from_seed(seed, "rank", 0)
        self.policy: Policy | None = None
        self.tokenizer = None
        self.renderer: PromptRenderer | None = None
        self.sampler: ActionSampler | None = None
        self.last_samples: dict[str, AgentSamples] = {}
        self.last_action_types: dict[str, torch.Tensor] = {}  # agent -> [6] frequencies of the last iteration
        self.metrics = torch.nn.ModuleDict({a: self._new_metrics() for a in self.agent_names})
        self.eval_cfg = (EvalConfig(**evaluation) if isinstance(evaluation, dict)
                         else dataclasses.replace(evaluation) if evaluation is not None else EvalConfig())

    # ---- configuration ------------------------------------------------------------------------
    def _validate(self, model, opponent, rounds, episodes, iterations, mode, actions, max_new, lr, levels,
                  dtype) -> None:
        models.validate_model_spec(model)
        check_choice("dtype", dtype, models.DTYPES)
        if not 1 <= len(self.agent_cfgs) <= 2:
            raise ConfigError(f"agents: expected one or two agents; got {len(self.agent_cfgs)}")
        names = [a.name for a in self.agent_cfgs]
        for i, n in enumerate(names):
            if not AGENT_NAME.match(str(n)):
                raise ConfigError(f"agents[{i}].name: got {n!r}; allowed: agent_0, agent_1")
        if len(set(names)) != len(names):
            raise ConfigError(f"agents: names must be distinct; got {names}")
        check_choice("opponent", opponent, OPPONENT_NAMES)
        if opponent == LLM_OPPONENT and len(names) != 2:
            raise ConfigError("opponent: 'llm' (self-play) needs two agents (agent_0 and agent_1); "
                              f"got {len(names)} agent(s)")
        for field_name, v in (("rounds_per_episode", rounds), ("episodes_per_iteration", episodes),
                              ("iterations_per_epoch", iterations), ("max_new_tokens", max_new), ("lr", lr),
                              ("prefix_levels", levels)):
            check_positive(field_name, v, allow_zero=field_name == "prefix_levels")
            if field_name != "lr" and not isinstance(v, int):
                raise ConfigError(f"{field_name}: got {v!r}; must be a whole number > 0")
        if not math.isfinite(lr):
            raise ConfigError(f"lr: got {lr!r}; must be a finite number > 0")
        check_choice("action_mode", mode, ("constrained", "free"))
        validate_actions(actions)

    def _new_kl(self) -> KLController:
        c = self.ppo_cfg
        return KLController(c.init_kl_coef, c.target_kl if c.kl_penalty == "adaptive" else None, c.kl_horizon)

    def _new_metrics(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({
            "coop": CooperationRate(), "illegal": IllegalRate(), "types": ActionTypes(),
            "deon": MoralRegret("deontological", xi=self.hparams.xi, illegal_penalty=self.hparams.illegal_penalty),
            "util": MoralRegret("utilitarian", payoffs=self.game.payoffs, illegal_penalty=self.hparams.illegal_penalty),
        })

    def set_opponent(self, name: str) -> None:
        """Switch every agent's opponent (a fixed strategy name or ``llm``); used by OpponentSchedule."""
        check_choice("opponent", name, OPPONENT_NAMES)
        if name == LLM_OPPONENT and len(self.agent_names) != 2:
            raise ConfigError("opponent: 'llm' needs two agents")
        self.opponent_name = name
        if name != LLM_OPPONENT:
            for a in self.agent_names:
                if (a, name) not in self.opponents:
                    seed = opponent_seed(self.hparams.seed, a, name, self.global_rank)
                    self.opponents[(a, name)] = make_opponent(name, seed=seed)

    def set_reward(self, agent: str, reward: str | dict) -> None:
        """Switch an agent's reward (used by RewardSchedule); statistics and KL state carry on."""
        check_choice("agent", agent, self.agent_names)
        self.rewards[agent] = RewardSpec.parse(reward, self.hparams.xi, self.hparams.illegal_penalty,
                                               f"reward of {agent}")

    def configure_model(self) -> None:
        """Load the base model and build adapters and value heads (once)."""
        if self.policy is not None:
            return
        # Loading may build and initialise weights (the tiny model, the first time): keep it off torch's global
        # RNG so the adapters' initialisation depends on the seed only, not on what the cache held.
        with torch.random.fork_rng(devices=[]):
            base, self.tokenizer = models.load(self.hparams.model, self.hparams.dtype)
        self.policy = Policy(base, self.agent_names, self.lora, self.hparams.value_head_dropout,
                             self.hparams.prefix_levels)
        if self.hparams.init_adapter:
            start = read_adapter(self.hparams.init_adapter)
            for agent in self.agent_names:
                self.policy.load_adapter_state(agent, start)
        if self.hparams.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        self.renderer = PromptRenderer(self.tokenizer, self.game, self.style)
        limit = getattr(base.config, "max_position_embeddings", None)
        need = self.renderer.max_prompt_len + self.hparams.max_new_tokens
        if limit is not None and need > limit:
            raise ConfigError(f"model: prompts need {need} tokens but {self.hparams.model!r} has a context of {limit}")
        self.sampler = ActionSampler(self.policy, self.renderer, self.hparams.action_mode,
                                     self.hparams.max_new_tokens, naive=self.hparams.naive)

    def setup(self, stage: str) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if rank:
            # Each process plays its own games: its own streams, for states, orders, sampling and opponents.
            self.streams = Streams.from_seed(self.hparams.seed, "rank", rank)
            self.opponents.clear()
            self.set_opponent(self.opponent_name)

    def configure_callbacks(self):
        """Adapters are exported in peft format beside every checkpoint, SIGTERM saves a checkpoint, and progress is
        shown every iteration, unless the user configured these callbacks."""
        from lit_moral.callbacks import AdapterExport, PreemptionCheckpoint, Progress

        have = self.trainer.callbacks if self._trainer is not None else []
        return [cls() for cls in (AdapterExport, PreemptionCheckpoint, Progress)
                if not any(isinstance(c, cls) for c in have)]

    def configure_optimizers(self):
        return [torch.optim.Adam([p for _, p in self.policy.agent_parameters(a)], lr=self.hparams.lr)
                for a in self.trained]

    def train_dataloader(self) -> DataLoader:
        # The loader's own generator: starting an epoch must not draw from torch's global RNG (dropout uses it).
        return _IterationLoader(_Iterations(self.hparams.iterations_per_epoch, lambda: self.iteration),
                                batch_size=None, generator=torch.Generator())

    # ---- evaluation (python -m lit_moral test): the logic lives in lit_moral.evaluation ----------
    def test_dataloader(self) -> DataLoader:
        """One batch: the whole evaluation runs in a single ``test_step``."""
        return DataLoader([0], batch_size=None)

    def test_step(self, batch, batch_idx: int) -> None:
        from lit_moral.evaluation import run_test

        self.log_dict(run_test(self), on_step=False, on_epoch=True, batch_size=1)

    # ---- one PPO iteration ----------------------------------------------------------------------
    def matches(self) -> list[Match]:
        n = self._local_games()
        if self.opponent_name == LLM_OPPONENT:
            return [Match(("agent_0", "agent_1"), n)]
        return [Match((a, self.opponents[(a, self.opponent_name)]), n) for a in self.agent_names]

    def _local_games(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        n = self.hparams.episodes_per_iteration
        if n % world:
            raise ConfigError(f"episodes_per_iteration: {n} does not split evenly over {world} processes")
        return n // world

    def training_step(self, batch, batch_idx: int) -> None:
        t0 = time.perf_counter()
        self.policy.eval()
        played = play(self.sampler, self.matches(), self.game, self.hparams.rounds_per_episode, self.rewards,
                      self.streams)
        samples = {a: merge(parts) for a, parts in played.items()}
        for agent, s in samples.items():
            self._check_finite(s.reward, "reward", agent)
        t1 = time.perf_counter()
        self.policy.train()
        logs: dict[str, float] = {}
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for agent, opt in zip(self.trained, optimizers):
            logs.update(self._update(agent, samples[agent], opt))
        t2 = time.perf_counter()
        self.policy.eval()
        self.episode += self.hparams.episodes_per_iteration
        self.iteration += 1
        self.last_samples = samples
        moves = sum(len(s) for s in samples.values()) * (self.trainer.world_size if self._trainer else 1)
        logs.update({"perf/moves_per_s": moves / (t2 - t0), "perf/rollout_s": t1 - t0, "perf/update_s": t2 - t1,
                     "perf/episode": float(self.episode)})
        self.last_perf = {"moves": moves, "rollout_s": t1 - t0, "update_s": t2 - t1}
        self._log_iteration(samples, logs)

    def _update(self, agent: str, s: AgentSamples, opt) -> dict[str, float]:
        """PPO update of one agent on its samples (TRL-legacy step, protocol section 6)."""
        cfg, dev = self.ppo_cfg, self.device
        self.policy.activate(agent)
        scores = s.reward.clone()
        if cfg.normalize_rewards:
            # Statistics over every process's games, so all processes normalise alike (as one process would).
            self.moments[agent].update(self._gather(scores) if self._distributed() else scores)
            scores = self.moments[agent].normalize(scores)
        rewards, kl = kl_rewards(scores, s.old_logp, s.ref_logp, s.mask.float(), self.kl_ctl[agent].value)
        adv, ret = gae(rewards, s.values, s.mask.float(), cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, s.mask.float())
        old_logp, old_values, mask = s.old_logp.to(dev), s.values.to(dev), s.mask.to(dev).float()
        adv, ret = adv.to(dev), ret.to(dev)
        n, t = s.mask.shape
        size = math.ceil(n / cfg.minibatches)
        passes = cfg.ppo_epochs * math.ceil(n / size)
        stats: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=self.streams.minibatch)
            for k in range(0, n, size):
                idx = perm[k:k + size]
                # The obvious path backpropagates sample by sample (a plain loop's gradient accumulation;
                # holding every sample's full-vocabulary graph at once does not fit in memory). The masked
                # means of ppo_loss are token-weighted sums, so the weighted parts add up to the same loss.
                parts = [idx[j:j + 1] for j in range(len(idx))] if self.hparams.naive else [idx]
                total = mask[idx].sum().clamp_min(1.0)
                loss, st = torch.zeros((), device=dev), {}
                for part in parts:
                    out = {k: pad_steps(v, t) for k, v in self._score(agent, s, part).items() if k != "mask"}
                    l_part, st_part = ppo_loss(out["logp"], old_logp[part], out["values"], old_values[part],
                                               ret[part], adv[part], mask[part], cfg, out["entropy"])
                    w = mask[part].sum() / total
                    self._check_finite(l_part, "loss", agent)
                    with self._without_ddp_reducer():
                        self.manual_backward(w * l_part / passes if cfg.paper_compat else w * l_part)
                    loss = loss + w * l_part.detach()
                    st = {key: st.get(key, 0.0) + w * v for key, v in st_part.items()}
                if not cfg.paper_compat:
                    self._step(opt, agent)
                stats.append({**st, "total": loss.detach()})
        if cfg.paper_compat:
            # The original's effective update: one Adam step on the average of all passes' gradients.
            self._step(opt, agent)
        # The KL controller sees every process's games, so its coefficient stays identical on all processes.
        world = self.trainer.world_size if self._distributed() else 1
        mean_kl = (self._gather(kl.sum(1).mean()).mean() if world > 1 else kl.sum(1).mean()).item()
        self.kl_ctl[agent].update(mean_kl, n * world)
        avg = {k: torch.stack([x[k] for x in stats]).mean().item() for k in stats[0]}
        ev = explained_variance(s.values, ret.cpu(), s.mask.float()).item()
        return {
            f"loss/policy/{agent}": avg["policy"], f"loss/value/{agent}": avg["value"],
            f"loss/total/{agent}": avg["total"], f"policy/entropy/{agent}": avg["entropy"],
            f"policy/approx_kl/{agent}": avg["approx_kl"], f"policy/clipfrac/{agent}": avg["clipfrac"],
            f"policy/ratio/{agent}": avg["ratio"], f"policy/kl/{agent}": mean_kl,
            f"policy/kl_coef/{agent}": self.kl_ctl[agent].value, f"value/clipfrac/{agent}": avg["value_clipfrac"],
            f"value/explained_variance/{agent}": ev, f"reward/normalized/{agent}": scores.mean().item(),
        }

    def _score(self, agent: str, s: AgentSamples, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        table = self.renderer.token_ids
        naive = self.hparams.naive
        if self.hparams.action_mode == "constrained":
            return self.policy.score_samples(agent, table, s.pid[idx], candidates=self.renderer.action_ids,
                                             choice=s.choice[idx], naive=naive)
        return self.policy.score_samples(agent, table, s.pid[idx], responses=[s.responses[i] for i in idx.tolist()],
                                         naive=naive)

    def _without_ddp_reducer(self):
        """Skip the DDP wrapper's gradient reducer: it expects one backward per forward over every parameter,
        while an iteration runs many backward passes that each touch one agent. ``_average_gradients``
        averages across processes instead."""
        model = self.trainer.strategy.model if self._trainer is not None else None
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    def _distributed(self) -> bool:
        dist = torch.distributed
        return (self._trainer is not None and self.trainer.world_size > 1 and dist.is_available()
                and dist.is_initialized())

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` concatenated (flattened), on the CPU; collectives run on the module's device."""
        return self.all_gather(x.to(self.device)).reshape(-1).cpu()

    def _average_gradients(self, agent: str) -> None:
        """Average ``agent``'s gradients over all processes (one all-reduce); a no-op in one process."""
        if not self._distributed():
            return
        dist = torch.distributed
        params = [p for _, p in self.policy.agent_parameters(agent)]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.trainer.world_size
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))

    def _step(self, opt, agent: str) -> None:
        self._average_gradients(agent)
        if self.ppo_cfg.max_grad_norm > 0:
            self.clip_gradients(opt, gradient_clip_val=self.ppo_cfg.max_grad_norm, gradient_clip_algorithm="norm")
        for name, p in self.policy.agent_parameters(agent):
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise FloatingPointError(f"non-finite gradient in {name} at iteration {self.iteration}, agent {agent}; "
                                         "the last good checkpoint is kept")
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _check_finite(self, x: torch.Tensor, what: str, agent: str) -> None:
        """Stop the run (every process at once) when ``x`` holds a NaN or infinity."""
        bad = torch.tensor(float(not torch.isfinite(x).all()), device=self.device)
        if self._distributed():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            raise FloatingPointError(f"non-finite {what} at iteration {self.iteration}, agent {agent}; "
                                     "the last good checkpoint is kept")

    # ---- logging --------------------------------------------------------------------------------
    def _log_iteration(self, samples: dict[str, AgentSamples], logs: dict[str, float]) -> None:
        for agent, s in samples.items():
            m = self.metrics[agent]
            m["coop"](s.action)
            m["illegal"](s.action)
            m["deon"](s.action, s.other_action, s.prev_other)
            m["util"](s.action, s.other_action, s.prev_other, s.seat)
            types = m["types"](s.action, s.prev_other)
            self.last_action_types[agent] = types
            self.log(f"game/coop_rate/{agent}", m["coop"], on_step=True, on_epoch=False, prog_bar=True)
            self.log(f"game/illegal_rate/{agent}", m["illegal"], on_step=True, on_epoch=False)
            self.log(f"moral/regret_deontological/{agent}", m["deon"], on_step=True, on_epoch=False)
            self.log(f"moral/regret_utilitarian/{agent}", m["util"], on_step=True, on_epoch=False)
            for name, v in zip(ACTION_TYPES, types.tolist()):
                logs[f"actions/{name}/{agent}"] = v
            logs[f"reward/total/{agent}"] = s.reward.mean().item()
            for k, v in s.components.items():
                logs[f"reward/{k}/{agent}"] = v.float().mean().item()
            if self.hparams.action_mode == "constrained":
                logs[f"game/format_mass/{agent}"] = s.format_mass.mean().item()
        logs["step"] = float(self.episode)  # TensorBoard's x-axis is episodes, as in the paper
        self.log_dict(logs, on_step=True, on_epoch=False, sync_dist=True)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Only the agents' trainable state: LoRA weights and value heads (not the frozen base, nor a frozen
        adapter added for evaluation such as ``warmup``)."""
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items()
                if "value_heads" in k or ("lora_" in k and any(f".{a}." in k for a in self.agent_names))}

    def fingerprint(self) -> dict:
        return {"model": self.hparams.model, "agents": list(self.agent_names), "lora_r": self.lora.r,
                "lora_target_modules": self.lora.target_modules, "action_mode": self.hparams.action_mode}

    def _rng_states(self) -> list[dict]:
        """Every process's random state in rank order: its streams, torch's global RNG (dropout), opponents."""
        mine = {"streams": self.streams.state_dict(), "torch": torch.get_rng_state(),
                "opponents": {f"{a}|{name}": o.state_dict() for (a, name), o in self.opponents.items()}}
        if not self._distributed():
            return [mine]
        out: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(out, mine)
        return out

    def check_finite_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Refuse to save (raise FloatingPointError) when a trainable weight holds a NaN or infinity."""
        for k, v in state_dict.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise FloatingPointError(f"refusing to write a checkpoint at iteration {self.iteration}: {k} is not "
                                         "finite; the last good checkpoint is kept")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite_weights(checkpoint["state_dict"])
        checkpoint["lit_moral"] = {
            "fingerprint": self.fingerprint(), "episode": self.episode, "iteration": self.iteration,
            "opponent": self.opponent_name,
            "rewards": {a: {"weights": dict(r.weights), "name": r.name} for a, r in self.rewards.items()},
            "kl": {a: c.state_dict() for a, c in self.kl_ctl.items()},
            "moments": {a: m.state_dict() for a, m in self.moments.items()},
            "rng": self._rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lit_moral")
        if state is None:
            raise ConfigError("ckpt_path: not a lit_moral checkpoint (no 'lit_moral' section)")
        mine, theirs = self.fingerprint(), state["fingerprint"]
        diff = [f"{k}: checkpoint has {theirs.get(k)!r}, config has {mine[k]!r}" for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise ConfigError("ckpt_path: checkpoint does not match this run (" + "; ".join(diff) + ")")
        # The config is authoritative: its reward and opponent stay (a RewardSchedule / OpponentSchedule
        # re-applies the entry of the restored episode before the next iteration).
        self.episode, self.iteration = int(state["episode"]), int(state["iteration"])
        for a, c in state["kl"].items():
            self.kl_ctl[a].load_state_dict(c)
        for a, m in state["moments"].items():
            self.moments[a].load_state_dict(m)
        rng = state.get("rng", [])
        if self.global_rank < len(rng):
            # A process beyond the saved world size keeps the fresh stream ``setup`` seeded.
            mine = rng[self.global_rank]
            self.streams.load_state_dict(mine["streams"])
            torch.set_rng_state(mine["torch"])
            for key, o in mine["opponents"].items():
                agent, name = key.split("|")
                if agent in self.agent_names:
                    opp = self.opponents.setdefault(
                        (agent, name), make_opponent(name, seed=opponent_seed(self.hparams.seed, agent, name)))
                    opp.load_state_dict(o)
