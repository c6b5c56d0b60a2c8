"""A reward model learnt from preference pairs, and :class:`LearnedReward`: that model as a reward for RL.

Protocol section 11, stage (3): its own LoRA adapter (``reward_model``) and a scalar head (a
:class:`~lit_moral.policy.ValueHead`: dropout + linear, zero at the start) on the same frozen base. The score
of an answer after a prompt is the head on the hidden state of the answer's last token (the RL prompt, then the
answer string's tokens); training minimises the Bradley-Terry loss ``-log sigmoid(score_c - score_r)``
(:func:`lit_moral.preference.losses.bradley_terry_loss`) on the pairs of :mod:`lit_moral.preference.pairs`.

Run it with ``python -m lit_moral reward-model --config configs/reward_model_deontological.yaml``: it writes
``<run>/checkpoints/last.ckpt`` (the adapter's LoRA weights and the head) and ``<run>/pairs.jsonl``. TensorBoard,
every step: ``rm/loss/reward_model``, ``rm/accuracy/reward_model`` (share of pairs scored chosen > rejected;
equal counts 1/2), ``rm/margin/reward_model`` (score of chosen minus rejected), ``rm/score_chosen/reward_model``,
``rm/score_rejected/reward_model``; the same over all training pairs at step 0 and after every epoch:
``pairs/<name>/reward_model``.

Stage (4), RL against it: ``LearnedReward.load(<checkpoint>, policy=<the PPO run's Policy>)`` adds the reward
model's adapter, frozen, to the PPO run's base model (one copy of the base) and :meth:`LearnedReward.rewards`
scores a rollout's ``(prompt id, action)`` samples; see ``docs/preference.md`` for where MoralPPO calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lit_moral import models
from lit_moral.errors import ConfigError
from lit_moral.games import ILLEGAL
from lit_moral.policy import LoraSpec, Policy, ValueHead
from lit_moral.preference.losses import bradley_terry_loss
from lit_moral.preference.pairs import PairConfig, write_pairs
from lit_moral.preference.training import PairTrainer

ADAPTER = "reward_model"


def score_answers(policy: Policy, adapter: str, head: ValueHead, prompts: Sequence[Sequence[int]],
                  answers: Sequence[Sequence[int]]) -> torch.Tensor:
    """Reward-model scores of answers after prompts (with gradient if enabled).

    Args:
        policy: the Policy holding the reward model's adapter ``adapter``.
        adapter: the adapter name.
        head: the scalar head.
        prompts: ``N`` prompt token lists (repeats are run once).
        answers: ``N`` answer token lists (each at least one token).

    Returns:
        ``[N]`` float32: the head on the hidden state of each answer's last token.
    """
    uniq: dict[tuple[int, ...], int] = {}
    for p in prompts:
        uniq.setdefault(tuple(p), len(uniq))
    conts = [(uniq[tuple(p)], list(a)) for p, a in zip(prompts, answers)]
    tree = policy.forward_tree([(adapter, list(p)) for p in uniq], conts)
    last = tree.cont[torch.arange(len(conts), device=tree.cont.device), tree.cont_len - 1]
    return head(last)


class RewardModel(PairTrainer):
    """A LoRA adapter and a scalar head on the frozen base, trained with the Bradley-Terry loss on preference pairs.

    Args:
        model: model spec (as MoralPPO's; the RL run that uses the reward model must use the same base).
        dtype: weights dtype.
        game: the game of the labeller's pairs (unless ``pairs.games``).
        actions: the two action strings, C first (the labeller's pairs use them; a file's pairs carry their own).
        lora: the reward model's LoRA settings (need not match the RL agents').
        head_dropout: dropout before the scalar head during training.
        lr: Adam learning rate.
        pairs: where the pairs come from: the moral labeller (reward, opponent model, ties, noise, budget) or a file.
        batch_size: pairs per optimizer step; an epoch is one pass over the pairs.
        seed: seed of the labeller's and the batch order's streams (the CLI links it to ``seed_everything``).
        run_name: name used for the checkpoint folder.
        system_prompt: as MoralPPO's (None: no system turn).
    """

    kind = "reward_model"
    section = "rm"
    adapter = ADAPTER
    saves_head = True

    def __init__(self, model: str = models.SMOLLM2, dtype: str = "float32", game: str | list = "IPD",
                 actions: tuple[str, str] = ("action1", "action2"),
                 lora: LoraSpec = LoraSpec(),  # noqa: B008 - frozen: safe, and jsonargparse documents its fields
                 head_dropout: float = 0.0, lr: float = 1e-4,
                 pairs: PairConfig = PairConfig(),  # noqa: B008 - frozen, as lora
                 batch_size: int = 32, seed: int | None = 0, run_name: str = "reward_model",
                 system_prompt: str | None = None) -> None:
        super().__init__()
        seed = self.resolve_seed(seed)
        self.save_hyperparameters()
        if isinstance(head_dropout, bool) or not isinstance(head_dropout, (int, float)) or not 0 <= head_dropout < 1:
            raise ConfigError(f"head_dropout: got {head_dropout!r}; must be a number in [0, 1)")
        self._setup(model=model, dtype=dtype, lora=lora, game=game, actions=actions, system_prompt=system_prompt,
                    pairs=pairs, batch_size=batch_size, lr=lr, seed=seed)

    def build_policy(self, base) -> Policy:
        return Policy(base, [self.adapter], self.lora, value_dropout=self.hparams.head_dropout)

    def configure_optimizers(self):
        return torch.optim.Adam([p for _, p in self.policy.agent_parameters(self.adapter)], lr=self.lr)

    def answer_values(self, rows: list[int]) -> torch.Tensor:
        """``[len(rows), 2]`` scores of C's and D's answer after each prompt row (with gradient if enabled)."""
        prompts, conts = self.answer_inputs(rows)
        scores = score_answers(self.policy, self.adapter, self.policy.value_heads[self.adapter],
                               [prompts[i][1] for i, _ in conts], [a for _, a in conts])
        return scores.view(len(rows), 2)

    def pair_stats(self, idx: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[b]`` Bradley-Terry loss, margin, accuracy and the two scores of pairs ``idx``, from the scores
        ``values [U, 2]`` of the prompt rows ``rows [U]``."""
        sc, sr, _ = self.gather_pairs(idx, values, rows)
        return {**bradley_terry_loss(sc, sr), "score_chosen": sc, "score_rejected": sr}

    def checkpoint_section(self) -> dict:
        # No agents and no action mode: a reward model is not an agent, so ``fit`` and ``dpo`` (whose configs have an
        # action mode) refuse its checkpoint as ``ckpt_path`` before any folder is made (cli.check_fingerprint).
        fingerprint = {"model": self.hparams.model, "lora_r": self.lora.r, "action_mode": None}
        return {**super().checkpoint_section(), "fingerprint": fingerprint}

    def on_fit_start(self) -> None:
        run = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        if run is not None and self.trainer.is_global_zero:
            write_pairs(self.pairs, run / "pairs.jsonl")

    def configure_callbacks(self):
        from lit_moral.callbacks import Progress

        have = self.trainer.callbacks if self._trainer is not None else []
        return [] if any(isinstance(c, Progress) for c in have) else [Progress()]


class LearnedReward:
    """A trained reward model as the reward of RL samples: one score per distinct (prompt, answer), memoised.

    The reward model is frozen, so a (prompt tokens, answer tokens) score never changes: it is computed once, in
    eval mode and without gradient, and kept for the whole run (at most 2 x 32 entries per game and action strings).

    Args:
        policy: the Policy holding the reward model's adapter (the RL run's, or its own).
        head: the scalar head (not a module of ``policy``: never trained, never in the RL checkpoints).
        adapter: the reward model's adapter name in ``policy``.
        center: subtract the mean of the two actions' scores after each prompt: Bradley-Terry fixes only score
            differences within a prompt, and this makes the reward 0 for a uniform choice in every state.
        illegal_penalty: the reward of an ILLEGAL action (as every intrinsic reward: protocol section 3, -6).
        info: the reward model's hyperparameters (model, lora, game, actions, system_prompt, ...).
    """

    def __init__(self, policy: Policy, head: ValueHead, adapter: str = ADAPTER, center: bool = True,
                 illegal_penalty: float = -6.0, info: dict | None = None) -> None:
        self.policy, self.head, self.adapter = policy, head.eval(), adapter
        self.center, self.illegal_penalty, self.info = center, float(illegal_penalty), dict(info or {})
        self._memo: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}

    @classmethod
    def load(cls, path: str, policy: Policy | None = None, *, model: str | None = None,
             actions: Sequence[str] | None = None, center: bool = True, illegal_penalty: float = -6.0,
             device: str | torch.device = "cpu", field: str = "reward.learned") -> LearnedReward:
        """From a reward-model checkpoint (``python -m lit_moral reward-model``).

        Args:
            path: the checkpoint file.
            policy: the RL run's Policy: the reward model's adapter is added to it, frozen (one base model in memory);
                None: load the reward model's own base.
            model: the RL run's model spec, checked against the reward model's.
            actions: the RL run's action strings, checked against the reward model's.
            center: see the class.
            illegal_penalty: see the class.
            device: where its own base goes (``policy=None``).
            field: the config field named in errors.

        Raises:
            ConfigError: naming ``field``: no such file, not a reward-model checkpoint, or another base model or
                action strings than the RL run's.
        """
        state, hp = _read_checkpoint(path, field)
        _check_compatible(hp, model, actions, field)
        lora = hp["lora"] if isinstance(hp["lora"], LoraSpec) else LoraSpec(**hp["lora"])
        weights = {k.removeprefix("policy."): v for k, v in state["state_dict"].items()}
        if policy is None:
            base, _ = models.load(hp["model"], hp.get("dtype", "float32"), device)
            policy = Policy(base, [ADAPTER], lora).to(device)
        _load_frozen(policy, lora, weights, field)
        prefix = f"value_heads.{ADAPTER}."
        head = ValueHead(weights[f"{prefix}linear.weight"].shape[1])
        head.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
        policy.eval()
        return cls(policy, head.to(policy.lm_head.weight.device), ADAPTER, center, illegal_penalty, hp)

    @torch.no_grad()
    def scores(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[N]`` scores (CPU, float32) of ``answers[i]`` after ``prompts[i]`` (token ids); only unseen pairs are run,
        in one eval-mode forward (the policy's train/eval mode is restored)."""
        keys = [(tuple(p), tuple(a)) for p, a in zip(prompts, answers)]
        missing = sorted({k for k in keys if k not in self._memo})
        if missing:
            was = self.policy.training
            self.policy.eval()  # peft's per-row adapter hooks (and no dropout) without touching the active adapter
            try:
                s = score_answers(self.policy, self.adapter, self.head, [p for p, _ in missing], [a for _, a in missing])
            finally:
                self.policy.train(was)
            self._memo.update(zip(missing, s.float().cpu().tolist()))
        return torch.tensor([self._memo[k] for k in keys], dtype=torch.float32)

    def rewards(self, prompt_table: Sequence[Sequence[int]], action_ids: Sequence[Sequence[int]], pid: torch.Tensor,
                action: torch.Tensor) -> torch.Tensor:
        """The reward of each RL sample.

        Args:
            prompt_table: prompt token ids by prompt id (``PromptRenderer.token_ids``).
            action_ids: the two action strings' token ids, C first (``PromptRenderer.action_ids``).
            pid: ``[B]`` each sample's prompt id.
            action: ``[B]`` each sample's action code (C, D or ILLEGAL).

        Returns:
            ``[B]`` float32 (CPU): the score of the action string after the prompt (centred per prompt if ``center``),
            ``illegal_penalty`` for ILLEGAL.
        """
        pids = sorted(set(pid.tolist()))
        s = self.scores([prompt_table[p] for p in pids for _ in (0, 1)],
                        [action_ids[a] for _ in pids for a in (0, 1)]).view(len(pids), 2)
        if self.center:
            s = s - s.mean(-1, keepdim=True)
        where = torch.tensor([pids.index(p) for p in pid.tolist()], dtype=torch.long)
        act = action.cpu().long()
        chosen = s[where, act.clamp(max=1)]
        return torch.where(act == ILLEGAL, torch.full_like(chosen, self.illegal_penalty), chosen)


def learned_rewards(learned: LearnedReward, renderer, samples) -> torch.Tensor:
    """``[N]`` the learned reward of a rollout's samples (:class:`lit_moral.rollout.AgentSamples`): the call MoralPPO
    makes per agent after ``play``, in place of the intrinsic ``samples.reward``."""
    return learned.rewards(renderer.token_ids, renderer.action_ids, samples.pid, samples.action)


def check_learned(path: str, model: str | None = None, actions: Sequence[str] | None = None,
                  field: str = "reward.learned") -> dict:
    """Check a reward-model checkpoint for an RL run without loading any model (call it in the RL module's
    ``__init__``): it exists, is a reward model's, and was trained on ``model`` with ``actions``.

    Returns:
        The reward model's hyperparameters (model, dtype, lora, game, actions, system_prompt, ...).

    Raises:
        ConfigError: naming ``field``.
    """
    _, hp = _read_checkpoint(path, field)
    _check_compatible(hp, model, actions, field)
    return hp


def _check_compatible(hp: dict, model: str | None, actions: Sequence[str] | None, field: str) -> None:
    if model is not None and model != hp["model"]:
        raise ConfigError(f"{field}: the reward model was trained on model {hp['model']!r}, the run uses {model!r}")
    if actions is not None and tuple(actions) != tuple(hp["actions"]):
        raise ConfigError(f"{field}: the reward model ranks the action strings {list(hp['actions'])}, the run shows "
                          f"{list(actions)}")


def _read_checkpoint(path: str, field: str) -> tuple[dict, dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{field}: {str(p)!r} does not exist or is not a file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
        raise ConfigError(f"{field}: {str(p)!r} is not a readable checkpoint ({type(e).__name__})") from None
    kind = state.get("lit_moral", {}).get("kind") if isinstance(state, dict) else None
    if kind != "reward_model":
        raise ConfigError(f"{field}: {str(p)!r} is {'a ' + repr(kind) if kind else 'not a lit_moral'} checkpoint, not a "
                          "reward model's (made by python -m lit_moral reward-model)")
    return state, state.get("hyper_parameters", {})


def _load_frozen(policy: Policy, lora: LoraSpec, weights: dict[str, torch.Tensor], field: str) -> None:
    """Load the reward model's adapter into ``policy`` (added with its own LoRA settings if ``policy`` lacks it) and
    freeze it; every LoRA tensor of the adapter must be in ``weights``."""
    from peft import LoraConfig

    if ADAPTER not in policy.model.peft_config:
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                         bias="none", task_type="CAUSAL_LM")
        policy.model.add_adapter(ADAPTER, cfg)
    result = policy.load_state_dict({k: v for k, v in weights.items() if "lora_" in k}, strict=False)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{ADAPTER}." in k]
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or missing)[0]
        raise ConfigError(f"{field}: the reward model's adapter does not fit this base model (e.g. {bad})")
    for n, p in policy.model.named_parameters():
        if f".{ADAPTER}." in n:
            p.requires_grad_(False)
