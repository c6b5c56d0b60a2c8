"""Where a run's files live, and what is printed when a command ends.

A run folder is ``<save_dir>/<run_name>/<version>/`` (TensorBoard's layout): ``config.yaml``, the TensorBoard
events, ``checkpoints/last.ckpt``, ``adapters/<agent>/`` and, after ``test``, ``evaluation/``. Resuming with
``--ckpt_path <run>/checkpoints/last.ckpt`` (or ``--ckpt_path last``) continues in that same folder, and
``test`` writes its evaluation beside the checkpoint it evaluates.
"""

from __future__ import annotations

from pathlib import Path

from lit_moral.errors import ConfigError


def run_dir_of(ckpt: str | Path) -> Path | None:
    """The run folder holding ``<run>/checkpoints/<file>.ckpt``, or None for a checkpoint stored elsewhere."""
    p = Path(ckpt).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else None


def latest_checkpoint(save_dir: str | Path, name: str) -> Path:
    """``last.ckpt`` of the most recently written run ``<save_dir>/<name>/*/`` (for ``--ckpt_path last``)."""
    found = sorted(Path(save_dir, name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"ckpt_path: 'last' found no {Path(save_dir, name)}/*/checkpoints/last.ckpt to resume")
    return found[-1]


def _row(label: str, value: object, width: int = 12) -> str:
    return f"  {label:<{width}} {value}"


def fit_summary(module, trainer, wall_s: float, config: Path | None, run: Path | None) -> str:
    """The lines printed when ``fit`` ends: final behaviour, wall time, file paths and the next commands."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    episodes = getattr(module, "episode", None)
    lines = [f"lit_moral: fit finished in {wall_s / 60:.1f} min ({trainer.global_step} optimizer steps"
             + (f", {episodes} episodes" if episodes is not None else "") + ")"]
    agents = getattr(module, "agent_names", [])
    if hasattr(module, "last_action_types") and module.last_action_types:
        lines.append("final behaviour (last iteration; X|Y = played X after the other played Y):")
        from lit_moral.games import ACTION_TYPES

        for a in agents:
            types = module.last_action_types.get(a)
            shares = " ".join(f"{t} {float(v):.2f}" for t, v in zip(ACTION_TYPES, types.tolist())) if types is not None else ""
            extra = " | ".join(f"{label} {metrics[key]:.3f}" for label, key in (
                ("cooperation", f"game/coop_rate/{a}"), ("regret De", f"moral/regret_deontological/{a}"),
                ("regret Ut", f"moral/regret_utilitarian/{a}"), ("reward", f"reward/total/{a}")) if key in metrics)
            lines.append(_row(a, f"{shares} | {extra}"))
    elif getattr(module, "last_measure", None):
        lines.append("format after the warm-up (2 sampled tokens, temperature 1):")
        lines += [_row(k.removeprefix("warmup/"), f"{v:.3f}", 28) for k, v in sorted(module.last_measure.items())]
    lines.append("files:")
    if ckpt:
        lines.append(_row("checkpoint", ckpt))
    if run is not None:
        for a in agents:
            if (run / "adapters" / a).is_dir():
                lines.append(_row("adapter", f"{run / 'adapters' / a}  (peft format; model card README.md)"))
        lines.append(_row("tensorboard", run))
    if config is not None:
        lines.append(_row("config", config))
    lines.append("next:")
    if ckpt and config is not None and hasattr(module, "last_action_types"):
        lines.append(_row("evaluate", f"python -m lit_moral test --config {config} --ckpt_path {ckpt}"))
        lines.append(_row("play", f"python -m lit_moral play --ckpt {ckpt}"))
        lines.append(_row("resume", f"python -m lit_moral fit --config {config} --ckpt_path {ckpt} "
                                   "--trainer.max_epochs <more>"))
    elif run is not None and (run / "adapters" / "agent_0").is_dir():
        lines.append(_row("train", f"python -m lit_moral fit --config configs/free_deontological.yaml "
                                   f"--model.init_adapter {run / 'adapters' / 'agent_0'}"))
    if run is not None:
        lines.append(_row("watch", f"tensorboard --logdir {run.parent}"))
    return "\n".join(lines)


def test_summary(out: Path, meta: dict, summary: list[dict]) -> str:
    """The lines printed when an evaluation ends: where its files went, and the headline numbers."""
    from lit_moral.report import PLOT_FILES

    v, o = meta["report_variant"], meta["report_opponent"]
    lines = [f"lit_moral: evaluation written to {out}/",
             "  rounds.csv (every round), summary.csv / summary.json (per cell, 95% CIs), report.md (tables)"
             + (", " + ", ".join(f for f in PLOT_FILES if (out / f).is_file()) if any((out / f).is_file()
                                                                                        for f in PLOT_FILES) else ""),
             f"mean over games, variant {v} vs {o}:"]
    for m in meta["models"]:
        rows = [r for r in summary if r["model"] == m and r["variant"] == v and r["opponent"] == o]
        if not rows:
            continue
        mean = lambda k, rows=rows: sum(float(r[f"{k}_mean"]) for r in rows) / len(rows)  # noqa: E731
        lines.append(_row(m, f"cooperation {mean('cooperation'):.2f} | illegal {mean('illegal'):.2f} | regret De "
                             f"{mean('regret_deontological'):.2f} (xi {meta['xi']:g}) | regret Ut "
                             f"{mean('regret_utilitarian'):.3f}"))
    lines.append(_row("read", f"{out / 'report.md'}"))
    return "\n".join(lines)
