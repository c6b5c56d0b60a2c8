"""Evaluate several checkpoints (seeds) of one run config together: ``python -m lit_moral evaluate``.

    python -m lit_moral evaluate --config <run>/config.yaml --ckpt seed0.ckpt seed1.ckpt seed2.ckpt [--out DIR]

Checkpoint ``r`` is run ``r`` (evaluation seed ``evaluation.seed + r``), so the summary's CIs are over runs, as the
paper's (protocol section 7). Other arguments go to the run's LightningCLI parser (``--model.evaluation.episodes
20``). The module is built from the config by the same parser as ``fit`` (:mod:`lit_moral.cli`); the evaluation
itself is :mod:`lit_moral.evaluation`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lit_moral.errors import ConfigError
from lit_moral.evaluation import evaluate, finish, load_weights, report_meta


def _model_config(config: str) -> str:
    """The run config without the subcommand-only keys that a config saved by ``fit`` carries
    (``ckpt_path``, ``weights_only``), as a YAML string for the parser without subcommands."""
    import yaml

    data = yaml.safe_load(Path(config).read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"config: {config} is not a YAML mapping")
    for key in ("ckpt_path", "weights_only"):
        data.pop(key, None)
    return yaml.safe_dump(data)


def evaluate_checkpoints(config: str, ckpts: Sequence[str], out: str | None = None, overrides: Sequence[str] = (),
                         device: str = "cpu") -> list[dict]:
    """Evaluate several checkpoints (seeds) of one run config together; CIs over runs (protocol section 7).

    Args:
        config: the run's YAML (e.g. the ``config.yaml`` saved beside its checkpoints).
        ckpts: checkpoint files; checkpoint ``r`` is run ``r`` (seed ``evaluation.seed + r``).
        out: output folder (default: ``evaluation/`` beside the first checkpoint's folder).
        overrides: extra LightningCLI arguments, e.g. ``["--model.evaluation.episodes", "20"]``.
        device: ``cpu`` or ``cuda``.

    Returns:
        The summary rows.
    """
    from torch.utils.tensorboard import SummaryWriter

    from lit_moral.cli import cli_main

    missing = [c for c in ckpts if not Path(c).is_file()]
    if missing:
        raise ConfigError(f"ckpt: no such file(s): {missing}")
    module = cli_main(["--config", _model_config(config), *overrides], run=False).model
    module.configure_model()
    module.to(device)
    cfg = module.eval_cfg
    target = Path(out or cfg.output_dir or Path(ckpts[0]).resolve().parent.parent / "evaluation")
    rows = []
    for r, ckpt in enumerate(ckpts):
        load_weights(module, ckpt)
        rows += evaluate(module, cfg, run=r)
    writer = SummaryWriter(str(target / "tensorboard"))
    meta = report_meta(module, cfg, runs=len(ckpts), checkpoints=ckpts)
    finish(rows, meta, target, cfg.plots, writer)
    writer.close()
    from lit_moral.report import read_csv
    from lit_moral.runs import test_summary

    summary = read_csv(target / "summary.csv")
    print(test_summary(target, meta, summary), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lit_moral evaluate --config run.yaml --ckpt a.ckpt b.ckpt [--out DIR] [--device cuda]``;
    other arguments go to the run's LightningCLI parser (``--model.evaluation.episodes 20``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lit_moral evaluate", description=main.__doc__)
    ap.add_argument("--config", required=True, help="the run's YAML config")
    ap.add_argument("--ckpt", nargs="+", required=True, help="one checkpoint per run (seed)")
    ap.add_argument("--out", default=None, help="output folder (default: <run>/evaluation)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args, rest = ap.parse_known_args(argv)
    evaluate_checkpoints(args.config, args.ckpt, args.out, rest, args.device)
