"""The LightningModule: one iteration per ``training_step`` (manual optimization), as wiring only.

An iteration: pair the population (:mod:`lit_moral.pairing`) -> play ``episodes_per_iteration`` games of
``rounds_per_episode`` rounds for every match in parallel (:func:`lit_moral.rollout.play`) -> each trained
agent's update on its own samples (:mod:`lit_moral.learners`) -> metrics and logs. Hyperparameters and
schedules count *episodes* (games), as the paper does; ``self.episode`` is saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_moral import models
from lit_moral import public_goods as pgg
from lit_moral.adapters import check_adapter, read_adapter
from lit_moral.config import (
    AgentConfig,
    agent_configs,
    learned_path,
    validate_agents,
    validate_basics,
    validate_lora,
    validate_sampling,
    validate_sizes,
)
from lit_moral.distributed import any_true, average_gradients, is_distributed, without_ddp_reducer
from lit_moral.errors import ConfigError, check_choice
from lit_moral.evaluation import EvalConfig
from lit_moral.games import ACTION_TYPES, MatrixGame
from lit_moral.learners import LEARNERS, PPOLearner, make_learner
from lit_moral.metrics import ActionTypes, CooperationRate, IllegalRate, MoralRegret, PopulationPayoffs, SelectionMatrix
from lit_moral.opponents import OPPONENT_NAMES, OPPONENTS, Opponent, make_opponent
from lit_moral.pairing import (
    SelectionRenderer,
    fixed_pairs,
    latest_moves,
    random_pairs,
    round_robin_pairs,
    selection_matches,
    selection_samples,
    validate_population,
)
from lit_moral.policy import LoraSpec, Policy
from lit_moral.ppo import PPOConfig
from lit_moral.prompts import PromptRenderer, PromptStyle
from lit_moral.public_goods import PublicGoodsConfig
from lit_moral.reason import answer_stats
from lit_moral.rewards import RewardSpec
from lit_moral.rollout import ActionSampler, AgentSamples, Match, merge, play
from lit_moral.seeding import Streams, generator, opponent_seed

__all__ = ["AgentConfig", "MoralPPO"]


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


class MoralPPO(pl.LightningModule):
    """LLM agents (LoRA adapters on one frozen base) trained with PPO on game and moral rewards.

    Args:
        model: model spec: ``smollm2-135m-instruct`` (offline default), ``gemma-3-270m``, ``tiny``,
            a local directory or a hub id already in the local cache.
        dtype: weights dtype: float32, bfloat16 or float16.
        agents: the LLM agents, any number (default: one deontological ``agent_0``); each has its own reward,
            LoRA adapter, value head, optimizer, KL controller and reward statistics.
        opponent: each agent's opponent under ``pairing: fixed`` (a fixed strategy: tft, always_cooperate,
            always_defect, random, ...), or ``llm``: the agents play each other two by two in config order.
        pairing: who plays whom each iteration: ``fixed`` (each agent vs its opponent), ``round_robin`` (every
            pair of population members), ``random`` (random disjoint pairs each iteration), ``selection`` (each
            agent picks the partner of each of its games by a constrained choice of its own among the other
            members, shown with their latest moves; the pick is trained with the mean reward of the game it led
            to, by a learner of its own on the same adapter and optimizer, AIES'24).
        strategies: fixed strategies that are members of the population (round_robin, random, selection), e.g.
            ``[tft, always_defect]``.
        game: game name (IPD, ISH, ICN, BOS, ICD) or a ``[2, 2, 2]`` payoff list.
        rounds_per_episode: rounds per game (paper: 5 vs fixed strategies, 3 for two learners).
        episodes_per_iteration: games played in parallel per PPO iteration, per match (the paper: 1).
        iterations_per_epoch: PPO iterations per Lightning epoch (bound runs with ``trainer.max_epochs``).
        action_mode: ``constrained`` (choose among the legal strings), ``free`` (generate, exact-match) or
            ``reason`` (brief reasoning, then a final line ``Action: <label>``, parsed strictly; docs/reason.md).
        actions: the two action strings, C first.
        max_new_tokens: tokens generated in free mode (paper: 2) and reason mode (e.g. 64-256).
        temperature: reason mode only: sampling temperature (log-probs of rollout and update are the tempered
            policy's); the other modes keep the paper's sampling at 1.
        top_p: reason mode only: nucleus sampling mass (1 = off); the update's log-probs are untruncated.
        stop_at_action: reason mode only: an answer stops at its first completed ``Action:`` line (what follows
            could only make it illegal); false lets it run to EOS or ``max_new_tokens``.
        xi: deontological penalty (paper: 3).
        illegal_penalty: reward for an illegal answer (paper: -6).
        lora: LoRA settings.
        value_head_dropout: value-head dropout (paper: 0.1).
        ppo: PPO settings.
        algorithm: the learner (docs/learners.md): ``ppo`` (value head, GAE); critic-free, the value head
            untrained: ``grpo`` (``adv = (R - group mean) / (group std + 1e-4)``), ``rloo`` (``R`` - mean of the
            group's other samples), groups = samples of the same prompt id and seat, a group of one or of equal
            returns giving 0; ``reinforce`` (``R`` - running mean of ``R`` per prompt id and seat). ``R`` = score -
            ``kl_coef`` x summed KL to the base, the same for every token of a sample.
        lr: Adam learning rate (paper: 1.41e-5).
        prefix_levels: shared-prefix tree depth in the forward engine (0 = automatic, 1 = no prefix reuse).
        seed: seed of every random stream of the run: initial states, option orders, sampling, minibatches,
            pairings and each opponent get their own stream derived from it (and from the process rank). The CLI
            links it to ``seed_everything``, which also seeds adapter initialisation and dropout.
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
        memory: rounds of history the prompt shows (1 = the paper's memory-1 state, up to 4); each episode's
            earlier rounds are drawn as the start state is, one draw per round.
        public_goods: None (default): the 2x2 ``game``. Settings of the n-player public-goods game instead (players
            ``n``, ``endowment``, ``share``, contribution policies ``others``; docs/public_goods.md): every game is
            one group of all the agents and the policies; ``game`` and ``opponent`` are then unused, and
            ``pairing`` must be ``fixed``.
    """

    def __init__(
        self,
        model: str = models.SMOLLM2,
        dtype: str = "float32",
        agents: list[AgentConfig] | None = None,
        opponent: str = "tft",
        pairing: str = "fixed",
        strategies: list[str] | None = None,
        game: str | list = "IPD",
        rounds_per_episode: int = 5,
        episodes_per_iteration: int = 64,
        iterations_per_epoch: int = 10,
        action_mode: Literal["constrained", "free", "reason"] = "constrained",
        actions: tuple[str, str] = ("action1", "action2"),
        max_new_tokens: int = 2,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_at_action: bool = True,
        xi: float = 3.0,
        illegal_penalty: float = -6.0,
        lora: LoraSpec = LoraSpec(),  # noqa: B008 - frozen: safe, and jsonargparse documents its fields
        value_head_dropout: float = 0.0,
        ppo: PPOConfig = PPOConfig(),  # noqa: B008 - frozen, as lora
        algorithm: str = "ppo",
        lr: float = 1.41e-5,
        prefix_levels: int = 0,
        seed: int | None = 0,
        run_name: str = "run",
        naive: bool = False,
        evaluation: EvalConfig = EvalConfig(),  # noqa: B008 - copied below, never mutated
        gradient_checkpointing: bool = False,
        system_prompt: str | None = None,
        init_adapter: str | None = None,
        memory: int = 1,
        public_goods: PublicGoodsConfig | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False
        if seed is None:  # seed_everything: true (see cli._module_seed): the seed Lightning drew
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.save_hyperparameters()
        # Everything cheap is validated before any model is loaded.
        self.agent_cfgs = agent_configs(agents)
        self.strategies = list(strategies or [])
        self.lora, self.ppo_cfg = lora or LoraSpec(), ppo or PPOConfig()
        self.public_goods = pgg.public_goods_config(public_goods)
        self._validate()
        self.game = MatrixGame.from_spec(game, "game") if self.public_goods is None else self.public_goods.game()
        self.style = PromptStyle(actions=tuple(actions), system_prompt=system_prompt, memory=memory,
                                 answer="reason" if action_mode == "reason" else "direct")
        # reward: {learned: <reward-model ckpt>} (docs/preference.md): checked now, loaded in configure_model; the
        # intrinsic components stay logged (weights 0) and the regrets stay intrinsic.
        self.learned_paths = {a.name: path for a in self.agent_cfgs if (path := learned_path(a.reward)) is not None}
        for i, a in enumerate(self.agent_cfgs):
            if a.name in self.learned_paths:
                from lit_moral.preference.reward_model import check_learned

                check_learned(self.learned_paths[a.name], model=model, actions=actions, field=f"agents[{i}].reward.learned")
        self.rewards = {a.name: RewardSpec.parse({"game": 0.0} if a.name in self.learned_paths else a.reward, xi,
                                                 illegal_penalty, f"agents[{i}].reward")
                        for i, a in enumerate(self.agent_cfgs)}
        self.learned: dict = {}  # agent -> LearnedReward (configure_model)
        self.agent_names = [a.name for a in self.agent_cfgs]
        self.trained = [a.name for a in self.agent_cfgs if a.train]
        self.learners: dict[str, PPOLearner] = {a: make_learner(algorithm, self.ppo_cfg) for a in self.agent_names}
        # One opponent (and random stream) per (agent, strategy), kept across switches: a Random opponent met
        # again after a schedule switch continues its stream instead of replaying it.
        self.opponents: dict[tuple[str, str], Opponent] = {}
        self.opponent_name = opponent
        self.set_opponent(opponent)
        self.episode = self.iteration = 0
        self.streams = Streams.from_seed(seed, "rank", 0)
        self.contributors = self.public_goods.contributors(len(self.agent_names), seed) if self.public_goods else []
        self.pairing_gen = generator(seed, "pairing")  # identical on every process: all play the same pairs
        self.policy: Policy | None = None
        self.tokenizer = self.renderer = self.sampler = None
        self.last_samples: dict[str, AgentSamples] = {}
        self.last_action_types: dict[str, torch.Tensor] = {}  # agent -> [6] frequencies of the last iteration
        self.metrics = torch.nn.ModuleDict({a: self._new_metrics() for a in self.agent_names})
        self.members = [*self.agent_names, *self.strategies]
        self.population = PopulationPayoffs(self.members)
        self.selection_learners = ({a: make_learner(algorithm, self.ppo_cfg) for a in self.agent_names}
                                   if pairing == "selection" else {})
        self.selection_matrix = SelectionMatrix(self.agent_names, self.members)
        self.latest = {m: int(x) for m, x in zip(self.members, torch.randint(0, 2, (len(self.members),),
                                                                             generator=generator(seed, "latest")))}
        self.selectors: dict[str, tuple[SelectionRenderer, ActionSampler]] = {}
        self.last_selection: dict[str, AgentSamples] = {}
        self.eval_cfg = (EvalConfig(**evaluation) if isinstance(evaluation, dict)
                         else dataclasses.replace(evaluation) if evaluation is not None else EvalConfig())

    # ---- configuration ------------------------------------------------------------------------
    def _validate(self) -> None:
        hp = self.hparams
        validate_basics(hp.model, hp.dtype, hp.action_mode, hp.actions)
        validate_agents(self.agent_cfgs, self.strategies)
        validate_population(self.agent_names_of_cfg(), self.strategies, hp.pairing, list(OPPONENTS))
        check_choice("algorithm", hp.algorithm, LEARNERS)
        for i, a in enumerate(self.agent_cfgs):
            check_choice(f"agents[{i}].opponent" if a.opponent else "opponent", a.opponent or hp.opponent,
                         OPPONENT_NAMES)
        validate_sizes(rounds_per_episode=hp.rounds_per_episode, episodes_per_iteration=hp.episodes_per_iteration,
                       iterations_per_epoch=hp.iterations_per_epoch, max_new_tokens=hp.max_new_tokens, lr=hp.lr,
                       prefix_levels=hp.prefix_levels)
        validate_lora(self.lora)
        validate_sampling(hp.action_mode, hp.temperature, hp.top_p)
        if hp.pairing == "fixed":
            fixed_pairs(self.agent_names_of_cfg(), self._opponent_names(hp.opponent))  # llm agents pair up evenly
        if hp.init_adapter is not None:
            check_adapter(hp.init_adapter, self.lora)
        if self.public_goods is not None and hp.pairing != "fixed":
            raise ConfigError(f"pairing: {hp.pairing!r}; the public-goods game plays every agent in one group: use fixed")
        if self.public_goods is not None and hp.memory != 1:
            raise ConfigError(f"memory: {hp.memory}; the public-goods game's prompt shows the last round only: use 1")

    def agent_names_of_cfg(self) -> list[str]:
        return [a.name for a in self.agent_cfgs]

    def _opponent_names(self, default: str) -> dict[str, str]:
        """agent -> its opponent under ``pairing: fixed`` (its own, else ``default``)."""
        return {a.name: a.opponent or default for a in self.agent_cfgs}

    def _new_metrics(self) -> torch.nn.ModuleDict:
        if self.public_goods is not None:
            return pgg.new_metrics(self.game, self.hparams.xi, self.hparams.illegal_penalty)
        return torch.nn.ModuleDict({
            "coop": CooperationRate(), "illegal": IllegalRate(), "types": ActionTypes(),
            "deon": MoralRegret("deontological", xi=self.hparams.xi, illegal_penalty=self.hparams.illegal_penalty),
            "util": MoralRegret("utilitarian", payoffs=self.game.payoffs, illegal_penalty=self.hparams.illegal_penalty),
        })

    @property
    def kl_ctl(self) -> dict:
        """agent -> its KL controller."""
        return {a: learner.kl for a, learner in self.learners.items()}

    @property
    def moments(self) -> dict:
        """agent -> its running reward statistics."""
        return {a: learner.moments for a, learner in self.learners.items()}

    def opponent_for(self, agent: str, name: str) -> Opponent:
        """The fixed strategy ``name`` that ``agent`` meets (one instance and stream per pair, kept for the run)."""
        if (agent, name) not in self.opponents:
            seed = opponent_seed(self.hparams.seed, agent, name, self.global_rank)
            self.opponents[(agent, name)] = make_opponent(name, seed=seed)
        return self.opponents[(agent, name)]

    def set_opponent(self, name: str) -> None:
        """Switch the run's opponent (a fixed strategy name or ``llm``); used by OpponentSchedule."""
        check_choice("opponent", name, OPPONENT_NAMES)
        if self.hparams.pairing == "fixed":
            for agent, opp in fixed_pairs(self.agent_names_of_cfg(), self._opponent_names(name)):
                if opp in OPPONENTS:
                    self.opponent_for(agent, opp)
        self.opponent_name = name

    def set_reward(self, agent: str, reward: str | dict) -> None:
        """Switch an agent's reward (used by RewardSchedule); statistics and KL state carry on."""
        check_choice("agent", agent, self.agent_names)
        self.rewards[agent] = RewardSpec.parse(reward, self.hparams.xi, self.hparams.illegal_penalty,
                                               f"reward of {agent}")

    def configure_model(self) -> None:
        """Load the base model and build adapters and value heads (once)."""
        if self.policy is not None:
            return
        hp = self.hparams
        # Loading may build and initialise weights (the tiny model, the first time): keep it off torch's global
        # RNG so the adapters' initialisation depends on the seed only, not on what the cache held.
        with torch.random.fork_rng(devices=[]):
            base, self.tokenizer = models.load(hp.model, hp.dtype)
        self.policy = Policy(base, self.agent_names, self.lora, hp.value_head_dropout, hp.prefix_levels)
        if hp.init_adapter:
            start = read_adapter(hp.init_adapter)
            for agent in self.agent_names:
                self.policy.load_adapter_state(agent, start)
        if hp.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        self.renderer = (PromptRenderer(self.tokenizer, self.game, self.style) if self.public_goods is None
                         else pgg.PublicGoodsRenderer(self.tokenizer, self.game, self.style))
        limit = getattr(base.config, "max_position_embeddings", None)
        need = self.renderer.max_prompt_len + hp.max_new_tokens
        if limit is not None and need > limit:
            raise ConfigError(f"model: prompts need {need} tokens but {hp.model!r} has a context of {limit}")
        self.policy.temperature = float(hp.temperature)
        self.sampler = ActionSampler(self.policy, self.renderer, hp.action_mode, hp.max_new_tokens, naive=hp.naive,
                                     top_p=float(hp.top_p), stop_at_action=bool(hp.stop_at_action))
        if self.learned_paths:
            from lit_moral.preference.reward_model import LearnedReward

            self.learned = {a: LearnedReward.load(path, self.policy, model=hp.model, actions=hp.actions,
                                                  illegal_penalty=hp.illegal_penalty)
                            for a, path in self.learned_paths.items()}
        if hp.pairing == "selection":
            for a in self.agent_names:
                r = SelectionRenderer(self.tokenizer, [m for m in self.members if m != a], self.style.actions,
                                      self.renderer._wrap)
                self.selectors[a] = (r, ActionSampler(self.policy, r, "constrained", naive=hp.naive))

    def setup(self, stage: str) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if rank:
            # Each process plays its own games: its own streams, for states, orders, sampling and opponents.
            self.streams = Streams.from_seed(self.hparams.seed, "rank", rank)
            if self.public_goods is not None:
                self.contributors = self.public_goods.contributors(len(self.agent_names), self.hparams.seed, rank)
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

    # ---- one iteration ------------------------------------------------------------------------------
    def pairs(self) -> list[tuple[str, str]]:
        """This iteration's pairs of population members (agent names, strategy names)."""
        pairing = self.hparams.pairing
        members = [*self.agent_names, *self.strategies]
        if pairing == "round_robin":
            return round_robin_pairs(members, self.agent_names)
        if pairing == "random":
            return random_pairs(members, self.agent_names, self.pairing_gen)
        return fixed_pairs(self.agent_names, self._opponent_names(self.opponent_name))

    def matches(self) -> list[Match]:
        """This iteration's matches: each pair with its fixed strategy (if any) as that agent's own opponent."""
        n = self._local_games()
        out = []
        for a, b in self.pairs():
            if a not in self.agent_names:  # a strategy in seat 0 meets the agent in seat 1
                out.append(Match((self.opponent_for(b, a), b), n))
            elif b not in self.agent_names:
                out.append(Match((a, self.opponent_for(a, b)), n))
            else:
                out.append(Match((a, b), n))
        return out

    # ---- partner selection (pairing: selection) ---------------------------------------------------------
    @torch.no_grad()
    def _select(self) -> dict[str, tuple]:
        """Every agent picks the partner of each of its games: ``agent -> (moves, pid [n], partner of each game)``."""
        n, out = self._local_games(), {}
        for a in self.agent_names:
            r, sampler = self.selectors[a]
            sampler.reset()  # the weights changed since the last iteration
            pid = torch.full((n,), r.pid(self.latest), dtype=torch.long)
            (mv,) = sampler.act([(a, pid)], self.streams.sampling)
            out[a] = (mv, pid, [r.candidates[c] for c in mv.choice.tolist()])
        return out

    def _selected_matches(self, picks: dict[str, tuple]) -> list[Match]:
        return selection_matches({a: games for a, (_, _, games) in picks.items()}, self.members, self.agent_names,
                                 self.opponent_for, Match)

    def _selection_samples(self, a: str, mv, pid: torch.Tensor, games: list[str], played) -> AgentSamples:
        r, _ = self.selectors[a]
        return selection_samples(a, mv, pid, games, played[a], r)

    def _population_metrics(self, played, picks) -> None:
        """Every member's payoffs this iteration (for collective payoff, equality, minimum), the selection counts,
        and the members' latest moves for the next selection prompt."""
        for parts in played.values():
            for s in parts:
                self.population.update(s.agent, s.payoff_me)
                if s.opponent not in played and s.opponent in self.members:
                    self.population.update(s.opponent, s.payoff_other)
        for a, (_, _, games) in picks.items():
            self.selection_matrix.update(a, games)
        self.latest = latest_moves(played, self.members, self.latest)

    def _local_games(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        n = self.hparams.episodes_per_iteration
        if n % world:
            raise ConfigError(f"episodes_per_iteration: {n} does not split evenly over {world} processes")
        return n // world

    def training_step(self, batch, batch_idx: int) -> None:
        t0 = time.perf_counter()
        self.policy.eval()
        picks = self._select() if self.hparams.pairing == "selection" else {}
        if self.public_goods is not None:
            played = pgg.play(self.sampler, self.game, self.agent_names, self.contributors, self._local_games(),
                              self.hparams.rounds_per_episode, self.rewards, self.streams)
        else:
            matches = self._selected_matches(picks) if picks else self.matches()
            played = play(self.sampler, matches, self.game, self.hparams.rounds_per_episode, self.rewards, self.streams)
        self.last_selection = {a: self._selection_samples(a, mv, pid, games, played) for a, (mv, pid, games)
                               in picks.items()}
        self._population_metrics(played, picks)
        samples = {a: merge(parts) for a, parts in played.items()}
        for a, learned in self.learned.items():  # the RLHF route: the reward model's score replaces the reward
            if a in samples:
                samples[a].reward = learned.rewards(self.renderer.token_ids, self.renderer.action_ids, samples[a].pid,
                                                    samples[a].action)
        self.last_played = played  # agent -> samples per match, before merging
        for agent, s in samples.items():
            self.check_finite(s.reward, "reward", agent)
        t1 = time.perf_counter()
        self.policy.train()
        logs: dict[str, float] = {}
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for agent, opt in zip(self.trained, optimizers):
            self.policy.activate(agent)
            if agent in samples:  # a random pairing may leave an agent out of an iteration
                logs.update(self.learners[agent].update(agent, samples[agent], opt, self, self.device))
            if agent in self.last_selection:
                sel = self.selection_learners[agent].update(agent, self.last_selection[agent], opt, self, self.device)
                logs.update({f"selection/{k}": v for k, v in sel.items()})
        t2 = time.perf_counter()
        self.policy.eval()
        self.episode += self.hparams.episodes_per_iteration
        self.iteration += 1
        self.last_samples = samples
        moves = sum(len(s) for s in samples.values()) * self.world_size
        logs.update({"perf/moves_per_s": moves / (t2 - t0), "perf/rollout_s": t1 - t0, "perf/update_s": t2 - t1,
                     "perf/episode": float(self.episode)})
        self.last_perf = {"moves": moves, "rollout_s": t1 - t0, "update_s": t2 - t1}
        self._log_iteration(samples, logs)

    # ---- what a learner needs (lit_moral.learners.Hooks) ----------------------------------------------
    @property
    def naive(self) -> bool:
        return self.hparams.naive

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if is_distributed(self._trainer) else 1

    @property
    def minibatch_generator(self) -> torch.Generator:
        return self.streams.minibatch

    def score(self, agent: str, s: AgentSamples, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        table = s.table if s.table is not None else self.renderer.token_ids
        if s.candidates is not None or self.hparams.action_mode == "constrained":
            cands = s.candidates if s.candidates is not None else self.renderer.action_ids
            return self.policy.score_samples(agent, table, s.pid[idx], candidates=cands, choice=s.choice[idx],
                                             naive=self.hparams.naive)
        return self.policy.score_samples(agent, table, s.pid[idx], responses=[s.responses[i] for i in idx.tolist()],
                                         naive=self.hparams.naive)

    def backward_part(self, loss: torch.Tensor) -> None:
        with without_ddp_reducer(self._trainer):
            self.manual_backward(loss)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` concatenated (flattened), on the CPU; collectives run on the module's device."""
        return self.all_gather(x.to(self.device)).reshape(-1).cpu()

    def step_agent(self, opt, agent: str) -> None:
        params = self.policy.agent_parameters(agent)
        if is_distributed(self._trainer):
            average_gradients([p for _, p in params], self.trainer.world_size)
        if self.ppo_cfg.max_grad_norm > 0:
            self.clip_gradients(opt, gradient_clip_val=self.ppo_cfg.max_grad_norm, gradient_clip_algorithm="norm")
        for name, p in params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise FloatingPointError(f"non-finite gradient in {name} at iteration {self.iteration}, agent {agent}; "
                                         "the last good checkpoint is kept")
        opt.step()
        opt.zero_grad(set_to_none=True)

    def check_finite(self, x: torch.Tensor, what: str, agent: str) -> None:
        """Stop the run (every process at once) when ``x`` holds a NaN or infinity."""
        if any_true(not bool(torch.isfinite(x).all()), self.device):
            raise FloatingPointError(f"non-finite {what} at iteration {self.iteration}, agent {agent}; "
                                     "the last good checkpoint is kept")

    # ---- logging --------------------------------------------------------------------------------
    def _log_iteration(self, samples: dict[str, AgentSamples], logs: dict[str, float]) -> None:
        for agent, s in samples.items():
            m = self.metrics[agent]
            m["coop"](s.action)
            m["illegal"](s.action)
            if "curve" in m:  # the public-goods game: regrets from the exact counts, and P(C | state)
                m["deon"](s.action, s.k_others, s.k_prev)
                m["util"](s.action, s.k_others, s.k_prev)
                m["curve"].update(s.action, s.prev_me, s.k_prev)
                logs.update(pgg.curve_logs(m["curve"].compute(), agent))  # a [2, N] tensor: logged as scalars
                m["curve"].reset()
                logs.update(pgg.group_logs(s))
            else:
                m["deon"](s.action, s.other_action, s.prev_other)
                m["util"](s.action, s.other_action, s.prev_other, s.seat)
            types = m["types"](s.action, s.prev_other)
            self.last_action_types[agent] = types
            for key, metric in (("game/coop_rate", "coop"), ("game/illegal_rate", "illegal"),
                                ("moral/regret_deontological", "deon"), ("moral/regret_utilitarian", "util")):
                self.log(f"{key}/{agent}", m[metric], on_step=True, on_epoch=False, prog_bar=metric == "coop")
            for name, v in zip(ACTION_TYPES, types.tolist()):
                logs[f"actions/{name}/{agent}"] = v
            logs[f"reward/total/{agent}"] = s.reward.mean().item()
            for k, v in s.components.items():
                logs[f"reward/{k}/{agent}"] = v.float().mean().item()
            if self.hparams.action_mode == "constrained":
                logs[f"game/format_mass/{agent}"] = s.format_mass.mean().item()
            if self.hparams.action_mode == "reason":
                texts = [self.tokenizer.decode(list(r), skip_special_tokens=True) for r in s.responses]
                stats = answer_stats(texts, self.style.actions, s.prev_other.tolist())
                logs.update({f"reason/{k}/{agent}": v for k, v in stats.items()})
                logs[f"reason/response_tokens/{agent}"] = s.mask.sum(1).float().mean().item()
        logs.update(self._population_logs(samples))
        logs["step"] = float(self.episode)  # TensorBoard's x-axis is episodes, as in the paper
        self.log_dict(logs, on_step=True, on_epoch=False, sync_dist=True)

    def _population_logs(self, samples: dict[str, AgentSamples]) -> dict[str, float]:
        """``population/*``: collective payoff, equality, minimum payoff, cooperation per reward type (runs with
        more than one member playing), and the selections' entropy."""
        stats = {k: float(v) for k, v in self.population.compute().items()}
        self.population.reset()
        if len(self.members) < 2 or len(samples) + len(self.strategies) < 2:
            return {}
        out = {f"population/{k}": v for k, v in stats.items()}
        by_type: dict[str, list[torch.Tensor]] = {}
        for agent, s in samples.items():
            by_type.setdefault(self.rewards[agent].name, []).append(s.action)
        for name, acts in by_type.items():
            out[f"population/coop_rate/{name}"] = float((torch.cat(acts) == 0).float().mean())
        return out

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
                "opponents": {f"{a}|{name}": o.state_dict() for (a, name), o in self.opponents.items()},
                "contributors": [c.state_dict() for c in self.contributors]}
        if not is_distributed(self._trainer):
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
            "learners": {a: learner.state_dict() for a, learner in self.learners.items()},
            "selection_learners": {a: learner.state_dict() for a, learner in self.selection_learners.items()},
            "selection_counts": self.selection_matrix.counts.cpu(), "latest": dict(self.latest),
            "pairing_gen": self.pairing_gen.get_state(),
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
        for a, learner_state in state.get("learners", {}).items():  # none in a DPO checkpoint: fresh state
            self.learners[a].load_state_dict(learner_state)
        for a, learner_state in state.get("selection_learners", {}).items():
            if a in self.selection_learners:
                self.selection_learners[a].load_state_dict(learner_state)
        if "selection_counts" in state and state["selection_counts"].shape == self.selection_matrix.counts.shape:
            self.selection_matrix.counts.copy_(state["selection_counts"])
        self.latest.update({m: v for m, v in state.get("latest", {}).items() if m in self.latest})
        if "pairing_gen" in state:
            self.pairing_gen.set_state(state["pairing_gen"])
        rng = state.get("rng", [])
        if self.global_rank < len(rng):
            # A process beyond the saved world size keeps the fresh stream ``setup`` seeded.
            mine = rng[self.global_rank]
            self.streams.load_state_dict(mine["streams"])
            torch.set_rng_state(mine["torch"])
            for key, o in mine["opponents"].items():
                agent, name = key.split("|")
                if agent in self.agent_names:
                    self.opponent_for(agent, name).load_state_dict(o)
            for c, st in zip(self.contributors, mine.get("contributors", [])):
                c.load_state_dict(st)
