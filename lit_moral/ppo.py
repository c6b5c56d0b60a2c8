"""Pure PPO math (the TRL-legacy PPOTrainer the paper used, protocol section 6).

Shapes: ``N`` samples (one agent-move each), ``T`` response steps (tokens in ``free`` mode, one
decision in ``constrained`` mode); ``mask [N, T]`` marks real steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lit_moral.errors import ConfigError, check_choice, check_positive


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (defaults: the paper's, section 6).

    Attributes:
        ppo_epochs: passes over each iteration's samples.
        minibatches: minibatches per epoch (samples are shuffled into this many groups).
        clip_range: policy ratio clip.
        clip_range_value: value clip around the rollout values.
        vf_coef: value-loss weight.
        ent_coef: entropy bonus weight (0 in the paper).
        gamma: GAE discount over response steps.
        lam: GAE lambda.
        kl_penalty: ``adaptive`` (Ziegler et al., as in the paper) or ``fixed`` coefficient.
        init_kl_coef: initial KL coefficient.
        target_kl: adaptive controller target (sum over response tokens).
        kl_horizon: adaptive controller horizon.
        normalize_rewards: divide scores by the running std and subtract the running mean (paper: on).
        whiten_advantages: whiten advantages over the batch (paper: on).
        max_grad_norm: gradient clipping norm; 0 disables (paper: none).
        paper_compat: reproduce the original's effective update: one optimizer step per iteration
            averaging the gradients of all ``ppo_epochs`` x ``minibatches`` passes.
    """

    ppo_epochs: int = 4
    minibatches: int = 1
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_penalty: str = "adaptive"
    init_kl_coef: float = 0.2
    target_kl: float = 6.0
    kl_horizon: float = 10000.0
    normalize_rewards: bool = True
    whiten_advantages: bool = True
    max_grad_norm: float = 0.0
    paper_compat: bool = False

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "minibatches", "kl_horizon"):
            check_positive(f"ppo.{name}", getattr(self, name))
        for name in ("clip_range", "clip_range_value", "vf_coef", "ent_coef", "gamma", "lam", "init_kl_coef",
                     "target_kl", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"ppo.{name}: got {v!r}; must be a finite number >= 0")
        check_choice("ppo.kl_penalty", self.kl_penalty, ("adaptive", "fixed"))


class KLController:
    """KL coefficient, fixed or adaptive (Ziegler et al. 2019; TRL ``AdaptiveKLController``)."""

    def __init__(self, init: float, target: float | None = None, horizon: float = 10000.0) -> None:
        self.value = float(init)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt towards ``target`` given the batch's mean summed KL over ``n_steps`` samples."""
        if self.target is None:
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std of scalar scores (TRL ``RunningMoments``, Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        delta = b_mean - self.mean
        tot = self.count + n
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / tot
        self.mean += delta * n / tot
        self.var = m2 / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1)) if self.count > 1 else 1.0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / max(self.std, 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if n > 1:
        var = var * n / (n - 1)  # unbiased, as TRL
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step rewards: ``-kl_coef * (logp - ref_logp)`` everywhere, plus the score at the last real step.

    Args:
        scores: ``[N]`` (normalised) game/moral rewards.
        logp, ref_logp, mask: ``[N, T]``.

    Returns:
        ``(rewards [N, T], kl [N, T])``.
    """
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.long().sum(1) - 1).clamp_min(0)
    rewards = rewards.clone()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response steps.

    Returns:
        ``(advantages [N, T], returns [N, T])``; ``returns = advantages + values``.
    """
    values = values * mask
    rewards = rewards * mask
    n, t = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    for k in reversed(range(t)):
        nxt = values[:, k + 1] if k + 1 < t else torch.zeros_like(last)
        delta = rewards[:, k] + gamma * nxt - values[:, k]
        last = delta + gamma * lam * last
        adv[:, k] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, vpred: torch.Tensor, old_values: torch.Tensor,
             returns: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, cfg: PPOConfig,
             entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + ``vf_coef`` x clipped value loss (- ``ent_coef`` x entropy), masked means.

    Returns:
        ``(loss, stats)``; stats: ``policy``, ``value``, ``entropy``, ``approx_kl``, ``clipfrac``,
        ``value_clipfrac``, ``ratio`` (detached scalars).
    """
    vclip = old_values + (vpred - old_values).clamp(-cfg.clip_range_value, cfg.clip_range_value)
    vf1 = (vpred - returns) ** 2
    vf2 = (vclip - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)
    pg_loss, pg = policy_loss(logp, old_logp, adv, mask, cfg.clip_range)
    loss = pg_loss + cfg.vf_coef * vf_loss
    ent = masked_mean(entropy, mask) if entropy is not None else torch.zeros((), device=logp.device)
    if cfg.ent_coef:
        loss = loss - cfg.ent_coef * ent
    stats = {
        "policy": pg_loss.detach(),
        "value": vf_loss.detach(),
        "entropy": ent.detach(),
        "approx_kl": pg["approx_kl"],
        "clipfrac": pg["clipfrac"],
        "value_clipfrac": masked_mean((vf2 > vf1).float().detach(), mask),
        "ratio": pg["ratio"],
    }
    return loss, stats


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip_range: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy part of :func:`ppo_loss`: ``-adv x ratio``, clipped as PPO, masked mean over steps.

    With ``clip_range=None`` the ratio is not clipped (importance-weighted REINFORCE: at ratio 1, the first
    pass of an iteration, its gradient is the plain ``-adv x grad logp``).

    Args:
        logp, old_logp: ``[N, T]`` log-probs of the sampled steps now and at rollout.
        adv: ``[N, T]`` advantages. mask: ``[N, T]`` real steps.
        clip_range: PPO's ratio clip, or None.

    Returns:
        ``(loss, stats)``; stats: ``approx_kl``, ``clipfrac``, ``ratio`` (detached scalars).
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = pg1 if clip_range is None else -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    stats = {
        "approx_kl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "clipfrac": masked_mean((pg2 > pg1).float().detach(), mask),
        "ratio": masked_mean(ratio.detach(), mask),
    }
    return loss, stats


def critic_free_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                     clip_range: float | None, ent_coef: float = 0.0,
                     entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`policy_loss` (- ``ent_coef`` x entropy): the loss of the learners without a value head.

    Shapes as :func:`policy_loss`; ``entropy [N, T]`` optional.

    Returns:
        ``(loss, stats)``; stats: ``policy``, ``entropy``, ``approx_kl``, ``clipfrac``, ``ratio``.
    """
    pg_loss, pg = policy_loss(logp, old_logp, adv, mask, clip_range)
    ent = masked_mean(entropy, mask) if entropy is not None else torch.zeros((), device=logp.device)
    loss = pg_loss - ent_coef * ent if ent_coef else pg_loss
    return loss, {"policy": pg_loss.detach(), "entropy": ent.detach(), **pg}


def sequence_returns(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                     kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level returns: :func:`kl_rewards` summed over steps, ``score - kl_coef x sum_t (logp - ref_logp)``.

    The KL penalty stays in the reward, as PPO's, so the same controller sets its coefficient.

    Args:
        scores: ``[N]`` (normalised) rewards. logp, ref_logp, mask: ``[N, T]`` rollout log-probs.

    Returns:
        ``(returns [N], kl [N, T])``.
    """
    rewards, kl = kl_rewards(scores, logp, ref_logp, mask, kl_coef)
    return rewards.sum(1), kl  # kl_rewards is 0 off the mask


def group_stats(x: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of ``x`` over the group of each sample; a group is the samples with identical ``keys`` rows.

    Computed in float64, so the estimators below are exact on hand-computed groups.

    Args:
        x: ``[N]`` values (returns). keys: ``[N, K]`` integer group key of each sample, e.g. ``(pid, seat)``;
            samples that must never share a baseline (other agents, other seats) must differ in some column.

    Returns:
        Per sample, ``[N]`` each: ``count`` (group size), ``sum``, ``mean``, ``std`` (unbiased; 0 for a group of
        one), ``flat`` (True where the group has one sample or all its values are equal).
    """
    _, gid = torch.unique(keys if keys.dim() == 2 else keys[:, None], dim=0, return_inverse=True)
    g = int(gid.max()) + 1 if len(x) else 0
    v = x.double()
    count = torch.bincount(gid, minlength=g).double()
    total = torch.zeros(g, dtype=v.dtype, device=v.device).index_add_(0, gid, v)
    mean = total / count
    sq = torch.zeros_like(total).index_add_(0, gid, (v - mean[gid]) ** 2)
    std = (sq / (count - 1).clamp_min(1)).sqrt()
    hi = torch.full_like(total, -math.inf).scatter_reduce(0, gid, v, "amax")
    lo = torch.full_like(total, math.inf).scatter_reduce(0, gid, v, "amin")
    flat = (count < 2) | (hi == lo)
    return {"count": count[gid], "sum": total[gid], "mean": mean[gid], "std": std[gid], "flat": flat[gid]}


def rloo_advantages(returns: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): ``r_i - mean of the others in i's group``.

    A group of one has no other sample, and a group whose returns are all equal carries no comparison: both
    get advantage exactly 0 (no gradient from them).

    Args:
        returns: ``[N]``. keys: ``[N, K]`` group keys (see :func:`group_stats`).

    Returns:
        ``(adv [N], baseline [N])`` in ``returns``' dtype; the baseline of a flat group's sample is its return.
    """
    st = group_stats(returns, keys)
    r = returns.double()
    base = torch.where(st["flat"], r, (st["sum"] - r) / (st["count"] - 1).clamp_min(1))
    adv = torch.where(st["flat"], torch.zeros_like(r), r - base)
    return adv.to(returns.dtype), base.to(returns.dtype)


def grpo_advantages(returns: torch.Tensor, keys: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages (Shao et al. 2024, GRPO): ``(r_i - group mean) / (group std + eps)``.

    ``std`` is the unbiased group std (as TRL's GRPOTrainer) and ``eps`` keeps a near-flat group finite. A group of
    one (no std) and a group whose returns are all equal (std 0) get advantage exactly 0.

    Args:
        returns: ``[N]``. keys: ``[N, K]`` group keys (see :func:`group_stats`). eps: added to the std.

    Returns:
        ``(adv [N], baseline [N])`` in ``returns``' dtype; the baseline is the group mean.
    """
    st = group_stats(returns, keys)
    adv = torch.where(st["flat"], torch.zeros_like(st["mean"]), (returns.double() - st["mean"]) / (st["std"] + eps))
    return adv.to(returns.dtype), st["mean"].to(returns.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked entries."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1.0 - var_d / var_r.clamp_min(1e-8)
