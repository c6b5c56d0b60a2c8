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
