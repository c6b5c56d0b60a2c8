"""Post-training evaluation across games, opponents and prompt variants (protocol sections 4, 7, 8).

The evaluation is the training engine without gradients: :func:`lit_moral.rollout.play` with the
memoised :class:`~lit_moral.rollout.ActionSampler`, the player being an agent's adapter or ``BASE``
(adapters disabled). Each *cell* ``(model, game, variant, opponent)`` plays ``episodes`` games of
``rounds`` rounds. Rewards and regrets use the payoffs of the game actually shown (the original
code used IPD payoffs for every game, protocol section 9). Every cell gets its own independent streams
(initial states, option orders, sampling, and the fixed opponent's) derived from ``(seed + run, game,
variant, opponent)`` and a purpose, so every model of a run sees the same initial states and the same
Random-opponent moves, and no stream moves in lock-step with another.

Why a dataclass argument of the module (``model.evaluation`` in YAML) and not only a callback: the
config saved beside every checkpoint then runs ``python -m lit_moral test --config <run>/config.yaml
--ckpt_path <ckpt>`` as it is, any field can be overridden on the command line
(``--model.evaluation.episodes 20``), and the :class:`~lit_moral.callbacks.Evaluation` callback only
has to say *when* to evaluate during ``fit`` (and which subset).

Several checkpoints (seeds) together: ``python -m lit_moral evaluate --config run.yaml --ckpt a.ckpt b.ckpt ...
[--out DIR]`` (:mod:`lit_moral.evaluate_runs`); run ``r`` uses seed ``seed + r`` and the summary's CIs are over runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lit_moral import public_goods as pgg
from lit_moral.errors import ConfigError, check_choice, check_positive
from lit_moral.games import ACTION_NAMES, GAME_NAMES, ILLEGAL, MatrixGame
from lit_moral.opponents import LLM_OPPONENT, OPPONENTS, make_opponent
from lit_moral.policy import BASE
from lit_moral.prompts import PERSONAS, PromptRenderer, PromptStyle
from lit_moral.reason import ILLEGAL_KINDS, mentions_previous_move, parse_reasoned, uses_moral_vocabulary
from lit_moral.rewards import deontological_regret, utilitarian_regret
from lit_moral.rollout import ActionSampler, Match, play
from lit_moral.seeding import Streams, derive_seed

# variant -> (which action strings, table order, prompt kind); "eval" strings are EvalConfig.eval_actions.
VARIANTS: dict[str, tuple[str, str, str]] = {
    "training_tokens": ("training", "original", "game"),
    "new_tokens": ("eval", "original", "game"),
    "permuted": ("eval", "permuted", "game"),
    "reversed": ("eval", "reversed", "game"),
    "choice": ("eval", "original", "choice"),
    "no_payoffs": ("eval", "original", "no_payoffs"),
    "opponent_move": ("eval", "original", "opponent_move"),
    "explicit_ipd": ("eval", "original", "explicit_ipd"),
    "story": ("eval", "original", "story"),
}
EVAL_OPPONENTS = (*OPPONENTS, LLM_OPPONENT)  # allowed; the default plays the paper's four and the other agents
DEFAULT_EVAL_OPPONENTS = ("random", "tft", "always_cooperate", "always_defect", LLM_OPPONENT)
BASE_LABEL = "base"


@dataclass
class EvalConfig:
    """What the evaluation plays (``python -m lit_moral test`` and the ``Evaluation`` callback).

    Attributes:
        episodes: games per cell (model, game, variant, opponent) and run (paper: 10).
        rounds: rounds per game (paper: 5).
        games: games whose payoff tables are shown; rewards and regrets use the same table. Besides the 2x2 games,
            ``PGG<N>[_r<r>][_e<E>]`` is the N-player public-goods game (r 2, E 10 unless given; PGG4: N 4, s 5):
            the model in one seat, every other seat the contribution policy of the opponent (random ->
            random_contributor, tft -> conditional_contributor, always_cooperate -> full_contributor,
            always_defect -> free_rider; other opponents and prompt kinds without a payoff table are skipped there).
        opponents: fixed strategies, plus ``llm`` = every other agent of the run (skipped with one agent).
        variants: prompt variants: training_tokens, new_tokens (action3/action4, the paper's evaluation),
            permuted, reversed (payoff-table order, new tokens), choice, no_payoffs, opponent_move,
            explicit_ipd, story (protocol section 4; the last five show no payoff table).
        eval_actions: the new action strings (C first) used by every variant except training_tokens.
        seed: base seed; run ``r`` uses ``seed + r``.
        xi: deontological penalty for the regret (None: the run's ``xi``; the original evaluation used 4).
        base: also evaluate the base model (adapters disabled), side by side.
        personas: persona-prompted base baselines (keys of ``lit_moral.prompts.PERSONAS``); they play the
            fixed-strategy opponents only.
        report_variant: variant of the Figure-4 tables and plots (None: new_tokens if evaluated, else the
            first variant).
        report_opponent: opponent of the Figure-4 tables and plots (None: random, the paper's, if evaluated,
            else the first opponent).
        output_dir: where files go (None: ``<log dir>/evaluation``).
        plots: write PNG plots (and log them to TensorBoard).
        cut_illegal: free mode: stop generating an answer at the first token after which it can no longer be legal
            (no continuation can make it an exact match); its action is the one full generation gives (illegal)
            and every other answer, and every random draw, is unchanged (``ActionSampler.cut_illegal``); only the
            ``answer`` column of ``rounds.csv`` shows that answer's text up to there. False: every answer is
            generated to ``max_new_tokens``.
    """

    episodes: int = 10
    rounds: int = 5
    games: list[str] = field(default_factory=lambda: list(GAME_NAMES))
    opponents: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_OPPONENTS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    eval_actions: tuple[str, str] = ("action3", "action4")
    seed: int = 1234
    xi: float | None = None
    base: bool = True
    personas: list[str] = field(default_factory=list)
    report_variant: str | None = None
    report_opponent: str | None = None
    output_dir: str | None = None
    plots: bool = True
    cut_illegal: bool = True

    def __post_init__(self) -> None:
        for name in ("episodes", "rounds"):
            v = getattr(self, name)
            check_positive(f"evaluation.{name}", v)
            if not isinstance(v, int):
                raise ConfigError(f"evaluation.{name}: got {v!r}; must be a whole number > 0")
        for name, allowed in (("games", GAME_NAMES), ("opponents", EVAL_OPPONENTS), ("variants", VARIANTS),
                              ("personas", PERSONAS)):
            values = getattr(self, name)
            if isinstance(values, str) or (name != "personas" and not values):
                raise ConfigError(f"evaluation.{name}: expected a non-empty list; got {values!r}")
            for v in values:
                if name == "games" and isinstance(v, str) and v.startswith("PGG"):
                    pgg.PublicGoodsGame.from_name(v, "evaluation.games")
                else:
                    check_choice(f"evaluation.{name}", v, (*allowed, "PGG<N>[_r<r>][_e<E>]") if name == "games"
                                 else allowed)
        # None stays None (resolved by shown_variant / shown_opponent): a saved config then still follows a
        # later override of variants or opponents (e.g. `test --model.evaluation.variants [training_tokens]`).
        check_choice("evaluation.report_variant", self.shown_variant, self.variants)
        check_choice("evaluation.report_opponent", self.shown_opponent, self.opponents)
        PromptStyle(actions=tuple(self.eval_actions))

    @property
    def shown_variant(self) -> str:
        """The variant of the Figure-4 tables and plots: ``report_variant``, else new_tokens if evaluated."""
        if self.report_variant is not None:
            return self.report_variant
        return "new_tokens" if "new_tokens" in self.variants else self.variants[0]

    @property
    def shown_opponent(self) -> str:
        """The opponent of the Figure-4 tables and plots: ``report_opponent``, else random if evaluated."""
        if self.report_opponent is not None:
            return self.report_opponent
        return "random" if "random" in self.opponents else self.opponents[0]


torch.serialization.add_safe_globals([EvalConfig])


class _EvalSampler(ActionSampler):
    """An ActionSampler whose memo survives ``play``'s reset: the weights do not change during an evaluation,
    so one (game, variant) prompt table is run once per model for all opponents."""

    def reset(self) -> None:
        return None

    def warm(self, players: Sequence[str], n_prompts: int | None = None) -> None:
        """Run the first ``n_prompts`` prompts of the table (default: all of them) for every player (not yet run) in
        one mixed-adapter forward."""
        n = self.renderer.n_ids if n_prompts is None else n_prompts
        self._resolve([(a, p, ()) for a in players for p in range(n)])


WARMUP_LABEL = "warmup"


def _sampling(module) -> dict:
    """The reason-mode sampling settings of ``module``'s run (older checkpoints: the defaults)."""
    hp = module.hparams
    return {"top_p": float(getattr(hp, "top_p", 1.0)), "stop_at_action": bool(getattr(hp, "stop_at_action", True))}


def models_of(module, cfg: EvalConfig) -> list[tuple[str, str, str]]:
    """``(label, player, persona)``: every agent, the starting adapter (``warmup``) of a run that has one, then the
    base model and its persona baselines."""
    out = [(a, a, "") for a in module.agent_names]
    if getattr(module.hparams, "init_adapter", None):
        out.append((WARMUP_LABEL, WARMUP_LABEL, ""))
    if cfg.base:
        out.append((BASE_LABEL, BASE, ""))
        out += [(f"{BASE_LABEL}+{p}", BASE, p) for p in cfg.personas]
    return out


def _by_persona(module, cfg: EvalConfig) -> dict[str, list[tuple[str, str]]]:
    """persona -> ``(label, player)`` of the models sharing that prompt table."""
    out: dict[str, list[tuple[str, str]]] = {}
    for label, player, persona in models_of(module, cfg):
        out.setdefault(persona, []).append((label, player))
    return out


def opponents_of(module, cfg: EvalConfig, player: str, persona: str) -> list[str]:
    """Opponent names for one model: fixed strategies, and the other agents for ``llm`` (not with personas).

    ``llm`` needs two agents or more: then each agent meets the others and the base model meets every agent
    (the same LLM opponents its fine-tuned counterparts met); with one agent it is skipped, as documented."""
    out = [o for o in cfg.opponents if o in OPPONENTS]
    if LLM_OPPONENT in cfg.opponents and not persona and len(module.agent_names) > 1:
        out += [a for a in module.agent_names if a != player]
    return out


def style_for(module, cfg: EvalConfig, variant: str, persona: str = "") -> PromptStyle:
    """The PromptStyle of one variant: training or evaluation action strings, table order, prompt kind."""
    tokens, order, kind = VARIANTS[variant]
    actions = tuple(module.style.actions) if tokens == "training" else tuple(cfg.eval_actions)
    return PromptStyle(actions=actions, table_order=order, use_chat_template=module.style.use_chat_template,
                       kind=kind, persona=persona, system_prompt=module.style.system_prompt,
                       memory=module.style.memory, answer=module.style.answer)


@torch.no_grad()
def evaluate(module, cfg: EvalConfig, run: int = 0) -> list[dict]:
    """Play every cell for one run (one checkpoint's weights, already loaded into ``module``).

    Args:
        module: a MoralPPO with its policy built (``configure_model``).
        cfg: the evaluation settings.
        run: run index (checkpoint / seed number); the run's seed is ``cfg.seed + run``.

    Returns:
        One dict per round with the columns of ``rounds.csv`` (:data:`lit_moral.report.ROUND_COLUMNS`).
    """
    policy, was_training = module.policy, module.policy.training
    if getattr(module.hparams, "init_adapter", None):
        from lit_moral.adapters import read_adapter

        policy.add_frozen_adapter(WARMUP_LABEL, read_adapter(module.hparams.init_adapter))
    policy.eval()
    seed, rows, samplers = cfg.seed + run, [], {}
    try:
        for game_name in cfg.games:
            if pgg.is_game_name(game_name):
                rows += _public_goods_cells(module, cfg, pgg.PublicGoodsGame.from_name(game_name), samplers, seed, run)
                continue
            game = MatrixGame.from_spec(game_name)
            for variant in cfg.variants:
                for persona, models in _by_persona(module, cfg).items():
                    renderer = PromptRenderer(module.tokenizer, game, style_for(module, cfg, variant, persona))
                    # Prompts without a payoff table are the same in every game: run them once per run.
                    sampler = samplers.setdefault(tuple(renderer.texts), _EvalSampler(
                        policy, renderer, module.hparams.action_mode, module.hparams.max_new_tokens,
                        with_reference=False, cut_illegal=cfg.cut_illegal, **_sampling(module)))
                    sampler.warm(sorted({p for _, p in models} | ({*module.agent_names} if not persona else set())))
                    for label, player in models:
                        for opp in opponents_of(module, cfg, player, persona):
                            rows += _play_cell(module, cfg, sampler, game, (label, player, variant, opp), seed, run)
    finally:
        policy.train(was_training)
    return rows


def _play_cell(module, cfg: EvalConfig, sampler: ActionSampler, game: MatrixGame, cell: tuple[str, str, str, str],
               seed: int, run: int) -> list[dict]:
    label, player, variant, opp = cell
    where = ("eval", game.name, variant, opp)  # not the model: every model of a run meets the same streams
    streams = Streams.from_seed(seed, *where)
    other = opp if opp in module.agent_names else make_opponent(opp, seed=derive_seed(seed, *where, "opponent"))
    first = module.rewards[module.agent_names[0]]
    rewards = {BASE: first, WARMUP_LABEL: first, **module.rewards}
    samples = play(sampler, [Match((player, other), cfg.episodes)], game, cfg.rounds, rewards, streams)[player][0]
    xi = module.hparams.xi if cfg.xi is None else cfg.xi
    return round_rows(samples, game, rewards[player], xi, sampler.renderer,
                      dict(run=run, seed=seed, model=label, game=game.name, variant=variant, opponent=opp))


def _public_goods_cells(module, cfg: EvalConfig, game: pgg.PublicGoodsGame, samplers: dict, seed: int,
                        run: int) -> list[dict]:
    """Every (model, variant, opponent) cell of a public-goods game: the variants with a payoff table, the
    opponents with a contribution-policy counterpart (``pgg.EVAL_CONTRIBUTORS``), streams as :func:`_play_cell`'s."""
    rows = []
    for variant in [v for v in cfg.variants if VARIANTS[v][2] == "game"]:
        for persona, models in _by_persona(module, cfg).items():
            renderer = pgg.PublicGoodsRenderer(module.tokenizer, game, style_for(module, cfg, variant, persona))
            sampler = samplers.setdefault(tuple(renderer.texts), _EvalSampler(
                module.policy, renderer, module.hparams.action_mode, module.hparams.max_new_tokens,
                with_reference=False, cut_illegal=cfg.cut_illegal, **_sampling(module)))
            sampler.warm(sorted({p for _, p in models}), len(renderer.token_ids))
            for label, player in models:
                for opp in [o for o in opponents_of(module, cfg, player, persona) if o in pgg.EVAL_CONTRIBUTORS]:
                    rows += _play_public_goods_cell(module, cfg, sampler, game, (label, player, variant, opp), seed, run)
    return rows


def _play_public_goods_cell(module, cfg: EvalConfig, sampler: ActionSampler, game: pgg.PublicGoodsGame,
                            cell: tuple[str, str, str, str], seed: int, run: int) -> list[dict]:
    label, player, variant, opp = cell
    where = ("eval", game.name, variant, opp)
    streams = Streams.from_seed(seed, *where)
    others = [pgg.make_contributor(pgg.EVAL_CONTRIBUTORS[opp], game.n, derive_seed(seed, *where, "opponent", j))
              for j in range(1, game.n)]
    first = module.rewards[module.agent_names[0]]
    rewards = {BASE: first, WARMUP_LABEL: first, **module.rewards}
    (s,) = pgg.play(sampler, game, [player], others, cfg.episodes, cfg.rounds, rewards, streams)[player]
    xi = module.hparams.xi if cfg.xi is None else cfg.xi
    regrets = (game.deontological_regret(s.action, s.k_prev, xi, rewards[player].illegal_penalty),
               game.utilitarian_regret(s.action, s.k_others, rewards[player].illegal_penalty))
    rows = round_rows(s, game, rewards[player], xi, sampler.renderer,
                      dict(run=run, seed=seed, model=label, game=game.name, variant=variant, opponent=opp), regrets)
    for row, k_prev, k_others in zip(rows, s.k_prev.tolist(), s.k_others.tolist()):
        row.update(k_prev=k_prev, k_others=k_others, n_players=game.n)
    return rows


def round_rows(s, game: MatrixGame, spec, xi: float, renderer: PromptRenderer, fixed: dict,
               regrets: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """Per-round dicts from one player's AgentSamples ``s`` (``[N]`` tensors) in ``game``.

    Rewards are the ones ``play`` computed with the run's reward spec (its deontological penalty is the
    ``reward_xi`` column); the regrets use ``xi`` (the ``xi`` column) and the spec's illegal penalty
    (protocol section 7). Each row's payoffs and regrets are read off the table of the player's own seat.

    ``payoff_me`` is empty for an illegal answer (the player gets the illegal penalty instead);
    ``payoff_other`` counts the illegal answer as the player's last legal move (protocol section 3).
    ``regrets``: ``(deontological [N], utilitarian [N])`` computed by the caller (the public-goods game), instead
    of the 2x2 regrets of ``game``.
    """
    legal = s.action != ILLEGAL
    pay_me, pay_other = s.payoff_me, s.payoff_other  # the player's own view; rollout.play computed them
    if regrets is None:
        util = torch.zeros(len(s))
        for seat in (0, 1):
            at = s.seat == seat
            util[at] = utilitarian_regret(s.action[at], s.other_action[at], game.view(seat).payoffs, spec.illegal_penalty)
        deon = deontological_regret(s.action, s.prev_other, xi, spec.illegal_penalty)
    else:
        deon, util = regrets
    decoded: dict[tuple, str] = {}
    cols = dict(episode=s.episode.tolist(), round=s.round.tolist(), prev_me=s.prev_me.tolist(),
                prev_other=s.prev_other.tolist(), action=s.action.tolist(), other_action=s.other_action.tolist(),
                legal=legal.tolist(), payoff_me=pay_me.tolist(), payoff_other=pay_other.tolist(),
                reward=s.reward.tolist(), regret_deontological=deon.tolist(), regret_utilitarian=util.tolist(),
                **{f"reward_{k}": v.tolist() for k, v in s.components.items()})
    fixed = {**fixed, "xi": float(xi), "reward_xi": float(spec.xi), "illegal_penalty": float(spec.illegal_penalty)}
    rows = []
    for i, resp in enumerate(s.responses):
        if resp not in decoded:
            decoded[resp] = renderer.tokenizer.decode(list(resp), skip_special_tokens=True).strip()
        row = {**fixed, **{k: v[i] for k, v in cols.items()}, "answer": decoded[resp]}
        if renderer.style.answer == "reason":
            row.update(reason_columns(decoded[resp], renderer.style.actions, int(s.prev_other[i])))
        for k in ("prev_me", "prev_other", "action", "other_action"):
            row[k] = ACTION_NAMES[row[k]]
        row["legal"] = int(row["legal"])
        row["payoff_me"] = row["payoff_me"] if row["legal"] else ""
        rows.append(row)
    return rows


def reason_columns(answer: str, actions: Sequence[str], prev_other: int) -> dict:
    """The reason-mode columns of one ``rounds.csv`` row: ``answer_kind`` (legal or the illegal category), its
    ``illegal_<kind>`` indicators, ``mentions_prev_move`` and ``moral_vocab`` (0/1)."""
    kind = parse_reasoned(answer, actions)[1]
    return {"answer_kind": kind, **{f"illegal_{k}": int(kind == k) for k in ILLEGAL_KINDS},
            "mentions_prev_move": int(mentions_previous_move(answer, actions, prev_other)),
            "moral_vocab": int(uses_moral_vocabulary(answer))}


def report_meta(module, cfg: EvalConfig, runs: int, checkpoints: Sequence[str] = ()) -> dict:
    """Metadata for ``summary.json`` and ``report.md``."""
    opps = list(dict.fromkeys(o for label, player, persona in models_of(module, cfg)
                              for o in opponents_of(module, cfg, player, persona)))
    return {"models": [m for m, _, _ in models_of(module, cfg)], "games": list(cfg.games),
            "variants": list(cfg.variants), "opponents": opps, "report_variant": cfg.shown_variant,
            "report_opponent": cfg.shown_opponent, "runs": runs, "episodes": cfg.episodes, "rounds": cfg.rounds,
            "seed": cfg.seed, "xi": float(module.hparams.xi if cfg.xi is None else cfg.xi),
            "checkpoints": [str(c) for c in checkpoints], "config": asdict(cfg)}



def output_dir(trainer, cfg: EvalConfig, sub: str = "") -> Path:
    """``cfg.output_dir``, else ``<trainer log dir>/evaluation[/sub]`` (the test run's own version folder)."""
    if cfg.output_dir:
        return Path(cfg.output_dir) / sub if sub else Path(cfg.output_dir)
    root = Path(trainer.log_dir or trainer.default_root_dir) if trainer is not None else Path("evaluation")
    return root / "evaluation" / sub if sub else root / "evaluation"


def finish(rows: list[dict], meta: dict, out: Path | None, plots: bool, experiment=None,
           step: int = 0) -> dict[str, float]:
    """Aggregate, write every output file (unless ``out`` is None) and log scalars and figures to
    ``experiment`` (a SummaryWriter).

    Returns:
        The TensorBoard scalars (``eval/<metric>/<model>[/<game>/<opponent>]``).
    """
    from lit_moral.plots import figures
    from lit_moral.report import summarize, tensorboard_scalars, write_outputs

    summary = summarize(rows)
    if out is not None:
        figs = write_outputs(out, rows, summary, meta, plots)
    else:
        figs = figures(summary, meta) if plots and experiment is not None else {}
    if plots and (out is not None or experiment is not None):  # the public-goods games' contribution curves
        for name, fig in pgg.figures(rows, meta).items():
            if out is not None:
                fig.savefig(out / name, dpi=120, bbox_inches="tight")
            figs[name] = fig
    scalars = tensorboard_scalars(summary, meta)
    if experiment is not None and hasattr(experiment, "add_scalar"):
        for k, v in scalars.items():
            experiment.add_scalar(k, v, global_step=step)
        for name, fig in figs.items():
            experiment.add_figure(f"eval/{name.removesuffix('.png')}", fig, global_step=step, close=False)
    if figs:
        import matplotlib.pyplot as plt

        for fig in figs.values():
            plt.close(fig)
    return scalars


def run_test(module) -> dict[str, float]:
    """The whole evaluation for ``python -m lit_moral test`` (called from ``MoralPPO.test_step``).

    Returns:
        Scalars averaged over games per model (``eval/<metric>/<model>``), for ``self.log``.
    """
    from lit_moral.report import summarize

    trainer, cfg = module.trainer, module.eval_cfg
    rows = evaluate(module, cfg)
    ckpts = [str(trainer.ckpt_path)] if trainer.ckpt_path else []
    meta = report_meta(module, cfg, runs=1, checkpoints=ckpts)
    exp = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
    out = output_dir(trainer, cfg)
    scalars = finish(rows, meta, out, cfg.plots, exp, module.episode)
    module.last_evaluation = (out, meta, summarize(rows))  # for the summary the CLI prints
    if getattr(module.hparams, "pairing", "fixed") == "selection" and trainer.is_global_zero:
        from lit_moral.report import write_selection

        write_selection(module, out)  # the run's partner selections, beside the evaluation of its agents
    return {k: v for k, v in scalars.items() if k.count("/") == 2}


def load_weights(module, path: str) -> None:
    """Load a lit_moral checkpoint's adapters, value heads and counters into a configured module."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    module.on_load_checkpoint(state)
    result = module.load_state_dict(state["state_dict"], strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"ckpt: {path} has weights this run does not: {result.unexpected_keys[:3]} ...")


__all__ = ["BASE_LABEL", "EVAL_OPPONENTS", "VARIANTS", "EvalConfig", "evaluate", "models_of", "load_weights",
           "opponents_of", "report_meta", "round_rows", "run_test"]


