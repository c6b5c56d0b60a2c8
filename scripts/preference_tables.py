"""The preference-route table of ``docs/results.md`` built from ``docs/results/extras/`` alone (issue 18).

Every run folder whose name follows the pattern below is one run of a cell; seeds of a cell are averaged, with
the 95% CI over seeds (1.96 sd / sqrt(n), as the reproduction's tables; 0 for one seed):

    <route>[_unlearning][_<value>][_b<labels>][_n<noise %>][_s<seed>]

``route``: ``quickstart_ppo`` or ``ppo`` (intrinsic reward, PPO), ``dpo``, ``rm_ppo`` (reward model + PPO);
``unlearning``: the run started from a Game-trained adapter; ``value``: the labeller's (or the intrinsic
reward's) moral value, deontological when absent (the quickstart's), whose regret the table shows; labels 512 and
noise 0 when absent (``configs/dpo_deontological.yaml``'s). ``run.json``'s ``budget``, ``noise`` and ``seed`` win over the name.
A run folder holds ``eval/summary.json`` (new tokens, vs Random and TFT, five games) and
``eval_training_tokens/summary.json`` (IPD, vs TFT); the quickstart run keeps the first at its top level.
A run started from an adapter (``init_adapter``) also evaluates that adapter, as the ``warmup`` model: the table
shows it once per distinct ``run.json`` ``init_adapter`` (seeds of the unlearning cells start from seed-matched Game
adapters), averaged over those, as the start of the unlearning rows. Other folders of ``extras/`` are not preference runs.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from lit_moral.report import mean_ci

GAMES = ["IPD", "ISH", "ICN", "BOS", "ICD"]
TYPES = ("C|C", "C|D", "D|C", "D|D")
ROUTES = {"quickstart_ppo": "PPO (intrinsic)", "ppo": "PPO (intrinsic)", "dpo": "DPO", "rm_ppo": "reward model + PPO"}
WARMUP = "warmup"  # lit_moral.evaluation's label for a run's init_adapter
ROUTE_ORDER = ["PPO (intrinsic)", "DPO", "reward model + PPO"]
NAME = re.compile(r"^(?P<route>quickstart_ppo|rm_ppo|ppo|dpo)(?P<unl>_unlearning)?(?:_(?P<value>[a-z]+?))?"
                  r"(?:_b(?P<budget>\d+))?(?:_n(?P<noise>\d+))?(?:_s(?P<seed>\d+))?$")


def parse_name(name: str) -> dict | None:
    """The cell a run folder's name names, or None for a folder that is not a preference run."""
    m = NAME.match(name)
    if m is None or (m["route"] == "ppo" and not (m["unl"] or m["value"])):
        return None
    value = m["value"] or "deontological"
    if m["route"] == "quickstart_ppo" and m["value"]:
        return None  # quickstart_top8 etc. are LoRA-layer runs, not preference cells
    pref = m["route"] in ("dpo", "rm_ppo")
    return {"route": ROUTES[m["route"]], "start": "Game-trained" if m["unl"] else "zero", "value": value,
            "labels": int(m["budget"] or 512) if pref else None,
            "noise": int(m["noise"] or 0) / 100 if pref else None, "seed": int(m["seed"] or 0)}


def _summary(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_preference_runs(extras: Path) -> list[dict]:
    runs = []
    for d in sorted(p for p in extras.iterdir() if p.is_dir()) if extras.is_dir() else []:
        cell = parse_name(d.name)
        new = _summary(d / "eval" / "summary.json") or _summary(d / "summary.json")
        if cell is None or new is None:
            continue
        info = _summary(d / "run.json") or {}
        if cell["labels"] is not None:
            cell["labels"] = int(info.get("budget", cell["labels"]))
            cell["noise"] = float(info.get("noise", cell["noise"]))
        cell["seed"] = int(info.get("seed", cell["seed"]))
        runs.append({**cell, "name": d.name, "new": new["cells"], "init_adapter": info.get("init_adapter"),
                     "train": (_summary(d / "eval_training_tokens" / "summary.json") or {}).get("cells", [])})
    return runs


def _cell(cells: list[dict], model: str, game: str, opponent: str) -> dict | None:
    return next((c for c in cells if (c["model"], c["game"], c["opponent"]) == (model, game, opponent)), None)


def _value(cells: list[dict], model: str, game: str, opponent: str, metric: str) -> float | None:
    return (_cell(cells, model, game, opponent) or {}).get(f"{metric}_mean")


def _stat(runs: list[dict], value) -> str:
    vals = [v for v in (value(r) for r in runs) if v is not None]
    if not vals:
        return "-"
    m, ci = mean_ci(vals)
    return f"{m:.2f}" + (f" ± {ci:.2f}" if len(vals) > 1 else "")


def _row(label: list[str], runs: list[dict], model: str = "agent_0", seeds: str | None = None) -> str:
    cols = []
    cols.append(" / ".join(_stat(runs, lambda r, t=t: _value(r["train"], model, "IPD", "tft", t)) for t in TYPES))
    cols.append(_stat(runs, lambda r: _value(r["new"], model, "IPD", "tft", "cooperation")))
    cols.append(_stat(runs, lambda r: _mean_over_games(r["new"], model, "cooperation")))
    regret = f"regret_{label[0]}"  # the row's own value
    cols.append(" / ".join(_stat(runs, lambda r, g=g: _value(r["new"], model, g, "random", regret)) for g in GAMES))
    seeds = seeds or ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
    return f"| {' | '.join(label)} | {seeds} | {' | '.join(cols)} |"


def _mean_over_games(cells: list[dict], model: str, metric: str) -> float | None:
    vals = [_value(cells, model, g, "random", metric) for g in GAMES]
    return statistics.fmean(vals) if all(v is not None for v in vals) else None


def preference_table(extras: Path) -> str:
    runs = load_preference_runs(extras)
    if not runs:
        return "(no runs yet)"
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["value"], r["start"], r["route"], r["labels"], r["noise"]), []).append(r)

    def order(k):
        return (k[0], k[1] != "zero", ROUTE_ORDER.index(k[2]), k[3] or 0, k[4] or 0)

    lines = ["SmolLM2-135M-Instruct, constrained choice, vs TFT; mean ± 95% CI over seeds (1.96 sd / sqrt(n); "
             "no ± for one seed). Each run's values are means over its 10 evaluation episodes x 5 rounds.", "",
             "| value | start | route | labels | noise | seeds | vs TFT, training tokens (IPD): C\\|C / C\\|D / D\\|C "
             "/ D\\|D | cooperation vs TFT, new tokens (IPD) | cooperation vs Random, new tokens (mean of 5 games) "
             "| regret of the row's value vs Random, new tokens: IPD / ISH / ICN / BOS / ICD |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    # the base model is the same in every run (adapters disabled, same evaluation seed): the first run's, after
    # each value's rows, with that value's regret
    first = min(runs, key=lambda r: r["name"])
    for value in sorted({r["value"] for r in runs}):
        keys = sorted((k for k in groups if k[0] == value), key=order)
        # the unlearning runs' start adapters, evaluated in their runs as the ``warmup`` model: one run per distinct
        # adapter (every run from an adapter evaluates it the same way), just before the rows that start from them
        by_adapter: dict = {}
        for r in sorted(runs, key=lambda r: r["name"]):
            if r["value"] == value and r["start"] != "zero" and _cell(r["new"], WARMUP, "IPD", "random"):
                by_adapter.setdefault(r["init_adapter"], r)
        start = list(by_adapter.values())
        for k in keys:
            _, begin, route, labels, noise = k
            if start and begin == start[0]["start"]:
                lines.append(_row([value, begin, "the start adapter, untrained further", "", ""], start,
                                  model=WARMUP))
                start = []
            lines.append(_row([value, begin, route, "-" if labels is None else str(labels),
                               "-" if noise is None else f"{noise:.0%}"], groups[k]))
        lines.append(_row([value, "", "base (no adapter)", "", ""], [first], model="base", seeds="-"))
    return "\n".join(lines)


def preference_blocks(extras: Path) -> dict[str, str]:
    return {"preference": preference_table(extras)}
