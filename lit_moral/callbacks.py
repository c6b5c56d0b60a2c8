"""Experiment protocol as callbacks: when rewards and opponents switch, what gets exported and logged.

None is needed for a plain ``fit``. Schedules count episodes (games), as the paper does: before every
iteration they apply the entry of the current episode, so a resumed run (whose config reward and opponent
are authoritative otherwise) switches at the same episode as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lit_moral.checkpoint_io import replace_dir
from lit_moral.errors import ConfigError, check_choice
from lit_moral.opponents import OPPONENT_NAMES
from lit_moral.rewards import RewardSpec


class AdapterExport(Callback):
    """Export each agent's adapter in peft format next to every checkpoint.

    Writes ``<checkpoint dir>/../adapters/<agent>/`` (``adapter_config.json`` + weights), loadable with
    ``PeftModel.from_pretrained(base, path)``.

    Args:
        dirpath: where to write; default: beside the ModelCheckpoint folder.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def target(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath).parent / "adapters"
        return Path(trainer.default_root_dir) / "adapters"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        pl_module.check_finite_weights(checkpoint["state_dict"])
        if trainer.is_global_zero and pl_module.policy is not None:
            # Built in a temporary folder that then replaces the old export: never a half-written adapter.
            replace_dir(lambda tmp: self._export(trainer, pl_module, Path(tmp)), self.target(trainer))

    @staticmethod
    def _export(trainer: pl.Trainer, pl_module, tmp: Path) -> None:
        """peft's files for every agent, with a portable base-model name and a model card each."""
        from lit_moral.adapters import finish_export, model_card
        from lit_moral.agent import EXPORT_INFO, export_info

        pl_module.policy.model.save_pretrained(str(tmp), selected_adapters=pl_module.agent_names)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if getattr(v, "numel", lambda: 1)() == 1 and not k.startswith("perf/")}
        for agent in pl_module.agent_names:
            folder = tmp / agent if (tmp / agent).is_dir() else tmp
            facts = card_facts(pl_module, agent)
            mine = {k: v for k, v in metrics.items() if k.endswith(f"/{agent}") or k.startswith("warmup/")}
            finish_export(folder, pl_module.hparams.model, model_card(agent, pl_module.hparams.model, facts, mine))
            (folder / EXPORT_INFO).write_text(json.dumps(export_info(pl_module, agent), indent=1) + "\n")


def card_facts(pl_module, agent: str) -> dict[str, object]:
    """What a model card says about how ``agent`` was trained (a MoralPPO agent or the format warm-up)."""
    hp = pl_module.hparams
    lora = getattr(pl_module, "lora", None)
    facts: dict[str, object] = {}
    if hasattr(pl_module, "rewards"):
        r = pl_module.rewards[agent]
        facts["reward"] = r.name if r.name != "custom" else ", ".join(f"{w:g} x {k}" for k, w in r.weights.items())
        facts.update({"opponent": pl_module.opponent_name, "game": pl_module.game.name,
                      "episodes": pl_module.episode, "rounds per episode": hp.rounds_per_episode,
                      "action mode": hp.action_mode, "action strings": " / ".join(hp.actions),
                      "deontological xi": hp.xi, "illegal answer": hp.illegal_penalty,
                      "started from": hp.get("init_adapter") or "LoRA's zero start"})
    else:
        facts.update({"stage": "format warm-up (supervised: answer with one of the two listed labels)",
                      "steps": pl_module.global_step, "label pairs": len(getattr(pl_module, "pairs", []))})
    if lora is not None:
        facts["LoRA"] = f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, targets {lora.target_modules}"
    facts.update({"learning rate": hp.get("lr"), "seed": hp.get("seed")})
    return facts


class Progress(Callback):
    """Progress of a run, every iteration: one line on stdout when the progress bar is off (output not a
    terminal, e.g. a log file), and TensorBoard flushed so its curves are current. Added by default.

    The line: ``[<run>] iteration i/N | episode e | <agent>: coop .. De .. Ut .. reward .. | s/iteration``.
    """

    def __init__(self) -> None:
        self._t = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        import time

        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        import time

        exp = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        if exp is not None and hasattr(exp, "flush"):
            exp.flush()
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        total = trainer.max_epochs * trainer.num_training_batches if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        step = getattr(pl_module, "iteration", trainer.global_step)
        parts = [f"[{pl_module.hparams.get('run_name', 'run')}] iteration {step}/{total}"]
        if hasattr(pl_module, "episode"):
            parts.append(f"episode {pl_module.episode}")
        for a in getattr(pl_module, "agent_names", []):
            vals = [(label, m.get(f"{key}/{a}")) for label, key in (
                ("coop", "game/coop_rate"), ("illegal", "game/illegal_rate"), ("De", "moral/regret_deontological"),
                ("Ut", "moral/regret_utilitarian"), ("reward", "reward/total"))]
            shown = " ".join(f"{label} {v:.2f}" for label, v in vals if v is not None)
            if shown:
                parts.append(f"{a}: {shown}")
        if "warmup/loss" in m:
            parts.append(f"loss {m['warmup/loss']:.3f}")
        if self._t is not None:
            parts.append(f"{time.perf_counter() - self._t:.1f} s/iteration")
        print(" | ".join(parts), flush=True)


class PreemptionCheckpoint(Callback):
    """On SIGTERM (preemption), save ``last.ckpt`` after the current iteration; Lightning then exits cleanly.

    Lightning notices SIGTERM and stops after the running batch without saving; this callback writes the
    checkpoint first, into the ModelCheckpoint folder (else ``<default_root_dir>/checkpoints``), so
    ``fit --ckpt_path <that folder>/last.ckpt`` continues the run. Added by default by ``MoralPPO``.

    Args:
        dirpath: where to write ``last.ckpt``; default: the ModelCheckpoint folder.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: str | None = None

    def target(self, trainer: pl.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        if self.dirpath:
            return Path(self.dirpath) / "last.ckpt"
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath) / "last.ckpt"
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.received_sigterm and self.saved is None:
            self.saved = str(self.target(trainer))
            trainer.save_checkpoint(self.saved)


def _check_points(field: str, points: list) -> list:
    starts = [p[0] for p in points]
    if any(not isinstance(s, int) or s < 0 for s in starts):
        raise ConfigError(f"{field}: start episodes must be whole numbers >= 0; got {starts}")
    if starts != sorted(starts) or len(set(starts)) != len(starts):
        raise ConfigError(f"{field}: start episodes must be strictly increasing; got {starts}")
    return points


class _Schedule(Callback):
    """Applies the entry whose start episode was reached, before each iteration (idempotent: the position is
    a function of the module's checkpointed episode count, so it needs no state of its own)."""

    @staticmethod
    def current(points: list, episode: int) -> int:
        idx = -1
        for i, p in enumerate(points):
            if p[0] <= episode:
                idx = i
        return idx


class RewardSchedule(_Schedule):
    """Per agent, a list of ``[start_episode, reward]``: e.g. Game for 0-499, then Deontological.

    Args:
        schedule: agent name -> list of ``[start episode, reward]`` with rewards as in AgentConfig,
            e.g. ``{agent_0: [[0, game], [500, deontological]]}``.
    """

    def __init__(self, schedule: dict[str, list[tuple[int, str | dict[str, float]]]]) -> None:
        super().__init__()
        self.schedule = {a: _check_points(f"RewardSchedule.schedule.{a}", [list(p) for p in pts])
                         for a, pts in schedule.items()}
        for a, pts in self.schedule.items():
            for _, r in pts:
                RewardSpec.parse(r, field=f"RewardSchedule.schedule.{a}")

    def setup(self, trainer, pl_module, stage: str) -> None:
        for a in self.schedule:
            if a not in pl_module.agent_names:
                raise ConfigError(f"RewardSchedule.schedule: unknown agent {a!r}; allowed: "
                                  f"{', '.join(pl_module.agent_names)}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        for a, pts in self.schedule.items():
            i = self.current(pts, pl_module.episode)
            if i >= 0:
                pl_module.set_reward(a, pts[i][1])
            pl_module.log(f"schedule/reward_index/{a}", float(max(i, 0)), on_step=True, on_epoch=False)


class OpponentSchedule(_Schedule):
    """A list of ``[start_episode, opponent]``: e.g. TFT for the first 500 episodes, then the other LLM.

    Args:
        schedule: ``[[0, tft], [500, llm]]``; opponents are fixed-strategy names or ``llm``.
        cycle: repeat the schedule every ``cycle`` episodes (0: no repetition), e.g. a cycle of
            fixed strategies.
    """

    def __init__(self, schedule: list[tuple[int, str]], cycle: int = 0) -> None:
        super().__init__()
        self.schedule = _check_points("OpponentSchedule.schedule", [list(p) for p in schedule])
        for _, name in self.schedule:
            check_choice("OpponentSchedule.schedule", name, OPPONENT_NAMES)
        if not isinstance(cycle, int) or cycle < 0:
            raise ConfigError(f"OpponentSchedule.cycle: got {cycle!r}; must be a whole number >= 0")
        self.cycle = cycle

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        ep = pl_module.episode % self.cycle if self.cycle else pl_module.episode
        i = self.current(self.schedule, ep)
        if i >= 0:
            pl_module.set_opponent(self.schedule[i][1])
        pl_module.log("opponent/index", float(max(i, 0)), on_step=True, on_epoch=False)


class SampleLogger(Callback):
    """Every ``every_n_iterations``, write a few (prompt, answer, reward) samples to TensorBoard as text.

    Args:
        every_n_iterations: logging period.
        n_samples: samples per agent.
    """

    def __init__(self, every_n_iterations: int = 5, n_samples: int = 3) -> None:
        self.every = every_n_iterations
        self.n = n_samples

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.iteration % self.every or not trainer.is_global_zero:
            return
        exp = getattr(trainer.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_text"):
            return
        tok = pl_module.tokenizer
        for agent, s in pl_module.last_samples.items():
            rows = []
            for k in range(min(self.n, len(s))):
                prompt = pl_module.renderer.texts[int(s.pid[k])]
                answer = tok.decode(list(s.responses[k]), skip_special_tokens=False)
                rows.append(f"**prompt**\n\n```\n{prompt}\n```\n\n**answer** `{answer}` -> action "
                            f"{['C', 'D', 'illegal'][int(s.action[k])]}, reward {float(s.reward[k]):g}")
            exp.add_text(f"samples/{agent}", "\n\n---\n\n".join(rows), global_step=pl_module.episode)


class ActionTypePlot(Callback):
    """Every ``every_n_episodes``, log a figure of action types per episode window (paper Figures 2-3).

    Keeps, per agent, the frequencies of C|C, C|D, D|C, D|D and illegal per iteration, and draws them as
    stacked areas over episodes (one panel per agent). Its history is saved in checkpoints.

    Args:
        every_n_episodes: drawing period, in episodes.
    """

    def __init__(self, every_n_episodes: int = 500) -> None:
        if not isinstance(every_n_episodes, int) or every_n_episodes <= 0:
            raise ConfigError(f"ActionTypePlot.every_n_episodes: got {every_n_episodes!r}; must be a whole number > 0")
        self.every = every_n_episodes
        self.history: dict[str, list[list[float]]] = {}
        self._last_drawn = 0

    def state_dict(self) -> dict:
        return {"history": self.history, "last_drawn": self._last_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.history = {a: [list(r) for r in rows] for a, rows in state["history"].items()}
        self._last_drawn = int(state["last_drawn"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        for agent, types in pl_module.last_action_types.items():
            freq = types.tolist()  # the iteration's metrics.ActionTypes frequencies
            self.history.setdefault(agent, []).append([float(pl_module.episode), *freq[:4], freq[4] + freq[5]])
        if pl_module.episode - self._last_drawn >= self.every and trainer.is_global_zero:
            self._last_drawn = pl_module.episode
            exp = getattr(trainer.logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_figure"):
                exp.add_figure("actions/types_over_episodes", self.figure(), global_step=pl_module.episode)

    def figure(self):
        """A matplotlib figure: stacked action-type shares per episode, one panel per agent."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        agents = sorted(self.history)
        fig, axes = plt.subplots(1, len(agents), figsize=(6 * len(agents), 3.6), squeeze=False)
        from lit_moral.plots import TYPE_COLORS

        labels, colors = list(TYPE_COLORS), list(TYPE_COLORS.values())
        for ax, agent in zip(axes[0], agents):
            rows = torch.tensor(self.history[agent])
            ax.stackplot(rows[:, 0].numpy(), rows[:, 1:].T.numpy(), labels=labels, colors=colors)
            ax.set_title(f"{agent}: action types (X|Y = played X after the other played Y)", fontsize=9)
            ax.set_xlabel("episode")
            ax.set_ylabel("share of rounds")
            ax.set_ylim(0, 1)
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.tight_layout()
        return fig


class PopulationPlot(Callback):
    """Every ``every_n_episodes``, log the selection matrix (who picks whom, over the run so far) as a heatmap image
    (``population/selection``), and write it as ``selection.csv`` / ``selection.png`` beside the checkpoints.

    Args:
        every_n_episodes: drawing period, in episodes.
    """

    def __init__(self, every_n_episodes: int = 500) -> None:
        if not isinstance(every_n_episodes, int) or every_n_episodes <= 0:
            raise ConfigError(f"PopulationPlot.every_n_episodes: got {every_n_episodes!r}; must be a whole number > 0")
        self.every, self.last = every_n_episodes, 0

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = int(state["last"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.episode - self.last < self.every or not trainer.is_global_zero:
            return
        self.last = pl_module.episode
        from lit_moral.report import write_selection

        write_selection(pl_module, Path(trainer.log_dir or trainer.default_root_dir),
                        getattr(trainer.logger, "experiment", None) if trainer.logger else None)


class Evaluation(Callback):
    """Every ``every_n_episodes`` during ``fit``, run the evaluation of ``lit_moral.evaluation`` and log it.

    The settings are the module's ``evaluation`` (EvalConfig); any argument here that is not None
    replaces that field, e.g. a cheap subset (IPD only, vs Random) during training and the whole
    suite after it with ``python -m lit_moral test``. Scalars ``eval/...`` and the plots go to
    TensorBoard at step = episode; files to ``<log dir>/evaluation/episode_<N>/``. The evaluation
    draws from its own seeded generators, so training's random stream is untouched.

    Args:
        every_n_episodes: period, in episodes.
        episodes: games per cell.
        rounds: rounds per game.
        games: games to show, e.g. ``[IPD, ICD]``.
        opponents: opponents, e.g. ``[random]``.
        variants: prompt variants, e.g. ``[new_tokens]``.
        base: also evaluate the base model.
        write_files: write the CSV/JSON/Markdown/PNG files, not only TensorBoard.
    """

    def __init__(self, every_n_episodes: int = 500, episodes: int | None = None, rounds: int | None = None,
                 games: list[str] | None = None, opponents: list[str] | None = None,
                 variants: list[str] | None = None, base: bool | None = None, write_files: bool = True) -> None:
        if not isinstance(every_n_episodes, int) or every_n_episodes <= 0:
            raise ConfigError(f"Evaluation.every_n_episodes: got {every_n_episodes!r}; must be a whole number > 0")
        self.every = every_n_episodes
        self.overrides = {k: v for k, v in dict(episodes=episodes, rounds=rounds, games=games, opponents=opponents,
                                                variants=variants, base=base).items() if v is not None}
        self.write_files = write_files
        self.last = 0

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = int(state["last"])

    def config(self, pl_module):
        """The module's EvalConfig with this callback's overrides (validated)."""
        import dataclasses

        from lit_moral.evaluation import EvalConfig

        cfg = dataclasses.asdict(pl_module.eval_cfg) | self.overrides
        for key, within in (("report_variant", "variants"), ("report_opponent", "opponents")):
            if cfg[key] not in cfg[within]:
                cfg[key] = None  # EvalConfig picks the paper's choice if evaluated, else the first
        return EvalConfig(**cfg)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.config(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.episode - self.last < self.every:
            return
        self.last = pl_module.episode
        if not trainer.is_global_zero:
            return
        from lit_moral.evaluation import evaluate, finish, output_dir, report_meta

        cfg = self.config(pl_module)
        rows = evaluate(pl_module, cfg)
        out = output_dir(trainer, cfg, f"episode_{pl_module.episode}") if self.write_files else None
        exp = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        finish(rows, report_meta(pl_module, cfg, runs=1), out, cfg.plots, exp, pl_module.episode)
