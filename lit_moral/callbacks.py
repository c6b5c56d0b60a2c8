"""Experiment protocol as callbacks: when rewards and opponents switch, what gets exported and logged.

None is needed for a plain ``fit``. Schedules count episodes (games), as the paper does, and are
stateful: a run resumed from a checkpoint written before a switch switches at the same episode.
"""

from __future__ import annotations

from pathlib import Path

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lit_moral.errors import ConfigError
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
        if trainer.is_global_zero and pl_module.policy is not None:
            out = self.target(trainer)
            out.mkdir(parents=True, exist_ok=True)
            pl_module.policy.model.save_pretrained(str(out), selected_adapters=pl_module.agent_names)


def _check_points(field: str, points: list) -> list:
    starts = [p[0] for p in points]
    if any(not isinstance(s, int) or s < 0 for s in starts):
        raise ConfigError(f"{field}: start episodes must be whole numbers >= 0; got {starts}")
    if starts != sorted(starts) or len(set(starts)) != len(starts):
        raise ConfigError(f"{field}: start episodes must be strictly increasing; got {starts}")
    return points


class _Schedule(Callback):
    """Applies the entry whose start episode was reached, before each iteration."""

    def __init__(self) -> None:
        self.applied: dict[str, int] = {}

    def state_dict(self) -> dict:
        return {"applied": dict(self.applied)}

    def load_state_dict(self, state: dict) -> None:
        self.applied = dict(state["applied"])

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
            if i >= 0 and self.applied.get(a) != i:
                pl_module.set_reward(a, pts[i][1])
                self.applied[a] = i
                pl_module.log(f"schedule/reward_index/{a}", float(i), on_step=True, on_epoch=False)


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
            if name not in OPPONENT_NAMES:
                raise ConfigError(f"OpponentSchedule.schedule: unknown opponent {name!r}; allowed: "
                                  f"{', '.join(OPPONENT_NAMES)}")
        if not isinstance(cycle, int) or cycle < 0:
            raise ConfigError(f"OpponentSchedule.cycle: got {cycle!r}; must be a whole number >= 0")
        self.cycle = cycle

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        ep = pl_module.episode % self.cycle if self.cycle else pl_module.episode
        i = self.current(self.schedule, ep)
        if i >= 0 and self.applied.get("opponent") != i:
            pl_module.set_opponent(self.schedule[i][1])
            self.applied["opponent"] = i
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
        from lit_moral.metrics import action_type_index

        for agent, s in pl_module.last_samples.items():
            counts = torch.bincount(action_type_index(s.action, s.prev_other), minlength=6).float()
            freq = (counts / counts.sum()).tolist()
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
        labels = ["C|C", "C|D", "D|C", "D|D", "illegal"]
        colors = ["#2ca02c", "#98df8a", "#d62728", "#ff9896", "#7f7f7f"]
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
