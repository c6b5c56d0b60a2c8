"""A trained agent as a Python object: ask it for a move, or for its action probabilities, in a given state.

    from lit_moral.agent import Agent
    agent = Agent.load("checkpoints/quickstart/version_0/checkpoints/last.ckpt")   # or an adapters/<agent>/ folder
    agent.probabilities(prev_me="C", prev_other="D")   # {"C": 0.97, "D": 0.03, "legal_mass": 0.002}
    agent.move(prev_me="C", prev_other="D")            # "C"

The agent answers as lit_moral trains it: the prompt of :mod:`lit_moral.prompts` (game, payoff table, last
round's moves, the two action strings in a random order) and a choice between the two action strings by their
whole-string probabilities (``probabilities`` averages the four option orders unless ``orders`` names one).
``legal_mass`` is how much probability the model puts on the two strings at all: small for a model trained in
constrained mode, which is why plain free generation from the adapter does not follow the answer format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_moral import models
from lit_moral.errors import ConfigError, check_choice
from lit_moral.games import ACTION_NAMES, MatrixGame
from lit_moral.policy import Policy
from lit_moral.prompts import PromptRenderer, PromptStyle, prompt_id

EXPORT_INFO = "lit_moral.json"  # written beside every exported adapter: what the Agent needs to rebuild its prompt


@dataclass
class Agent:
    """One agent's adapter on its base model, with the prompt settings it was trained with.

    Attributes:
        policy: the Policy holding the adapter (named ``name``).
        tokenizer: the base model's tokenizer.
        name: the adapter name.
        style: action strings and system prompt of its training prompt.
        game: the game whose table its prompt shows.
    """

    policy: Policy
    tokenizer: object
    name: str
    style: PromptStyle
    game: MatrixGame

    @classmethod
    def load(cls, path: str, agent: str | None = None, model: str | None = None, game: str | list | None = None,
             device: str = "cpu") -> Agent:
        """From a lit_moral checkpoint (``.ckpt``) or an exported adapter folder (``<run>/adapters/<agent>/``).

        Args:
            path: the checkpoint file or adapter folder.
            agent: which agent of a checkpoint (default: its first).
            model: the base model spec (default: the one it was trained on).
            game: the game to show (default: its training game).
            device: ``cpu`` or ``cuda``.
        """
        p = Path(path).expanduser()
        info = _info_of(p)
        agent = agent or info["agents"][0]
        check_choice("agent", agent, info["agents"])
        base, tok = models.load(model or info["model"], info.get("dtype", "float32"), device)
        from lit_moral.policy import LoraSpec

        lora = info["lora"] or {}
        lora = lora if isinstance(lora, LoraSpec) else LoraSpec(**lora)
        policy = Policy(base, [agent], lora).to(device)
        if p.is_dir():
            from lit_moral.adapters import read_adapter

            policy.load_adapter_state(agent, read_adapter(str(p)))
        else:
            state = torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
            mine = {k.removeprefix("policy."): v for k, v in state.items() if f".{agent}." in k}
            policy.load_state_dict(mine, strict=False)
        policy.eval()
        style = PromptStyle(actions=tuple(info["actions"]), system_prompt=info.get("system_prompt"))
        return cls(policy, tok, agent, style, MatrixGame.from_spec(game if game is not None else info["game"]))

    def renderer(self, game: MatrixGame | None = None, actions: tuple[str, str] | None = None) -> PromptRenderer:
        style = self.style if actions is None else PromptStyle(actions=tuple(actions), system_prompt=self.style.system_prompt)
        return PromptRenderer(self.tokenizer, game or self.game, style)

    @torch.no_grad()
    def probabilities(self, prev_me: str, prev_other: str, orders: tuple[int, int] | None = None,
                      game: str | list | None = None, actions: tuple[str, str] | None = None) -> dict[str, float]:
        """P(C) and P(D) of the agent's choice after last round's ``(prev_me, prev_other)`` moves ("C"/"D"), and the
        probability it puts on the two strings at all (``legal_mass``); over the four option orders by default."""
        r = self.renderer(MatrixGame.from_spec(game) if game is not None else None, actions)
        me, other = _code("prev_me", prev_me), _code("prev_other", prev_other)
        pairs = [orders] if orders is not None else [(a, b) for a in (0, 1) for b in (0, 1)]
        pids = [int(prompt_id(torch.tensor(me), torch.tensor(other), torch.tensor(a), torch.tensor(b))) for a, b in pairs]
        seq = self.policy.candidate_logprobs([(self.name, r.token_ids[p]) for p in pids], r.action_ids)["seq_logp"]
        choice = torch.softmax(seq, -1).mean(0)
        return {"C": float(choice[0]), "D": float(choice[1]), "legal_mass": float(seq.exp().sum(-1).mean())}

    def move(self, prev_me: str, prev_other: str, sample: bool = False, generator: torch.Generator | None = None,
             **kw) -> str:
        """The agent's move ("C" or "D"): the more probable one, or a sample when ``sample``."""
        p = self.probabilities(prev_me, prev_other, **kw)
        if not sample:
            return "C" if p["C"] >= p["D"] else "D"
        return "C" if float(torch.rand((), generator=generator)) < p["C"] else "D"

    def prompt(self, prev_me: str, prev_other: str, orders: tuple[int, int] = (0, 0)) -> str:
        """The prompt text the agent sees in that state (with the chat template)."""
        pid = int(prompt_id(torch.tensor(_code("prev_me", prev_me)), torch.tensor(_code("prev_other", prev_other)),
                            torch.tensor(orders[0]), torch.tensor(orders[1])))
        return self.renderer().texts[pid]


def _code(field: str, move: str) -> int:
    check_choice(field, move, ACTION_NAMES[:2])
    return ACTION_NAMES.index(move)


def _info_of(p: Path) -> dict:
    """Model spec, agent names, LoRA settings, action strings, game and system prompt of a checkpoint or folder."""
    if p.is_dir():
        f = p / EXPORT_INFO
        if not f.is_file():
            raise ConfigError(f"path: {str(p)!r} has no {EXPORT_INFO}; expected an adapter folder exported by lit_moral "
                              "(<run>/adapters/<agent>/) or a .ckpt")
        return json.loads(f.read_text())
    if not p.is_file():
        raise ConfigError(f"path: {str(p)!r} does not exist")
    hp = torch.load(p, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    if "agents" not in hp:
        raise ConfigError(f"path: {str(p)!r} is not a lit_moral PPO checkpoint")
    agents = [a["name"] if isinstance(a, dict) else a.name for a in (hp["agents"] or [{"name": "agent_0"}])]
    return {"model": hp["model"], "dtype": hp.get("dtype", "float32"), "agents": agents, "lora": hp["lora"],
            "actions": list(hp["actions"]), "game": hp["game"], "system_prompt": hp.get("system_prompt")}


def export_info(pl_module, agent: str) -> dict:
    """What :meth:`Agent.load` needs from an exported adapter folder (written as ``lit_moral.json``)."""
    from dataclasses import asdict

    hp = pl_module.hparams
    return {"model": hp.model, "dtype": hp.get("dtype", "float32"), "agents": [agent], "lora": asdict(pl_module.lora),
            "actions": list(hp.get("actions", ("action1", "action2"))), "game": hp.get("game", "IPD"),
            "system_prompt": hp.get("system_prompt")}
