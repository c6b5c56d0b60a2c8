"""Evaluation figures (matplotlib, Agg): action types per game and opponent, regret bars, prompt variants.

Each function takes summary rows from :func:`lit_moral.report.summarize` and the report metadata
(``models``, ``games``, ``opponents``, ``variants``, ``report_variant``, ``report_opponent``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lit_moral.games import PLOTTED_TYPES  # noqa: E402

# One colour per plotted action type (PLOTTED_TYPES order), shared by every figure of the package.
TYPE_COLORS = dict(zip(PLOTTED_TYPES, ("#2ca02c", "#98df8a", "#d62728", "#ff9896", "#7f7f7f")))
TYPES = tuple(TYPE_COLORS.items())
ANSWERS = (("cooperation", "C", "#2ca02c"), ("defection", "D", "#d62728"), ("illegal", "other", "#7f7f7f"))


def model_colors(n: int) -> list:
    """``n`` distinct colours, one per model: tab10 up to 10 models, tab20 up to 20, then evenly spaced hues."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def _index(summary: Sequence[dict]) -> dict[tuple, dict]:
    return {(r["model"], r["game"], r["variant"], r["opponent"]): r for r in summary}


def _n(rows) -> str:
    """``n=<units behind the CI> <runs|episodes>`` of the first summary row that has one."""
    r = next((r for r in rows if r and "n" in r), None)
    return f"n={r['n']} {r.get('ci_over', '')}".strip() if r else ""


def action_types_figure(summary: Sequence[dict], meta: dict):
    """Stacked action-type shares, one bar per game, one panel per evaluated (model, opponent); each segment has
    its 95% CI as an error bar at its top, and each panel says its n."""
    import math

    idx, v = _index(summary), meta["report_variant"]
    models, games = meta["models"], meta["games"]
    panels = [(m, o) for m in models for o in meta["opponents"] if any((m, g, v, o) in idx for g in games)]
    cols = min(len({o for _, o in panels}) or 1, 4)
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.9 * cols + 1.6, 2.6 * nrows + 0.6), squeeze=False, sharey=True)
    for ax, (m, o) in zip(axes.flat, panels):
        rows = [idx.get((m, g, v, o)) for g in games]
        bottom = [0.0] * len(games)
        for t, color in TYPES:  # "illegal" is illegal|C + illegal|D
            vals = [r[f"{t}_mean"] if r else 0.0 for r in rows]
            cis = [r.get(f"{t}_ci", 0.0) if r else 0.0 for r in rows]
            ax.bar(games, vals, bottom=bottom, color=color, label=t, width=0.7)
            tops = [b + x for b, x in zip(bottom, vals)]
            shown = [i for i, x in enumerate(vals) if x > 0 and cis[i] > 0]
            ax.errorbar([games[i] for i in shown], [tops[i] for i in shown], yerr=[cis[i] for i in shown], fmt="none",
                        ecolor="black", elinewidth=0.8, capsize=2)
            bottom = tops
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{m} vs {o} ({_n(rows)})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("game")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of rounds")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9,
               title="action | opponent's\nprevious action", title_fontsize=8)
    fig.suptitle(f"Action types per game and opponent (prompt variant: {v}; error bars: 95% CI)", fontsize=11)
    fig.tight_layout()
    return fig


def regret_figure(summary: Sequence[dict], meta: dict):
    """Grouped bars of deontological and utilitarian regret per game, one bar per model, 95% CI error bars.

    Each axis is scaled to the data (its range is in the panel title, beside the metric's full range), and a
    bar at 0 is marked by a short dash so it does not vanish; the legend gives each model's n (runs, else
    episodes, behind the CI).
    """
    idx, v, o = _index(summary), meta["report_variant"], meta["report_opponent"]
    models, games = meta["models"], meta["games"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width, colors = 0.8 / max(len(models), 1), model_colors(len(models))
    panels = (("regret_deontological", "deontological regret", 6.0),
              ("regret_utilitarian", "utilitarian regret", 1.0))
    for ax, (metric, label, full) in zip(axes, panels):
        top = 0.0
        for k, m in enumerate(models):
            rows = [idx.get((m, g, v, o)) for g in games]
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(games))]
            means = [r[f"{metric}_mean"] if r else 0.0 for r in rows]
            cis = [r[f"{metric}_ci"] if r else 0.0 for r in rows]
            n = next((f"{r['n']} {r.get('ci_over', '')}".strip() for r in rows if r and "n" in r), "")
            ax.bar(xs, means, width, yerr=cis, capsize=3, label=f"{m} (n={n})" if n else m, color=colors[k])
            ax.scatter([x for x, y in zip(xs, means) if y == 0], [0] * means.count(0), marker="_", s=60,
                       color=colors[k], zorder=3)
            top = max([top, *(a + b for a, b in zip(means, cis))])
        top = min(full, max(top * 1.15, full / 50))
        ax.set_ylim(0, top)
        ax.set_xticks(range(len(games)), games)
        ax.set_xlabel("game")
        ax.set_ylabel(f"{label} (0 best)")
        ax.set_title(f"{label}: axis 0-{top:.2g} (full range 0-{full:g})", fontsize=9)
    axes[1].legend(title="model", fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"Moral regret per game (opponent: {o}, prompt variant: {v}; error bars: 95% CI)", fontsize=11)
    fig.tight_layout()
    return fig


def variants_figure(summary: Sequence[dict], meta: dict):
    """Share of C / D / other answers per prompt variant (mean over games), one panel per model."""
    o, models, variants = meta["report_opponent"], meta["models"], meta["variants"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1.4, 4.0), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], models):
        bottom = [0.0] * len(variants)
        for key, label, color in ANSWERS:
            vals = []
            for var in variants:
                rs = [r[f"{key}_mean"] for r in summary if (r["model"], r["variant"], r["opponent"]) == (m, var, o)]
                vals.append(sum(rs) / len(rs) if rs else 0.0)
            ax.bar(variants, vals, bottom=bottom, color=color, label=label, width=0.7)
            bottom = [b + x for b, x in zip(bottom, vals)]
        ax.set_title(m, fontsize=10)
        ax.set_ylim(0, 1)
        ax.set_xlabel("prompt variant")
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        for lbl in ax.get_xticklabels():
            lbl.set_horizontalalignment("right")
    axes[0][0].set_ylabel("share of answers")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title="answer", fontsize=9)
    fig.suptitle(f"Answers per prompt variant (opponent: {o}; mean over games)", fontsize=11)
    fig.tight_layout()
    return fig


def figures(summary: Sequence[dict], meta: dict) -> dict[str, object]:
    """File name -> figure for the evaluation plots (``variants.png`` only when several variants were played)."""
    out = {"action_types.png": action_types_figure(summary, meta), "regret.png": regret_figure(summary, meta)}
    if len(meta["variants"]) > 1:
        out["variants.png"] = variants_figure(summary, meta)
    return out


def selection_figure(shares, selectors: Sequence[str], members: Sequence[str], title: str = ""):
    """Heatmap of partner selection: row = selector, column = picked member, cell = share of its picks."""
    import numpy as np

    data = np.asarray(shares, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(members), 1.0 + 0.5 * len(selectors)))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(members)), members, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(selectors)), selectors, fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if data[i, j] < 0.6 else "black")
    ax.set_xlabel("picked partner")
    ax.set_ylabel("selector")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the selector's picks")
    ax.set_title(title or "Partner selection", fontsize=10)
    fig.tight_layout()
    return fig
