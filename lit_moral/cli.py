"""LightningCLI wiring: ``python -m lit_moral fit --config configs/<experiment>.yaml``."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lit_moral.errors import ConfigError
from lit_moral.module import MoralPPO


class LitMoralCLI(LightningCLI):
    """LightningCLI with lit_moral's defaults: TensorBoard logs and checkpoints under ``checkpoints/<run_name>/``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "checkpoints", "name": "run"}},
            "trainer.max_epochs": 1,
            "trainer.accelerator": "auto",
            "trainer.devices": 1,
            "trainer.log_every_n_steps": 1,
            "trainer.num_sanity_val_steps": 0,
        })
        parser.link_arguments("model.run_name", "trainer.logger.init_args.name")


def cli_main(args: list[str] | None = None, run: bool = True) -> LitMoralCLI | None:
    """Entry point of ``lit-moral`` and ``python -m lit_moral``; ``args`` lets tests pass a list."""
    try:
        return LitMoralCLI(MoralPPO, auto_configure_optimizers=False, args=args, run=run,
                           save_config_kwargs={"overwrite": True})
    except ConfigError as e:
        if args is not None:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
