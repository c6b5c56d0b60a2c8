"""The run's settings that are ours (not Lightning's): agents, and the checks made before any model loads."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lit_moral import models
from lit_moral.errors import ConfigError, check_choice, check_positive
from lit_moral.policy import BASE, LoraSpec
from lit_moral.ppo import PPOConfig
from lit_moral.prompts import validate_actions

AGENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
RESERVED = {"base", "warmup", "llm", BASE}  # names the evaluation and the pairings use


@dataclass
class AgentConfig:
    """One LLM agent.

    Attributes:
        name: the agent's name, also its LoRA adapter's name: letters, digits and ``_``, starting with a letter
            (e.g. ``agent_0``); not ``base``, ``warmup``, ``llm`` nor a fixed strategy's name.
        reward: a named reward (game, deontological, utilitarian, game_deontological, ...) or a mapping
            component -> weight, e.g. ``{game: 1.0, utilitarian: 0.5}``, or ``{learned: <reward-model checkpoint>}``
            (``python -m lit_moral reward-model``; docs/preference.md): the reward model's score as the reward.
        train: update this agent (False keeps its adapter fixed, e.g. a frozen opponent).
        opponent: this agent's opponent under ``pairing: fixed`` (a fixed strategy or ``llm``); None: the run's
            ``opponent``.
    """

    name: str = "agent_0"
    reward: str | dict[str, float | str] = "deontological"
    train: bool = True
    opponent: str | None = None


# Checkpoints store these config dataclasses in their hyperparameters; allow them under weights_only loading.
torch.serialization.add_safe_globals([AgentConfig, LoraSpec, PPOConfig])


def learned_path(reward: object) -> str | None:
    """The reward-model checkpoint of a ``reward: {learned: <path>}`` setting (the RLHF route); None otherwise."""
    if isinstance(reward, dict) and "learned" in reward:
        if set(reward) != {"learned"} or not isinstance(reward["learned"], str):
            raise ConfigError(f"reward: a learned reward is the one key 'learned' with a checkpoint path; got {reward!r}")
        return reward["learned"]
    return None


def agent_configs(agents) -> list[AgentConfig]:
    """AgentConfig objects from the ``agents`` setting (dicts or AgentConfigs; default one deontological agent)."""
    out = []
    for i, a in enumerate(agents or [AgentConfig()]):
        if isinstance(a, AgentConfig):
            out.append(a)
        elif isinstance(a, dict):
            unknown = set(a) - {"name", "reward", "train", "opponent"}
            if unknown:
                raise ConfigError(f"agents[{i}]: unknown key(s) {sorted(unknown)}; allowed: name, reward, train, opponent")
            out.append(AgentConfig(**a))
        else:
            raise ConfigError(f"agents[{i}]: expected a mapping such as {{name: agent_0, reward: game}}; got {a!r}")
    return out


def validate_agents(cfgs: list[AgentConfig], strategies) -> None:
    """Names are valid adapter names, distinct, and not reserved or a strategy's name."""
    if not cfgs:
        raise ConfigError("agents: expected at least one agent")
    names = [a.name for a in cfgs]
    for i, n in enumerate(names):
        if not isinstance(n, str) or not AGENT_NAME.match(n) or n in RESERVED or n in strategies:
            raise ConfigError(f"agents[{i}].name: got {n!r}; use letters, digits and _ (starting with a letter), "
                              f"not {', '.join(sorted(RESERVED - {BASE}))} or a strategy's name")
    if len(set(names)) != len(names):
        raise ConfigError(f"agents: names must be distinct; got {names}")


def validate_sizes(**sizes) -> None:
    """Whole numbers > 0 (``prefix_levels`` may be 0); ``lr`` a finite number > 0."""
    for name, v in sizes.items():
        check_positive(name, v, allow_zero=name == "prefix_levels")
        if name != "lr" and not isinstance(v, int):
            raise ConfigError(f"{name}: got {v!r}; must be a whole number > 0")
    if "lr" in sizes and not math.isfinite(sizes["lr"]):
        raise ConfigError(f"lr: got {sizes['lr']!r}; must be a finite number > 0")


def validate_lora(lora: LoraSpec) -> None:
    """LoRA sizes are whole numbers > 0 and dropout a probability."""
    for name in ("r", "alpha"):
        v = getattr(lora, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"lora.{name}: got {v!r}; must be a whole number > 0")
    if not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout: got {lora.dropout!r}; must be a number in [0, 1)")
    layers = getattr(lora, "layers", 0)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ConfigError(f"lora.layers: got {layers!r}; must be a whole number >= 0 (0 = every decoder layer)")


def validate_basics(model: str, dtype: str, mode: str, actions) -> None:
    models.validate_model_spec(model)
    check_choice("dtype", dtype, models.DTYPES)
    check_choice("action_mode", mode, ("constrained", "free", "reason"))
    validate_actions(actions)


def validate_sampling(mode: str, temperature, top_p) -> None:
    """Reason mode: ``temperature`` > 0 and ``top_p`` in (0, 1]; the other modes keep the paper's sampling (both 1)."""
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{name}: got {v!r}; must be a number > 0")
        if mode != "reason" and v != 1:
            raise ConfigError(f"{name}: got {v!r}; it applies to action_mode reason only (the other modes sample "
                              "at temperature 1 with the full distribution): leave it at 1 or use action_mode: reason")
    if top_p > 1:
        raise ConfigError(f"top_p: got {top_p!r}; must be in (0, 1]")
