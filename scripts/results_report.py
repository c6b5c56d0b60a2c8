"""Tables and figures of ``docs/results.md``, generated from the committed results folder alone.

    python scripts/reproduce.py --report        # rewrites the generated blocks of docs/results.md

``docs/results/<regime>/<condition>/seed<k>/`` holds each run's ``run.json``, ``train.csv`` and evaluation
``summary.json`` (see scripts/reproduce.py). Every number here is recomputed from those files: CIs are over
runs (seeds), 1.96 sd / sqrt(n), as the paper's. The deontological regret at xi 3 is derived exactly from
the same summaries (per round it is xi x [D after C] + 6 x [illegal], so its mean is
xi x share(D|C) + 6 x share(illegal)). ``docs/results.md`` keeps its prose; each block between
``<!-- generated:begin NAME -->`` and ``<!-- generated:end NAME -->`` is replaced.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

GAMES = ["IPD", "ISH", "ICN", "BOS", "ICD"]
PLOTTED = ("C|C", "C|D", "D|C", "D|D", "illegal")
# protocol section 8 (read off the paper's Figure 4): regrets vs Random with new tokens, trained vs TFT.
PAPER_DEON = {"base": [5.8, 5.8, 5.7, 5.8, 5.8], "game": [1.70, 1.65, 1.65, 1.65, 1.65],
              "deontological": [0.10, 0.10, 0.10, 0.05, 0.10], "utilitarian": [0.05] * 5,
              "game_deontological": [0.40, 0.40, 0.40, 0.25, 0.15],
              "unlearning_deontological_vs_tft": [0.35, 0.45, 0.45, 0.35, 0.40],
              "unlearning_utilitarian_vs_tft": [0.95, 0.90, 0.95, 0.90, 0.95]}
PAPER_UTIL = {"base": [0.97, 0.97, 0.96, 0.97, 0.98], "game": [0.24, 0.38, 0.24, 0.18, 0.24],
              "deontological": [0.13, 0.26, 0.09, 0.24, 0.42], "utilitarian": [0.09, 0.20, 0.03, 0.25, 0.5],
              "game_deontological": [0.18, 0.32, 0.16, 0.23, 0.38],
              "unlearning_deontological_vs_tft": [0.14, 0.28, 0.13, 0.23, 0.40],
              "unlearning_utilitarian_vs_tft": [0.18, 0.29, 0.16, 0.22, 0.36]}
CONDITION_ORDER = ["game", "deontological", "utilitarian", "game_deontological", "llm_vs_llm_game",
                   "llm_vs_llm_deontological", "llm_vs_llm_utilitarian", "llm_vs_llm_game_deontological",
                   "unlearning_deontological_vs_tft", "unlearning_utilitarian_vs_tft", "unlearning_deontological_vs_llm",
                   "unlearning_utilitarian_vs_llm"]


# ---------------------------------------------------------------------------------------------- loading
def load_runs(results: Path) -> dict[tuple[str, str], list[dict]]:
    """``(regime, condition) -> runs`` sorted by seed; each run: ``info`` (run.json), ``train`` (rows), ``cells``
    (summary.json cells by ``(model, game, variant, opponent)``), ``meta`` and ``dir``."""
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for info_file in sorted(results.glob("*/*/seed*/run.json")):
        d = info_file.parent
        info = json.loads(info_file.read_text())
        summary = json.loads((d / "summary.json").read_text())
        with open(d / "train.csv", newline="") as f:
            train = [{k: (v if k == "agent" else float(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        cells = {(c["model"], c["game"], c["variant"], c["opponent"]): c for c in summary["cells"]}
        out[(info["regime"], info["condition"])].append(
            {"info": info, "train": train, "cells": cells, "meta": summary["meta"], "dir": d})
    for runs in out.values():
        runs.sort(key=lambda r: r["info"]["seed"])
    return dict(out)


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """Mean, 95% CI half-width over runs (1.96 sd / sqrt(n); 0 for one run) and n."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    if len(vals) == 1:
        return vals[0], 0.0, 1
    return statistics.fmean(vals), 1.96 * statistics.stdev(vals) / math.sqrt(len(vals)), len(vals)


def cell_value(cell: dict | None, metric: str) -> float | None:
    """One run's value of ``metric`` in a summary cell; ``regret_deontological_xi3`` is derived exactly."""
    if cell is None:
        return None
    if metric == "regret_deontological_xi3":
        return 3.0 * cell["D|C_mean"] + 6.0 * cell["illegal_mean"]
    return cell.get(f"{metric}_mean")


def _fmt(mci: tuple[float, float, int], digits: int) -> str:
    m, ci, n = mci
    if n == 0:
        return "-"
    return f"{m:.{digits}f} (n=1)" if n == 1 else f"{m:.{digits}f} ± {ci:.{digits}f}"  # one run: no CI to give


# ---------------------------------------------------------------------------------------------- tables
def runs_table(runs: dict) -> str:
    lines = ["| regime | condition | seeds | episodes | train wall (min), mean | device |", "|---|---|---|---|---|---|"]
    for (regime, cond), rs in _ordered(runs):
        walls = [r["info"]["wall_s"] / 60 for r in rs]
        devices = sorted({r["info"]["device"].split(" (")[0] for r in rs})
        lines.append(f"| {regime} | {cond} | {', '.join(str(r['info']['seed']) for r in rs)} | "
                     f"{int(rs[0]['info']['episodes'])} | {statistics.fmean(walls):.1f} | {'; '.join(devices)} |")
    return "\n".join(lines)


def training_table(runs: dict, regime: str) -> str:
    """Final action types (mean over the last 100 episodes of each run) per condition and agent."""
    lines = ["| condition | agent | runs | " + " | ".join(t.replace("|", "\\|") for t in PLOTTED) + " |",
             "|---" * (len(PLOTTED) + 3) + "|"]
    for (reg, cond), rs in _ordered(runs):
        if reg != regime:
            continue
        for agent in sorted(rs[0]["info"]["final_actions"]):
            cells = []
            for t in PLOTTED:
                vals = [_final(r, agent, t) for r in rs]
                cells.append(_fmt(mean_ci(vals), 2))
            lines.append(f"| {cond} | {agent} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _final(run: dict, agent: str, t: str) -> float:
    f = run["info"]["final_actions"][agent]
    return f["illegal|C"] + f["illegal|D"] if t == "illegal" else f[t]


def regret_table(runs: dict, regime: str, metric: str, digits: int, variant: str = "new_tokens",
                 opponent: str = "random") -> str:
    """Figure 4: rows = base + each condition's agents, columns = games; mean ± CI over runs [paper's value]."""
    paper = PAPER_UTIL if metric == "regret_utilitarian" else PAPER_DEON if metric == "regret_deontological" else {}
    lines = ["| condition | model | runs | " + " | ".join(GAMES) + " |", "|---" * (len(GAMES) + 3) + "|"]
    body, base_runs = [], None
    for (reg, cond), rs in _ordered(runs):
        if reg != regime:
            continue
        base_runs = base_runs or rs
        for model in [m for m in rs[0]["meta"]["models"] if m != "base"]:
            body.append(_regret_row(cond, model, rs, metric, digits, variant, opponent, paper.get(cond)))
    if base_runs:
        lines.append(_regret_row("no fine-tuning", "base", base_runs, metric, digits, variant, opponent,
                                 paper.get("base")))
    return "\n".join(lines + body)


def _regret_row(label, model, rs, metric, digits, variant, opponent, ref) -> str:
    cells = []
    for i, g in enumerate(GAMES):
        v = _fmt(mean_ci([cell_value(r["cells"].get((model, g, variant, opponent)), metric) for r in rs]), digits)
        cells.append(v + (f" [{ref[i]:g}]" if ref else ""))
    return f"| {label} | {model} | {len(rs)} | " + " | ".join(cells) + " |"


def _ordered(runs: dict):
    rank = {c: i for i, c in enumerate(CONDITION_ORDER)}
    return sorted(runs.items(), key=lambda kv: (kv[0][0], rank.get(kv[0][1], 99), kv[0][1]))


# ---------------------------------------------------------------------------------------------- findings
def _share(rs, agent, types) -> tuple[float, float, int]:
    return mean_ci([sum(_final(r, agent, t) for t in types) for r in rs])


def _cond_p(rs, agent, given: str, act: str) -> tuple[float, float, int]:
    """P(act | other's previous = given) at the end of training, per run."""
    vals = []
    for r in rs:
        f = r["info"]["final_actions"][agent]
        tot = f[f"C|{given}"] + f[f"D|{given}"] + f[f"illegal|{given}"]
        vals.append(_final(r, agent, f"{act}|{given}") / tot if tot > 0 else math.nan)
    return mean_ci(vals)


def _verdict(value: float, full: float, partly: float, higher: bool = True) -> str:
    if math.isnan(value):
        return "not run"
    ok = value >= full if higher else value <= full
    half = value >= partly if higher else value <= partly
    return "reproduced" if ok else "partly" if half else "not reproduced"


def findings_table(runs: dict, regime: str) -> str:
    """The paper's qualitative findings, each with its criterion, our numbers and a verdict."""
    get = lambda c: runs.get((regime, c), [])  # noqa: E731
    rows = []

    def add(finding, cond, criterion, mci, full, partly, higher=True, agent="agent_0"):
        rs = get(cond)
        if not rs:
            rows.append(f"| {finding} | {criterion} | not run | not run |")
            return
        m, ci, n = mci(rs, agent)
        rows.append(f"| {finding} | {criterion} | {_fmt((m, ci, n), 2)}{f' (n={n})' if n > 1 else ''} | "
                    f"{_verdict(m, full, partly, higher)} |")

    add("Game -> defection", "game", "share of D at the end (>= 0.9; partly >= 0.6)",
        lambda rs, a: _share(rs, a, ["D|C", "D|D"]), 0.9, 0.6)
    add("Deontological -> D\\|C vanishes", "deontological", "share of D\\|C at the end (<= 0.02; partly <= 0.1)",
        lambda rs, a: _share(rs, a, ["D|C"]), 0.02, 0.1, higher=False)
    add("Utilitarian -> near-unconditional cooperation", "utilitarian", "share of C at the end (>= 0.95; partly >= 0.8)",
        lambda rs, a: _share(rs, a, ["C|C", "C|D"]), 0.95, 0.8)
    add("Game+Deontological -> TFT-like: C after C", "game_deontological", "P(C \\| other C) (>= 0.9; partly >= 0.7)",
        lambda rs, a: _cond_p(rs, a, "C", "C"), 0.9, 0.7)
    add("Game+Deontological -> TFT-like: D after D", "game_deontological", "P(D \\| other D) (>= 0.9; partly >= 0.7)",
        lambda rs, a: _cond_p(rs, a, "D", "D"), 0.9, 0.7)
    for c, name in (("llm_vs_llm_game", "Two Game learners -> mutual defection"),
                    ("llm_vs_llm_utilitarian", "Two Utilitarian learners -> mutual cooperation"),
                    ("llm_vs_llm_deontological", "Two Deontological learners -> no D\\|C")):
        types = ["D|C", "D|D"] if c.endswith("game") else ["C|C", "C|D"] if c.endswith("utilitarian") else ["D|C"]
        crit = "share of D" if c.endswith("game") else "share of C" if c.endswith("utilitarian") else "share of D\\|C"
        higher = not c.endswith("deontological")
        for agent in ("agent_0", "agent_1"):
            add(f"{name} ({agent})", c, f"{crit} at the end" + (" (>= 0.9; partly >= 0.6)" if higher else
                                                                 " (<= 0.02; partly <= 0.1)"),
                lambda rs, a, types=types: _share(rs, a, types), 0.9 if higher else 0.02, 0.6 if higher else 0.1,
                higher, agent)
    add("Unlearning vs TFT (Game, then Deontological): C\\|C recovers to ~40-50%", "unlearning_deontological_vs_tft",
        "share of C\\|C at the end (>= 0.4; partly >= 0.15)", lambda rs, a: _share(rs, a, ["C|C"]), 0.4, 0.15)
    add("Unlearning vs TFT (Game, then Utilitarian): C\\|C recovers to ~40-50%", "unlearning_utilitarian_vs_tft",
        "share of C\\|C at the end (>= 0.4; partly >= 0.15)", lambda rs, a: _share(rs, a, ["C|C"]), 0.4, 0.15)
    for c, value in (("unlearning_deontological_vs_llm", "Deontological"), ("unlearning_utilitarian_vs_llm", "Utilitarian")):
        add(f"Unlearning vs LLM (Game, then {value}): later, partial recovery", c,
            "share of C\\|C at the end (agent_0; partly >= 0.15)", lambda rs, a: _share(rs, a, ["C|C"]), 0.4, 0.15)
    if regime == "constrained":  # the choice is between the two legal strings: nothing to vanish
        rows.append("| Illegal answers vanish within a few dozen episodes | illegal share | not applicable: constrained "
                    "choice cannot answer illegally | not tested |")
    else:
        add("Illegal answers vanish within a few dozen episodes", "game",
            "illegal share at the end (<= 0.02; partly <= 0.1)", lambda rs, a: _share(rs, a, ["illegal"]), 0.02, 0.1,
            higher=False)
    header = ["| paper's finding (protocol section 8) | criterion | here (mean ± 95% CI over runs) | verdict |",
              "|---|---|---|---|"]
    return "\n".join(header + rows)


# ---------------------------------------------------------------------------------------------- figures
def training_figure(runs: dict, regime: str, out: Path) -> Path | None:
    """Paper Figures 2-3: action-type shares per iteration over episodes, mean over seeds with a ±1 sd band,
    one panel per (condition, agent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_moral.plots import TYPE_COLORS

    panels = [(cond, agent, rs) for (reg, cond), rs in _ordered(runs) if reg == regime
              for agent in sorted(rs[0]["info"]["final_actions"])]
    if not panels:
        return None
    cols = 4
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.9 * nrows + 0.6), squeeze=False, sharey=True)
    for ax, (cond, agent, rs) in zip(axes.flat, panels):
        for t, color in TYPE_COLORS.items():
            series = defaultdict(list)
            for r in rs:
                for row in r["train"]:
                    if row["agent"] == agent:
                        v = row["illegal|C"] + row["illegal|D"] if t == "illegal" else row[t]
                        series[int(row["episode"])].append(v)
            eps = sorted(series)
            mean = [statistics.fmean(series[e]) for e in eps]
            sd = [statistics.stdev(series[e]) if len(series[e]) > 1 else 0.0 for e in eps]
            ax.plot(eps, mean, color=color, label=t, lw=1.6)
            ax.fill_between(eps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color,
                            alpha=0.2, lw=0)
        ax.set_title(f"{cond}, {agent} (n={len(rs)} seeds)", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("episode")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of rounds")
    axes.flat[0].legend(fontsize=7, title="X|Y: X after other's Y", title_fontsize=7)
    fig.suptitle(f"Training action types per iteration ({regime} regime; line: mean over seeds, band: ±1 sd)",
                 fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- the document
def blocks(runs: dict, figures: Path, doc: Path) -> dict[str, str]:
    regimes = sorted({reg for reg, _ in runs})
    out = {"runs": runs_table(runs)}
    for regime in regimes:
        fig = training_figure(runs, regime, figures / f"{regime}_training.png")
        rel = fig.relative_to(doc.parent) if fig else None
        parts = [f"#### Final training behaviour ({regime}): action-type shares over the last 100 episodes, "
                 "mean ± 95% CI over runs", "", training_table(runs, regime), ""]
        for metric, title, digits in (("regret_deontological", "Deontological regret, xi 4 (the original "
                                       "evaluation's)", 2),
                                      ("regret_deontological_xi3", "Deontological regret, xi 3 (training's)", 2),
                                      ("regret_utilitarian", "Utilitarian regret", 3)):
            parts += [f"#### {title} ({regime}): new tokens vs Random, mean ± 95% CI over runs "
                      "[paper's Figure 4 value]", "", regret_table(runs, regime, metric, digits), ""]
        parts += [f"#### The paper's findings ({regime})", "", findings_table(runs, regime), ""]
        if rel:
            parts += [f"![training action types, {regime}]({rel})", ""]
        out[f"results_{regime}"] = "\n".join(parts).rstrip()
    return out


def write_report(results: Path, doc: Path, figures: Path, benchmarks: Path | None = None) -> Path:
    """Regenerate every ``generated`` block of ``doc`` from ``results`` (the preference table from its ``extras/``,
    scripts/preference_tables.py; the learner tables from the JSONL files of ``benchmarks``,
    scripts/benchmark_tables.py); blocks the document lacks are appended."""
    runs = load_runs(results)
    text = doc.read_text() if doc.exists() else "# Results\n"
    made = blocks(runs, figures, doc)
    from preference_tables import preference_blocks  # scripts/preference_tables.py

    made.update(preference_blocks(results / "extras"))
    if benchmarks is not None:
        from benchmark_tables import benchmark_blocks  # scripts/benchmark_tables.py

        made.update(benchmark_blocks(benchmarks))
    for name, body in made.items():
        begin, end = f"<!-- generated:begin {name} -->", f"<!-- generated:end {name} -->"
        new = f"{begin}\n{body}\n{end}"
        if begin in text:
            text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _, new=new: new, text, flags=re.S)
        else:
            text = text.rstrip() + f"\n\n{new}\n"
    doc.write_text(text)
    return doc
