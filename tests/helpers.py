"""Small helpers shared by the training tests."""

from __future__ import annotations

import glob

import lightning.pytorch as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_moral.module import MoralPPO

TINY = dict(model="tiny", rounds_per_episode=2, episodes_per_iteration=8, iterations_per_epoch=1, lr=1e-2,
            lora={"r": 4, "alpha": 8})


def tiny_module(**overrides) -> MoralPPO:
    from lit_moral.policy import LoraSpec
    from lit_moral.ppo import PPOConfig

    kw = {**TINY, **overrides}
    kw["lora"] = LoraSpec(**kw["lora"]) if isinstance(kw["lora"], dict) else kw["lora"]
    if isinstance(kw.get("ppo"), dict):
        kw["ppo"] = PPOConfig(**kw["ppo"])
    kw.setdefault("ppo", PPOConfig(ppo_epochs=2))
    return MoralPPO(**kw)


def trainer(tmp_path, max_epochs: int = 1, **kw) -> pl.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = any(isinstance(c, ModelCheckpoint) for c in kw.get("callbacks", []))
    return pl.Trainer(default_root_dir=str(tmp_path), max_epochs=max_epochs, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=ckpt, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """All TensorBoard scalars under ``run_dir``: tag -> [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(glob.glob(f"{run_dir}/**/events.out.tfevents*", recursive=True)):
        ea = EventAccumulator(f)
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return out


class RankDump(pl.Callback):
    """Writes, per process, the trainable weights and per-iteration local/logged cooperation to ``dirpath``.

    Used by the multi-process test: ``rank<r>.pt`` holds ``state`` (the module's state_dict after training)
    and ``coop``: one ``(agent, local C count, local rounds, logged coop rate)`` row per iteration and agent.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.rows: list[tuple[str, int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        for agent, s in pl_module.last_samples.items():
            logged = float(trainer.callback_metrics[f"game/coop_rate/{agent}"])
            self.rows.append((agent, int((s.action == 0).sum()), int(s.action.numel()), logged))

    def on_train_end(self, trainer, pl_module) -> None:
        import os

        import torch

        os.makedirs(self.dirpath, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        extra = {"kl_coef": {a: c.value for a, c in pl_module.kl_ctl.items()},
                 "moments": {a: m.state_dict() for a, m in pl_module.moments.items()}}
        torch.save({"state": state, "coop": self.rows, "world": trainer.world_size, **extra},
                   os.path.join(self.dirpath, f"rank{trainer.global_rank}.pt"))


class SigtermAt(pl.Callback):
    """Sends SIGTERM to its own process after iteration ``iteration`` (a preemption, for the CLI test)."""

    def __init__(self, iteration: int = 2) -> None:
        self.iteration = iteration

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        import os
        import signal

        if pl_module.iteration == self.iteration:
            os.kill(os.getpid(), signal.SIGTERM)
