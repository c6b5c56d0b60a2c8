"""LightningCLI wiring: ``python -m lit_moral fit --config configs/<experiment>.yaml``."""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import typing

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_moral.checkpoint_io import AtomicCheckpointIO
from lit_moral.errors import ConfigError
from lit_moral.module import MoralPPO

# How jsonargparse reports a key it does not know: (pattern, how to build the full key from its groups).
_UNKNOWN_KEY = (
    re.compile(r"does not accept option '([^']+)'"),
    re.compile(r"unrecognized arguments: --?([\w.\-]+)"),
    re.compile(r'Parser key "([^"]+)":.*?Option \'([^\']+)\' is not accepted', re.S),
    re.compile(r'Parser key "([^"]+)":.*?NestedArg\(key=\'([^\']+)\'', re.S),
)


def valid_keys(parser) -> list[str]:
    """Every dotted key ``parser`` accepts, including subcommands' and dataclass fields (``model.lora.r``)."""
    keys: list[str] = []
    for action in parser._actions:
        subparsers = getattr(action, "_name_parser_map", None)
        if subparsers:
            for sub in subparsers.values():
                keys += valid_keys(sub)
            continue
        if action.dest in ("help", "config", None) or action.dest.startswith("__"):
            continue
        keys.append(action.dest)
        hint = getattr(action, "_typehint", None)
        for cls in (*typing.get_args(hint), hint):
            if dataclasses.is_dataclass(cls):
                keys += [f"{action.dest}.{f.name}" for f in dataclasses.fields(cls)]
    return sorted(set(keys))


def unknown_key_message(message: str, keys: list[str]) -> str | None:
    """One line naming the unknown key in a jsonargparse ``message`` and the closest valid key, or None."""
    for pattern in _UNKNOWN_KEY:
        m = pattern.search(message)
        if m:
            key = ".".join(m.groups())
            hint = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            tail = f"did you mean {hint[0]!r}?" if hint else "run with --help for the accepted keys"
            return f"unknown key {key!r}; {tail}"
    return None


class LitMoralParser(LightningArgumentParser):
    """LightningArgumentParser whose error for an unknown key is one line suggesting the closest valid key."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        line = unknown_key_message(message, valid_keys(self)) if self.exit_on_error else None
        if self.exit_on_error and "--> model.seed" in message:
            line = "model.seed: set from seed_everything (one seed drives every random stream); give --seed_everything N"
        if line is None:
            super().error(message, ex)
        sys.stderr.write(f"error: {line}\n")
        self.exit(2)


def _module_seed(seed: object) -> int | None:
    """``seed_everything`` as the module's seed; ``true`` (a random seed, drawn after parsing) gives None: the
    module then reads the seed Lightning drew (``PL_GLOBAL_SEED``)."""
    if isinstance(seed, bool) or seed is None:
        return None
    try:
        return int(seed)
    except (TypeError, ValueError):
        raise ConfigError(f"seed_everything: got {seed!r}; must be a whole number (or true for a random seed)") from None


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
            "trainer.plugins": [{"class_path": "lit_moral.checkpoint_io.AtomicCheckpointIO"}],
        })
        parser.link_arguments("model.run_name", "trainer.logger.init_args.name")
        # One seed drives everything: seed_everything (adapter initialisation, dropout) is also the module's seed
        # (initial states, option orders, sampling, minibatches, opponents).
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_module_seed)

    def _parse_ckpt_path(self) -> None:
        """Lightning re-applies a checkpoint's saved hyperparameters over the parsed config; the evaluation
        settings (``model.evaluation``) are not the run's but this command's, so they keep the parsed value."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path:
            AtomicCheckpointIO().load_checkpoint(ckpt_path)  # a missing or damaged file: ConfigError, before any model
        if sub == "fit":
            return  # resuming: the config is authoritative and MoralPPO.on_load_checkpoint names any mismatch
        key = f"{sub}.model.evaluation"
        parsed = self.config.get(key) if sub else None
        super()._parse_ckpt_path()
        if sub:
            self.config[key] = parsed


# Commands beside Lightning's (fit, test): each trains its own LightningModule with ``fit``'s options.
MODULES = {"warmup": ("lit_moral.warmup", "FormatWarmup")}


def _module_for(argv: list[str]) -> tuple[type, list[str]]:
    """The LightningModule a command line trains and the arguments for LightningCLI."""
    if argv and argv[0] in MODULES:
        import importlib

        mod, name = MODULES[argv[0]]
        return getattr(importlib.import_module(mod), name), ["fit", *argv[1:]]
    return MoralPPO, argv


def cli_main(args: list[str] | None = None, run: bool = True) -> LitMoralCLI | None:
    """Entry point of ``lit-moral`` and ``python -m lit_moral``; ``args`` lets tests pass a list.

    ``fit`` / ``test`` run MoralPPO (PPO on game and moral rewards); ``warmup`` runs the supervised format
    warm-up (:class:`lit_moral.warmup.FormatWarmup`) with the same options as ``fit``.
    """
    module, argv = _module_for(list(sys.argv[1:] if args is None else args))
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads the command line itself (and warns when given both)
    try:
        return LitMoralCLI(module, auto_configure_optimizers=False, args=None if args is None else argv, run=run,
                           seed_everything_default=0, save_config_kwargs={"overwrite": True},
                           parser_class=LitMoralParser)
    except ConfigError as e:
        if args is not None:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
