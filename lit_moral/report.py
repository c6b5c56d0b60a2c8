"""Evaluation outputs: per-cell aggregation with 95% confidence intervals, files, tables and plots.

Everything here is a pure function of the per-round table that :mod:`lit_moral.evaluation` plays
(one dict per round, the columns of ``rounds.csv``), so the numbers can be re-derived from the
CSV alone. A *cell* is ``(model, game, variant, opponent)``; a *run* is one checkpoint (seed).
Confidence intervals follow protocol section 7: ``1.96 sd / sqrt(n)`` over runs; with a single run
they are taken over the cell's episodes instead (column ``ci_over`` says which).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from lit_moral.errors import ConfigError
from lit_moral.games import ACTION_NAMES, ACTION_TYPES, PAYOFF_TABLES
from lit_moral.rewards import COMPONENTS

TYPE_KEYS = ACTION_TYPES
# Metrics read from a column of rounds.csv (the rest derive from ``action`` and ``prev_other``): a summary
# leaves out the ones whose column the rows do not have.
COLUMN_METRICS = ("regret_deontological", "regret_utilitarian", "reward")
# Reason mode only (action_mode: reason): the illegal categories and the reasoning measures, 0/1 per round.
REASON_METRICS = ("illegal_no_action", "illegal_unknown_label", "illegal_multiple_actions", "mentions_prev_move",
                  "moral_vocab")
METRICS = (*TYPE_KEYS, "cooperation", "defection", "illegal", *COLUMN_METRICS, *REASON_METRICS)
CELL = ("model", "game", "variant", "opponent")
REQUIRED = ("run", "episode", *CELL, "action", "prev_other")
ROUND_COLUMNS = ("run", "seed", "model", "game", "variant", "opponent", "episode", "round", "prev_me",
                 "prev_other", "action", "other_action", "legal", "answer", "payoff_me", "payoff_other", "reward",
                 "reward_xi", *(f"reward_{c}" for c in COMPONENTS), "reward_illegal",
                 "xi", "illegal_penalty", "regret_deontological", "regret_utilitarian", "answer_kind", *REASON_METRICS)
_MOVES = {"action": ACTION_NAMES, "prev_other": ACTION_NAMES[:2], "prev_me": ACTION_NAMES[:2],
          "other_action": ACTION_NAMES[:2]}
PLOT_FILES = ("action_types.png", "regret.png", "variants.png")


def check_row(row: dict, index: int = 0) -> None:
    """Refuse a round whose moves are not action codes (C, D, illegal; C or D for previous moves) or that lacks a
    column every summary needs; the message names the row (0-based, header excluded) and the column."""
    for k in REQUIRED:
        if k not in row or row[k] in (None, ""):
            raise ConfigError(f"rounds row {index}: missing column {k!r} (needed: {', '.join(REQUIRED)})")
    for k, allowed in _MOVES.items():
        if k in row and row[k] not in allowed:
            raise ConfigError(f"rounds row {index}, column {k!r}: got {row[k]!r}; allowed: {', '.join(allowed)}")


def round_metrics(row: dict) -> dict[str, float]:
    """Per-round values of every metric (indicators for action types and answer kinds); metrics read from a
    column the row does not have are left out."""
    kind = f"{row['action']}|{row['prev_other']}"
    out = {k: float(kind == k) for k in TYPE_KEYS}
    out["cooperation"] = float(row["action"] == "C")
    out["defection"] = float(row["action"] == "D")
    out["illegal"] = float(row["action"] == "illegal")
    for k in (*COLUMN_METRICS, *REASON_METRICS):
        if row.get(k) not in (None, ""):
            out[k] = float(row[k])
    return out


def recompute_regrets(row: dict, payoffs=None, xi: float | None = None) -> dict[str, float]:
    """Both regrets of one ``rounds.csv`` row from its moves and game alone (protocol section 7), to check a
    file without trusting its regret columns.

    Args:
        row: a round with ``game``, ``action``, ``other_action``, ``prev_other`` and (unless given here) ``xi``
            and ``illegal_penalty`` (-6 if absent).
        payoffs: the ``[2, 2, 2]`` table of the player's own seat; default: the named game's table.
        xi: deontological penalty; default: the row's ``xi``.

    Returns:
        ``{"regret_deontological": ..., "regret_utilitarian": ...}``.
    """
    import torch

    from lit_moral.rewards import deontological_regret, utilitarian_regret

    check_row({**{k: 0 for k in REQUIRED if k not in ("action", "prev_other")}, **row})
    if payoffs is None:
        if row["game"] not in PAYOFF_TABLES:
            raise ConfigError(f"recompute_regrets: game {row['game']!r} is not a named game; pass its payoffs")
        payoffs = PAYOFF_TABLES[row["game"]]
    table = torch.as_tensor(payoffs, dtype=torch.float32)
    code = lambda k: torch.tensor([ACTION_NAMES.index(row[k])])  # noqa: E731
    xi = float(row["xi"]) if xi is None else float(xi)
    penalty = float(row.get("illegal_penalty") or -6.0)
    return {"regret_deontological": float(deontological_regret(code("action"), code("prev_other"), xi, penalty)),
            "regret_utilitarian": float(utilitarian_regret(code("action"), code("other_action"), table, penalty))}


def mean_ci(samples: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width, 1.96 sd / sqrt(n) (protocol section 7); 0 for one sample."""
    mean = statistics.fmean(samples)
    if len(samples) < 2:
        return mean, 0.0
    return mean, 1.96 * statistics.stdev(samples) / math.sqrt(len(samples))


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Aggregate rounds into one summary row per cell.

    Args:
        rows: per-round dicts with at least ``run``, ``episode``, the CELL keys, ``action`` (C/D/illegal),
            ``prev_other`` (C/D), ``regret_deontological``, ``regret_utilitarian`` and ``reward``.

    Returns:
        Summary dicts sorted by cell: the CELL keys, ``runs``, ``rounds``, ``ci_over`` (``runs`` or
        ``episodes``), ``n`` (samples behind the CI) and ``<metric>_mean`` / ``<metric>_ci`` for METRICS.
    """
    groups: dict[tuple, dict[tuple[int, int], list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        check_row(row, i)
        cell = tuple(str(row[k]) for k in CELL)
        groups[cell][(int(row["run"]), int(row["episode"]))].append(round_metrics(row))
    out = []
    for cell in sorted(groups):
        episodes = groups[cell]
        runs = sorted({r for r, _ in episodes})
        by_run = {r: [m for (rr, _), ms in episodes.items() if rr == r for m in ms] for r in runs}
        if len(runs) > 1:
            units, ci_over = list(by_run.values()), "runs"
        else:
            units, ci_over = [episodes[k] for k in sorted(episodes)], "episodes"
        summary = dict(zip(CELL, cell), runs=len(runs), rounds=sum(len(v) for v in by_run.values()),
                       ci_over=ci_over, n=len(units))
        for metric in METRICS:
            if any(metric not in m for unit in units for m in unit):
                continue  # a column the rows do not (all) have
            mean, ci = mean_ci([statistics.fmean(m[metric] for m in unit) for unit in units])
            summary[f"{metric}_mean"], summary[f"{metric}_ci"] = mean, ci
        out.append(summary)
    return out


def summary_columns() -> list[str]:
    return [*CELL, "runs", "rounds", "ci_over", "n", *(f"{m}_{s}" for m in METRICS for s in ("mean", "ci"))]


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pick(summary: Sequence[dict], **where) -> dict[tuple, dict]:
    """Summary rows matching ``where``, keyed by the remaining CELL values."""
    rest = [k for k in CELL if k not in where]
    return {tuple(r[k] for k in rest): r for r in summary if all(r[k] == v for k, v in where.items())}


def _fmt(row: dict | None, metric: str, digits: int) -> str:
    if row is None or f"{metric}_mean" not in row:
        return "-"
    return f"{row[f'{metric}_mean']:.{digits}f} ± {row[f'{metric}_ci']:.{digits}f}"


def report_markdown(summary: Sequence[dict], meta: dict) -> str:
    """``report.md``: regret tables like the paper's Figure 4 (rows = game, columns = model) and more.

    Args:
        summary: rows from :func:`summarize`.
        meta: ``models``, ``games``, ``variants``, ``report_variant``, ``report_opponent``, ``runs``,
            ``episodes``, ``rounds``, ``seed``, ``xi``, ``checkpoints``.
    """
    v, o, models, games = meta["report_variant"], meta["report_opponent"], meta["models"], meta["games"]
    ci = "runs" if meta["runs"] > 1 else "episodes"
    lines = ["# Evaluation report", "",
             f"Checkpoints: {', '.join(meta['checkpoints']) or '(in-memory module)'}; runs: {meta['runs']}; "
             f"{meta['episodes']} episodes x {meta['rounds']} rounds per cell; seed {meta['seed']}; "
             f"deontological xi = {meta['xi']:g}.",
             f"Values are mean ± 95% CI (1.96 sd / sqrt(n), over {ci}). `base` = the model with adapters "
             "disabled.", ""]
    cell = _pick(summary, variant=v, opponent=o)
    for metric, title, digits in (("regret_deontological", "Deontological regret (0 best, 6 worst)", 2),
                                  ("regret_utilitarian", "Utilitarian regret (0 best, 1 worst)", 3)):
        lines += [f"## {title}: variant `{v}`, opponent `{o}`", "", "| game | " + " | ".join(models) + " |",
                  "|---" * (len(models) + 1) + "|"]
        lines += [f"| {g} | " + " | ".join(_fmt(cell.get((m, g)), metric, digits) for m in models) + " |"
                  for g in games]
        lines.append("")
    types = [*TYPE_KEYS[:4], "illegal"]
    lines += [f"## Action types (share of rounds; X\\|Y = played X after the opponent played Y): variant `{v}`",
              "", "| opponent | game | model | " + " | ".join(t.replace("|", "\\|") for t in types) + " |",
              "|---" * (len(types) + 3) + "|"]
    by_cell = _pick(summary, variant=v)
    for opp in meta["opponents"]:
        for g in games:
            for m in models:
                if (r := by_cell.get((m, g, opp))) is not None:
                    lines.append(f"| {opp} | {g} | {m} | " + " | ".join(f"{r[f'{t}_mean']:.2f}" for t in types) + " |")
    lines += ["", f"## Prompt variants: share of C / D / other answers, opponent `{o}`, mean over games", "",
              "| variant | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for var in meta["variants"]:
        cells = []
        for m in models:
            rs = [r for (mm, _), r in _pick(summary, variant=var, opponent=o).items() if mm == m]
            shares = [statistics.fmean(r[f"{k}_mean"] for r in rs) if rs else math.nan
                      for k in ("cooperation", "defection", "illegal")]
            cells.append(" / ".join(f"{s:.2f}" for s in shares))
        lines.append(f"| {var} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, rounds: Sequence[dict], summary: Sequence[dict], meta: dict,
                  plots: bool = True) -> dict[str, object]:
    """Write ``rounds.csv``, ``summary.csv``, ``summary.json``, ``report.md`` and the PNG plots.

    Returns:
        plot file name -> matplotlib figure (empty when ``plots`` is False), for TensorBoard.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "rounds.csv", rounds, ROUND_COLUMNS)
    write_csv(out_dir / "summary.csv", summary, summary_columns())
    (out_dir / "summary.json").write_text(json.dumps({"meta": meta, "cells": list(summary)}, indent=1))
    (out_dir / "report.md").write_text(report_markdown(summary, meta))
    if not plots:
        return {}
    from lit_moral.plots import figures

    figs = figures(summary, meta)
    for name, fig in figs.items():
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
    return figs


def write_selection(pl_module, folder: Path, experiment=None) -> None:
    """``selection.csv`` (counts: rows = selectors, columns = picked members) and ``selection.png`` in ``folder``,
    and the heatmap in TensorBoard when ``experiment`` is a SummaryWriter."""
    import csv

    import matplotlib.pyplot as plt

    from lit_moral.plots import selection_figure

    sm = pl_module.selection_matrix
    counts = sm.counts.cpu()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "selection.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["selector", *sm.members])
        for name, row in zip(sm.selectors, counts.tolist()):
            w.writerow([name, *(int(x) for x in row)])
    fig = selection_figure(sm.compute().cpu().numpy(), sm.selectors, sm.members,
                           f"Partner selection up to episode {pl_module.episode} ({int(counts.sum())} picks)")
    fig.savefig(folder / "selection.png", dpi=110, bbox_inches="tight")
    if experiment is not None and hasattr(experiment, "add_figure"):
        experiment.add_figure("population/selection", fig, global_step=pl_module.episode, close=False)
    plt.close(fig)


def tensorboard_scalars(summary: Sequence[dict], meta: dict) -> dict[str, float]:
    """Scalars for TensorBoard, for the report variant: ``eval/<metric>/<model>`` (mean over games, report
    opponent) and ``eval/<metric>/<model>/<game>/<opponent>``."""
    out: dict[str, float] = {}
    keys = ("regret_deontological", "regret_utilitarian", "cooperation", "illegal")
    for (m, g, o), r in _pick(summary, variant=meta["report_variant"]).items():
        for k in keys:
            out[f"eval/{k}/{m}/{g}/{o}"] = float(r[f"{k}_mean"])
    for m in meta["models"]:
        rs = [r for (mm, _), r in _pick(summary, variant=meta["report_variant"],
                                        opponent=meta["report_opponent"]).items() if mm == m]
        for k in keys:
            if rs:
                out[f"eval/{k}/{m}"] = statistics.fmean(float(r[f"{k}_mean"]) for r in rs)
    return out


__all__ = ["CELL", "METRICS", "PLOT_FILES", "ROUND_COLUMNS", "TYPE_KEYS", "check_row", "mean_ci", "read_csv", "recompute_regrets",
           "report_markdown", "round_metrics", "write_selection", "summarize", "tensorboard_scalars", "write_csv",
           "write_outputs"]
