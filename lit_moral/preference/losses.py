"""Pure preference losses: DPO and Bradley-Terry, and the KL of the two-answer choice.

Rafailov et al. 2023 (DPO), eq. 7: with whole-answer log-probs ``logp`` under the policy and ``ref`` under the
reference, the implicit reward of an answer is ``beta * (logp - ref)`` and the loss of a pair is
``-log sigmoid(r_chosen - r_rejected)``. The Bradley-Terry loss of a reward model is the same expression with
the model's scalar scores as the rewards. Accuracy counts a pair whose two rewards are equal as half right, so
a policy equal to its reference (DPO's start) scores 0.5, chance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = r_chosen - r_rejected
    return {"loss": -F.logsigmoid(margin), "margin": margin,
            "accuracy": (margin > 0).float() + 0.5 * (margin == 0).float()}


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair DPO loss and statistics.

    Args:
        logp_chosen: ``[B]`` log-prob of the chosen answer (sum over its tokens) under the policy.
        logp_rejected: ``[B]`` the same for the rejected answer.
        ref_chosen: ``[B]`` log-prob of the chosen answer under the reference.
        ref_rejected: ``[B]`` the same for the rejected answer.
        beta: strength of the implicit KL constraint (larger: stays closer to the reference).

    Returns:
        ``[B]`` tensors: ``loss`` = -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), ``reward_chosen``,
        ``reward_rejected`` (the implicit rewards ``beta * (logp - ref)``), ``margin`` (their difference) and
        ``accuracy`` (1 if the chosen's implicit reward is higher, 0.5 if equal, else 0).
    """
    r_c, r_r = beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)
    return {**_pair_stats(r_c, r_r), "reward_chosen": r_c, "reward_rejected": r_r}


def bradley_terry_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair Bradley-Terry loss of a reward model: P(chosen preferred) = sigmoid(score_c - score_r).

    Args:
        score_chosen: ``[B]`` the reward model's score of the chosen answer.
        score_rejected: ``[B]`` its score of the rejected answer.

    Returns:
        ``[B]`` tensors ``loss`` = -log sigmoid(score_c - score_r), ``margin`` = score_c - score_r and ``accuracy``.
    """
    return _pair_stats(score_chosen, score_rejected)


def choice_kl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) of the choice between the candidate answers, each renormalised over them.

    This is the policy of lit_moral's constrained mode (protocol section 3), so for that mode it is the exact
    KL of the behaviour; it ignores the probability outside the candidate strings.

    Args:
        logp: ``[U, K]`` whole-answer log-probs of the K candidates after U prompts under the policy.
        ref: ``[U, K]`` the same under the reference.

    Returns:
        ``[U]`` KL per prompt (nats).
    """
    lq, lr = torch.log_softmax(logp, -1), torch.log_softmax(ref, -1)
    return (lq.exp() * (lq - lr)).sum(-1)
