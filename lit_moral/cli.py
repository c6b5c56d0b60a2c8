"""LightningCLI wiring: ``python -m lit_moral fit --config configs/<experiment>.yaml``."""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import sys
import time
import typing
from pathlib import Path

import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_moral.checkpoint_io import AtomicCheckpointIO
from lit_moral.errors import ConfigError
from lit_moral.hardware import bf16_advice
from lit_moral.module import MoralPPO
from lit_moral.runs import fit_summary, latest_checkpoint, run_dir_of, test_summary

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


class LitMoralHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with the epilog (the list of commands) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return text if text == COMMANDS else super()._fill_text(text, width, indent)


class LitMoralParser(LightningArgumentParser):
    """LightningArgumentParser that refuses abbreviated keys (``--trainer.max_epoch`` is not ``max_epochs``) and
    whose error for an unknown key is one line suggesting the closest valid key."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("prog", "python -m lit_moral")
        super().__init__(*args, **kwargs)

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
    """LightningCLI with lit_moral's defaults and behaviour.

    * TensorBoard logs and checkpoints under ``checkpoints/<run_name>/version_N/``; ``fit --ckpt_path
      <run>/checkpoints/last.ckpt`` (or ``--ckpt_path last``: the latest run of this ``run_name``) resumes in that
      run's own folder, and ``test --ckpt_path <ckpt>`` writes its evaluation beside it (``<run>/evaluation/``);
    * one seed: ``seed_everything`` is also the module's ``seed``;
    * subcommands ``fit`` and ``test`` only; the experiment's own settings come first in ``--help``;
    * a checkpoint that does not match the config is refused before any folder is made, and a run that fails
      before its first iteration leaves no folder behind;
    * a summary is printed when a command ends: final behaviour, where every file went, the next commands.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "test": {"model", "dataloaders", "datamodule"}}

    def add_core_arguments_to_parser(self, parser) -> None:
        # The experiment's settings first in --help, then the Trainer's.
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data,
                                        required=False)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "checkpoints", "name": "run"}},
            "trainer.max_epochs": 1,
            "trainer.accelerator": "auto",
            "trainer.devices": 1,
            "trainer.log_every_n_steps": 1,
            "trainer.num_sanity_val_steps": 0,
            "trainer.enable_progress_bar": sys.stdout.isatty(),  # else one line per iteration (callbacks.Progress)
            "trainer.plugins": [{"class_path": "lit_moral.checkpoint_io.AtomicCheckpointIO"}],
        })
        parser.link_arguments("model.run_name", "trainer.logger.init_args.name")
        # One seed drives everything: seed_everything (adapter initialisation, dropout) is also the module's seed
        # (initial states, option orders, sampling, minibatches, opponents).
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_module_seed)

    def _logger_args(self, sub: str):
        logger = self.config[sub]["trainer"].get("logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            return logger.init_args
        return None

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``; refuse a missing, damaged or mismatched checkpoint before anything is made.

        Lightning re-applies a checkpoint's saved hyperparameters over the parsed config for ``test``; the
        evaluation settings (``model.evaluation``) are this command's, so they keep the parsed value. With ``fit``
        the config is authoritative.
        """
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path == "last":
            logger = self._logger_args(sub)
            if logger is None:
                raise ConfigError("ckpt_path: 'last' needs the default TensorBoard logger (it names the run folder)")
            ckpt_path = str(latest_checkpoint(logger.save_dir, logger.name))
            self.config[sub]["ckpt_path"] = ckpt_path
        if ckpt_path:
            state = AtomicCheckpointIO().load_checkpoint(ckpt_path)  # missing or damaged: ConfigError
            if sub == "fit" and "lit_moral" in state and "fingerprint" in state["lit_moral"]:
                check_fingerprint(state["lit_moral"]["fingerprint"], self.config[sub]["model"])
        if sub == "fit":
            return
        key = f"{sub}.model.evaluation"
        parsed = self.config.get(key)
        super()._parse_ckpt_path()
        self.config[key] = parsed

    def _say_bf16(self, sub: str) -> None:
        """A warning before a run that asks for bf16 on a CPU that would only emulate it (lit_moral.hardware)."""
        cfg = self.config[sub]
        trainer, model = cfg.get("trainer") or {}, cfg.get("model") or {}
        accelerator = str(trainer.get("accelerator", "auto"))
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        advice = bf16_advice(trainer.get("precision"), str(model.get("dtype", "float32")), on_cpu)
        if advice:
            print(f"lit_moral: {advice}", file=sys.stderr, flush=True)

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        if sub in ("fit", "test", "validate"):
            self._say_bf16(sub)
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        run = run_dir_of(ckpt) if ckpt else None
        logger = self._logger_args(sub) if sub else None
        if sub == "fit" and not ckpt and logger is not None:
            refuse_occupied_run_folder(logger)
        if run is None or logger is None:
            return
        if sub == "fit":  # resume in the run's own folder: one run, one folder
            logger.save_dir, logger.name, logger.version = str(run.parent.parent), run.parent.name, run.name
        elif sub == "test":  # the evaluation goes beside the checkpoint it evaluates
            evaluation = self.config[sub]["model"].get("evaluation")
            if isinstance(evaluation, Namespace) and not evaluation.get("output_dir"):
                evaluation.output_dir = str(run / "evaluation")
            logger.save_dir, logger.name, logger.version = str(run), "evaluation", "tensorboard"

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; print the summary; on a failure before the first iteration remove the folder this run made."""
        # trainer.log_dir is a collective under DDP: read it here, on every process, before the run.
        log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        existed = log_dir is not None and log_dir.exists()
        t0 = time.time()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            started = getattr(self.model, "iteration", 0) or self.trainer.global_step
            if self.trainer.is_global_zero and log_dir is not None and not existed and not started and log_dir.exists():
                shutil.rmtree(log_dir, ignore_errors=True)
            raise
        if not self.trainer.is_global_zero:
            return
        if subcommand == "fit":
            config = log_dir / "config.yaml" if log_dir is not None and (log_dir / "config.yaml").is_file() else None
            print(fit_summary(self.model, self.trainer, time.time() - t0, config, log_dir), flush=True)
        elif getattr(self.model, "last_evaluation", None):
            out, meta, summary = self.model.last_evaluation
            print(test_summary(out, meta, summary), flush=True)


def refuse_occupied_run_folder(logger) -> None:
    """A new ``fit`` with an explicit ``trainer.logger.init_args.version`` whose folder already holds a run's
    checkpoints is refused (ConfigError) before anything is written: it would replace that run's ``config.yaml``
    and mix two runs' checkpoints and logs in one folder. Resuming (``--ckpt_path``) is the way back into a folder."""
    version = logger.get("version")
    if version is None:
        return  # Lightning picks the next free version_N
    folder = Path(TensorBoardLogger(str(logger.save_dir), str(logger.name), version=version).log_dir)  # makes nothing
    held = sorted(folder.glob("checkpoints/*.ckpt"))
    if held:
        last = folder / "checkpoints" / "last.ckpt"
        raise ConfigError(f"trainer.logger.init_args.version: run folder '{folder}' already holds a run "
                          f"({len(held)} checkpoint(s)); resume it with --ckpt_path {last if last.is_file() else held[-1]}, "
                          "choose another version, or leave version unset for the next version_N")


def check_fingerprint(theirs: dict, model_cfg) -> None:
    """Refuse (ConfigError naming ``ckpt_path``) a checkpoint from another base model, agent set, LoRA rank or
    action mode than the parsed ``model`` config: checked before any folder is made or model loaded."""
    lora = model_cfg.get("lora")
    agents = model_cfg.get("agents") or [{"name": "agent_0"}]
    mine = {"model": model_cfg.get("model"),
            "agents": [a.get("name") if hasattr(a, "get") else getattr(a, "name", None) for a in agents],
            "lora_r": lora.get("r") if hasattr(lora, "get") else getattr(lora, "r", 8) if lora else 8,
            "action_mode": model_cfg.get("action_mode")}
    diff = [f"{k}: checkpoint has {theirs.get(k)!r}, config has {v!r}" for k, v in mine.items()
            if k in theirs and theirs.get(k) != v]
    if diff:
        raise ConfigError("ckpt_path: checkpoint does not match this run (" + "; ".join(diff) + ")")


# Commands beside Lightning's (fit, test): each trains its own LightningModule with ``fit``'s options.
MODULES = {"warmup": ("lit_moral.warmup", "FormatWarmup"), "dpo": ("lit_moral.preference", "DPO"),
           "reward-model": ("lit_moral.preference", "RewardModel")}


def _module_for(argv: list[str], run: bool = True) -> tuple[type, list[str]]:
    """The LightningModule a command line trains and the arguments for LightningCLI (``fit`` with them when run)."""
    if argv and argv[0] in MODULES:
        import importlib

        mod, name = MODULES[argv[0]]
        return getattr(importlib.import_module(mod), name), (["fit"] if run else []) + argv[1:]
    return MoralPPO, argv


COMMANDS = """commands (python -m lit_moral <command> --help for each):
  fit            train agents with PPO or a critic-free learner (MoralPPO)
  test           evaluate a checkpoint: games x prompt variants x opponents, beside the base model
  warmup         the supervised format warm-up for free generation
  dpo            DPO on moral preference pairs
  reward-model   a Bradley-Terry reward model on the pairs (then fit with reward: {learned: <ckpt>})
  evaluate       several checkpoints of one condition together, CIs over runs
  play           play against a trained agent in the terminal"""


def _parser_kwargs(module: type) -> dict:
    """Short usage lines and descriptions: the experiment's own settings are the ``--model.*`` group."""
    what = (module.__doc__ or "").strip().splitlines()[0]
    usage = "python -m lit_moral {} --config CONFIG [--model.<field> VALUE] [--trainer.<field> VALUE] ..."
    return {"description": "lit_moral: moral alignment of LLM agents with reinforcement learning.",
            "epilog": COMMANDS, "formatter_class": LitMoralHelpFormatter,
            "fit": {"usage": usage.format("warmup" if module is not MoralPPO else "fit"),
                    "description": f"Train: {what} Settings: --model.* (the experiment), then --trainer.*."},
            "test": {"usage": usage.format("test").replace("--config CONFIG", "--config CONFIG --ckpt_path CKPT"),
                     "description": "Evaluate a checkpoint (model.evaluation: games, opponents, prompt variants)."}}


def cli_main(args: list[str] | None = None, run: bool = True) -> LitMoralCLI | None:
    """Entry point of ``lit-moral`` and ``python -m lit_moral``; ``args`` lets tests pass a list.

    ``fit`` / ``test`` run MoralPPO (PPO on game and moral rewards); ``warmup`` runs the supervised format
    warm-up (:class:`lit_moral.warmup.FormatWarmup`) with the same options as ``fit``.
    """
    module, argv = _module_for(list(sys.argv[1:] if args is None else args), run)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads the command line itself (and warns when given both)
    try:
        return LitMoralCLI(module, auto_configure_optimizers=False, args=None if args is None else argv, run=run,
                           seed_everything_default=0, save_config_kwargs={"overwrite": True},
                           parser_class=LitMoralParser, parser_kwargs=_parser_kwargs(module))
    except ConfigError as e:
        if args is not None:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
