"""Adapter files: reading a saved LoRA adapter (peft folder or lit_moral checkpoint) to start an agent from.

``fit`` can start every agent from a saved adapter (``model.init_adapter``), e.g. the format warm-up's
(``python -m lit_moral warmup``): a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
every run exports under ``adapters/<agent>/``) or a lit_moral checkpoint (``.ckpt``, its first agent's LoRA
weights). The adapter's LoRA settings must match the run's, which is checked before any model is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lit_moral.errors import ConfigError

_CKPT_KEY = re.compile(r"^policy\.model\.(.*)\.(lora_[AB])\.([^.]+)\.weight$")


def _targets(value) -> set[str] | str:
    return value if isinstance(value, str) else set(value)


def check_adapter(path: str, lora, field: str = "init_adapter") -> None:
    """Refuse (ConfigError naming ``field``) a path that is not an adapter folder or checkpoint, or an adapter whose
    LoRA rank, alpha or target modules differ from ``lora`` (a LoraSpec). Reads only small files."""
    p = Path(path).expanduser()
    if p.is_dir():
        cfg_file = p / "adapter_config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{field}: {str(p)!r} has no adapter_config.json; expected a peft adapter folder "
                              "(e.g. <run>/adapters/agent_0) or a lit_moral .ckpt")
        cfg = json.loads(cfg_file.read_text())
        theirs = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha")}
        targets = cfg.get("target_modules")
        mine_targets = _targets(lora.target_modules)
        if mine_targets != "all-linear" and targets is not None and set(targets) != mine_targets:
            raise ConfigError(f"{field}: the adapter adapts {sorted(targets)}, the run's lora.target_modules is "
                              f"{sorted(mine_targets)}")
    elif p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=False)
        hp = state.get("hyper_parameters", {}) if isinstance(state, dict) else {}
        spec = hp.get("lora")
        if spec is None:
            raise ConfigError(f"{field}: {str(p)!r} is not a lit_moral checkpoint (no LoRA settings inside)")
        get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
        theirs = {"r": get("r", None), "alpha": get("alpha", None)}
    else:
        raise ConfigError(f"{field}: {str(p)!r} does not exist")
    for key, name in (("r", "r"), ("alpha", "alpha")):
        if theirs[key] is not None and theirs[key] != getattr(lora, name):
            raise ConfigError(f"{field}: the adapter has lora.{name} = {theirs[key]}, the run has lora.{name} = "
                              f"{getattr(lora, name)}; set the run's lora to the adapter's")


def read_adapter(path: str) -> dict[str, torch.Tensor]:
    """LoRA weights in peft's saved format (keys without the adapter name) from a folder or a checkpoint."""
    p = Path(path).expanduser()
    if p.is_dir():
        from safetensors.torch import load_file

        f = p / "adapter_model.safetensors"
        return load_file(str(f)) if f.is_file() else torch.load(p / "adapter_model.bin", map_location="cpu")
    state = torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
    agents = sorted({m.group(3) for k in state if (m := _CKPT_KEY.match(k))})
    if not agents:
        raise ConfigError(f"init_adapter: {str(p)!r} holds no LoRA weights")
    first = agents[0]
    return {f"{m.group(1)}.{m.group(2)}.weight": v for k, v in state.items()
            if (m := _CKPT_KEY.match(k)) and m.group(3) == first}


def finish_export(folder: Path, model_spec: str, card: str) -> None:
    """Make an exported peft folder portable: the base model by its portable name (not this machine's cache
    path) in ``adapter_config.json``, and ``README.md`` replaced by ``card`` (peft writes an empty template)."""
    from lit_moral.models import portable_name

    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = portable_name(model_spec)
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(card)


def model_card(agent: str, model_spec: str, facts: dict[str, object], metrics: dict[str, float]) -> str:
    """A model card for one exported agent: what it is, how it was trained, its last metrics, how to use it."""
    from lit_moral.models import portable_name

    base = portable_name(model_spec)
    lines = [f"# lit_moral agent `{agent}`", "",
             f"A LoRA adapter for **{base}** (lit_moral model spec `{model_spec}`), trained with lit_moral "
             "(moral alignment of LLM agents with reinforcement learning on matrix games).", "", "## Training", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    if metrics:
        lines += ["", "## Last logged metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k.replace('|', chr(92) + '|')}` | {v:.4g} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Use it", "",
              "It is an agent under lit_moral's answer format: the prompt of `lit_moral.prompts` (a game, its payoff "
              "table, last round's moves) and a choice between the two action strings. Free generation from plain "
              "peft does not follow that format for a small model; ask lit_moral for its move or its action "
              "probabilities instead:", "", "```python",
              "from lit_moral.agent import Agent", "",
              f'agent = Agent.load("{agent}-folder-or-checkpoint")  # this folder, or the run\'s .ckpt',
              'agent.probabilities(prev_me="C", prev_other="D")   # {"C": ..., "D": ...}',
              'agent.move(prev_me="C", prev_other="D")            # "C" or "D"', "```", "",
              "or play against it in a terminal: `python -m lit_moral play --ckpt <this folder>`.", "",
              "With plain peft (the weights only):", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this folder>")',
              "```", ""]
    return "\n".join(lines)
