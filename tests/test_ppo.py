"""PPO math with hand-computed values (protocol section 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.ppo import (
    KLController,
    PPOConfig,
    RunningMoments,
    critic_free_loss,
    explained_variance,
    gae,
    kl_rewards,
    masked_mean,
    policy_loss,
    ppo_loss,
    sequence_returns,
    whiten,
)

F64 = torch.float64


def _t(x):
    return torch.tensor(x, dtype=F64)


def _close(actual, want, atol):
    torch.testing.assert_close(actual.detach(), _t(want), atol=atol, rtol=0.0)


# ---------------------------------------------------------------- config


def test_ppo_config_paper_defaults():
    cfg = PPOConfig()
    assert (cfg.ppo_epochs, cfg.clip_range, cfg.clip_range_value, cfg.vf_coef) == (4, 0.2, 0.2, 0.1)
    assert (cfg.gamma, cfg.lam, cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) == (1.0, 0.95, 0.2, 6.0, 10000.0)
    assert cfg.kl_penalty == "adaptive"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"clip_range": -0.1}, "ppo.clip_range"),
        ({"clip_range_value": -1.0}, "ppo.clip_range_value"),
        ({"vf_coef": float("nan")}, "ppo.vf_coef"),
        ({"lam": float("inf")}, "ppo.lam"),
        ({"ppo_epochs": 0}, "ppo.ppo_epochs"),
        ({"minibatches": -2}, "ppo.minibatches"),
        ({"kl_horizon": 0}, "ppo.kl_horizon"),
        ({"kl_penalty": "exponential"}, "ppo.kl_penalty"),
        ({"target_kl": "6"}, "ppo.target_kl"),
    ],
)
def test_ppo_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as e:
        PPOConfig(**kwargs)
    assert field in str(e.value)


def test_ppo_config_unknown_kl_penalty_lists_allowed():
    with pytest.raises(ConfigError) as e:
        PPOConfig(kl_penalty="exp")
    assert "adaptive" in str(e.value) and "fixed" in str(e.value)


# ---------------------------------------------------------------- KL rewards


def test_kl_rewards_hand_values():
    scores = _t([1.0, -2.0])
    logp = _t([[-1.0, -0.5], [-0.2, 5.0]])  # [1, 1] is padding
    ref = _t([[-1.5, -0.5], [-0.1, 0.0]])
    mask = _t([[1, 1], [1, 0]])
    rewards, kl = kl_rewards(scores, logp, ref, mask, kl_coef=0.1)
    _close(kl, [[0.5, 0.0], [-0.1, 0.0]], 1e-12)
    # -0.1 * kl everywhere; the score added at the last real step (index 1 for row 0, index 0 for row 1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 1.0], abs=1e-12)
    assert rewards[1].tolist() == pytest.approx([0.01 - 2.0, 0.0], abs=1e-12)


def test_kl_rewards_zero_coef_only_score():
    scores = _t([3.0])
    logp = _t([[-1.0, -2.0, -3.0]])
    ref = _t([[0.0, 0.0, 0.0]])
    rewards, kl = kl_rewards(scores, logp, ref, torch.ones(1, 3, dtype=F64), kl_coef=0.0)
    assert rewards.tolist() == [[0.0, 0.0, 3.0]]
    assert kl.tolist() == [[-1.0, -2.0, -3.0]]


# ---------------------------------------------------------------- GAE


def test_gae_two_steps_paper_gamma_lambda():
    rewards = _t([[0.1, 1.0]])
    values = _t([[0.5, 0.2]])
    mask = torch.ones(1, 2, dtype=F64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # step 1: delta = 1.0 + 0 - 0.2 = 0.8 -> A1 = 0.8
    # step 0: delta = 0.1 + 1 * 0.2 - 0.5 = -0.2 -> A0 = -0.2 + 0.95 * 0.8 = 0.56
    _close(adv, [[0.56, 0.8]], 1e-12)
    _close(ret, [[1.06, 1.0]], 1e-12)


def test_gae_two_steps_other_gamma_lambda():
    adv, ret = gae(_t([[0.1, 1.0]]), _t([[0.5, 0.2]]), torch.ones(1, 2, dtype=F64), gamma=0.9, lam=0.5)
    # delta1 = 0.8; delta0 = 0.1 + 0.9 * 0.2 - 0.5 = -0.22; A0 = -0.22 + 0.45 * 0.8 = 0.14
    _close(adv, [[0.14, 0.8]], 1e-12)
    _close(ret, [[0.64, 1.0]], 1e-12)


def test_gae_three_steps_and_padding():
    rewards = _t([[0.0, 0.0, 2.0], [2.0, 99.0, 99.0]])
    values = _t([[1.0, 1.0, 1.0], [0.5, 99.0, 99.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: d2 = 2 - 1 = 1; d1 = 0 + 1 - 1 = 0; d0 = 0
    #        A2 = 1, A1 = 0 + 0.95 = 0.95, A0 = 0 + 0.95 * 0.95 = 0.9025
    # row 1: padding is ignored, no bootstrap: A0 = 2 - 0.5 = 1.5
    _close(adv, [[0.9025, 0.95, 1.0], [1.5, 0.0, 0.0]], 1e-12)
    _close(ret, [[1.9025, 1.95, 2.0], [2.0, 0.0, 0.0]], 1e-12)


# ---------------------------------------------------------------- whiten / masked mean


def test_masked_mean():
    assert masked_mean(_t([[1.0, 2.0], [3.0, 100.0]]), _t([[1, 1], [1, 0]])).item() == pytest.approx(2.0)
    assert masked_mean(_t([1.0, 2.0]), _t([0, 0])).item() == 0.0


def test_whiten_hand_values():
    x = _t([[1.0, 2.0], [3.0, 100.0]])
    mask = _t([[1, 1], [1, 0]])
    # mean 2, unbiased var ((1 + 0 + 1) / 2) = 1
    out = whiten(x, mask)
    _close(out, [[-1.0, 0.0], [1.0, 0.0]], 1e-6)
    kept = whiten(x, mask, shift_mean=False)
    _close(kept, [[1.0, 2.0], [3.0, 0.0]], 1e-6)


def test_whiten_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(4, 5))
    out = whiten(_t(x), torch.ones(4, 5, dtype=F64)).numpy()
    want = (x - x.mean()) / x.std(ddof=1)
    assert np.allclose(out, want, atol=1e-6)


# ---------------------------------------------------------------- PPO loss

def _loss_inputs():
    # 4 real entries (row 0: three steps, row 1: one step) + 2 padded entries with wild values.
    ratios = [[1.5, 0.5, 1.1], [0.7, 3.0, 3.0]]
    old_logp = _t([[-1.0, -2.0, -0.5], [-1.2, -1.0, -1.0]])
    logp = old_logp + torch.log(_t(ratios))
    adv = _t([[1.0, -1.0, 2.0], [1.0, 5.0, 5.0]])
    old_values = _t([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    vpred = _t([[0.5, 1.0, -0.5], [0.5, 7.0, 7.0]])
    returns = _t([[1.0, 0.0, -1.0], [0.0, -7.0, -7.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    return logp, old_logp, vpred, old_values, returns, adv, mask


def test_ppo_loss_hand_values_with_clipping():
    logp, old_logp, vpred, old_values, returns, adv, mask = _loss_inputs()
    cfg = PPOConfig(clip_range=0.2, clip_range_value=0.2, vf_coef=0.1)
    loss, st = ppo_loss(logp, old_logp, vpred, old_values, returns, adv, mask, cfg)
    # policy: max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=1  -> max(-1.5, -1.2) = -1.2   (clipped)
    #   r=0.5, A=-1 -> max(0.5, 0.8)   =  0.8   (clipped)
    #   r=1.1, A=2  -> -2.2                     (inside)
    #   r=0.7, A=1  -> max(-0.7, -0.8) = -0.7   (unclipped side wins)
    pg = (-1.2 + 0.8 - 2.2 - 0.7) / 4
    assert st["policy"].item() == pytest.approx(pg, abs=1e-9)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    # value: vclip = old + clip(v - old, -0.2, 0.2)
    #   v=0.5, old 0, R 1   -> vclip 0.2:  max(0.25, 0.64) = 0.64 (clipped)
    #   v=1.0, old 1, R 0   -> vclip 1.0:  1.0
    #   v=-0.5, old 0, R -1 -> vclip -0.2: max(0.25, 0.64) = 0.64 (clipped)
    #   v=0.5, old 0, R 0   -> vclip 0.2:  max(0.25, 0.04) = 0.25
    vf = 0.5 * (0.64 + 1.0 + 0.64 + 0.25) / 4
    assert st["value"].item() == pytest.approx(vf, abs=1e-9)
    assert st["value_clipfrac"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(pg + 0.1 * vf, abs=1e-9)
    assert st["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7) / 4, abs=1e-9)
    logs = [math.log(r) for r in (1.5, 0.5, 1.1, 0.7)]
    assert st["approx_kl"].item() == pytest.approx(0.5 * sum(v * v for v in logs) / 4, abs=1e-9)
    assert st["entropy"].item() == 0.0


def test_ppo_loss_gradient_zero_on_clipped_entries():
    logp, old_logp, vpred, old_values, returns, adv, mask = _loss_inputs()
    logp = logp.clone().requires_grad_(True)
    loss, _ = ppo_loss(logp, old_logp, vpred, old_values, returns, adv, mask, PPOConfig())
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 on unclipped real entries; 0 on clipped and padded ones
    want = [[0.0, 0.0, -2.0 * 1.1 / 4], [-1.0 * 0.7 / 4, 0.0, 0.0]]
    _close(logp.grad, want, 1e-9)


def test_ppo_loss_entropy_bonus():
    logp, old_logp, vpred, old_values, returns, adv, mask = _loss_inputs()
    entropy = _t([[1.0, 2.0, 3.0], [2.0, 50.0, 50.0]])  # masked mean 2.0
    base, _ = ppo_loss(logp, old_logp, vpred, old_values, returns, adv, mask, PPOConfig())
    with_ent, st = ppo_loss(logp, old_logp, vpred, old_values, returns, adv, mask, PPOConfig(ent_coef=0.01),
                            entropy=entropy)
    assert st["entropy"].item() == pytest.approx(2.0)
    assert with_ent.item() == pytest.approx(base.item() - 0.02, abs=1e-9)


def test_ppo_loss_ratio_one_no_clipping():
    old = _t([[-1.0, -2.0]])
    adv = _t([[1.0, -3.0]])
    v = _t([[0.3, 0.1]])
    ret = _t([[0.5, 0.1]])
    loss, st = ppo_loss(old.clone(), old, v, v, ret, adv, torch.ones(1, 2, dtype=F64), PPOConfig(vf_coef=0.5))
    # policy: mean(-A) = (-1 + 3) / 2 = 1; value: 0.5 * mean((0.2^2, 0)) = 0.01
    assert st["policy"].item() == pytest.approx(1.0)
    assert st["value"].item() == pytest.approx(0.01)
    assert loss.item() == pytest.approx(1.0 + 0.5 * 0.01)
    assert st["clipfrac"].item() == 0.0 and st["value_clipfrac"].item() == 0.0
    assert st["approx_kl"].item() == 0.0 and st["ratio"].item() == pytest.approx(1.0)


def test_policy_loss_is_ppo_losss_policy_part():
    logp, old_logp, vpred, old_values, returns, adv, mask = _loss_inputs()
    _, st = ppo_loss(logp, old_logp, vpred, old_values, returns, adv, mask, PPOConfig(clip_range=0.2))
    pg, pst = policy_loss(logp, old_logp, adv, mask, 0.2)
    assert pg.item() == st["policy"].item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.7) / 4, abs=1e-9)
    assert all(pst[k].item() == st[k].item() for k in ("approx_kl", "clipfrac", "ratio"))


def test_policy_loss_unclipped_hand_values_and_gradient():
    logp, old_logp, _, _, _, adv, mask = _loss_inputs()
    logp = logp.clone().requires_grad_(True)
    pg, st = policy_loss(logp, old_logp, adv, mask, None)
    # -A r on the 4 real entries: -1.5, 0.5, -2.2, -0.7 (no clipping)
    assert pg.item() == pytest.approx((-1.5 + 0.5 - 2.2 - 0.7) / 4, abs=1e-9)
    assert st["clipfrac"].item() == 0.0
    pg.backward()
    _close(logp.grad, [[-1.5 / 4, 0.5 / 4, -2.2 / 4], [-0.7 / 4, 0.0, 0.0]], 1e-9)


def test_critic_free_loss_policy_and_entropy_only():
    logp, old_logp, _, _, _, adv, mask = _loss_inputs()
    entropy = _t([[1.0, 2.0, 3.0], [2.0, 50.0, 50.0]])  # masked mean 2.0
    loss, st = critic_free_loss(logp, old_logp, adv, mask, 0.2, ent_coef=0.01, entropy=entropy)
    pg = (-1.2 + 0.8 - 2.2 - 0.7) / 4
    assert loss.item() == pytest.approx(pg - 0.02, abs=1e-9)
    assert st["policy"].item() == pytest.approx(pg, abs=1e-9) and st["entropy"].item() == pytest.approx(2.0)
    assert "value" not in st and st["clipfrac"].item() == pytest.approx(0.5)


def test_sequence_returns_sum_the_per_step_kl_penalty():
    scores = _t([1.0, -2.0])
    logp = _t([[-1.0, -0.5], [-0.2, 5.0]])  # [1, 1] is padding
    ref = _t([[-1.5, -0.7], [-0.1, 0.0]])
    ret, kl = sequence_returns(scores, logp, ref, _t([[1, 1], [1, 0]]), kl_coef=0.1)
    _close(kl, [[0.5, 0.2], [-0.1, 0.0]], 1e-12)
    _close(ret, [1.0 - 0.1 * 0.7, -2.0 + 0.1 * 0.1], 1e-12)


# ---------------------------------------------------------------- KL controller


def test_kl_controller_adaptive_update():
    kl = KLController(0.2, target=6.0, horizon=10000.0)
    kl.update(9.0, 5)  # err = clip(0.5) = 0.2 -> *(1 + 0.2 * 5 / 10000)
    assert kl.value == pytest.approx(0.2 * 1.0001, rel=1e-12)
    kl.update(6.6, 10)  # err = 0.1 -> *(1 + 0.1 * 10 / 10000)
    assert kl.value == pytest.approx(0.2 * 1.0001 * 1.0001, rel=1e-12)
    kl.update(0.0, 100)  # err = clip(-1) = -0.2 -> *(1 - 0.2 * 100 / 10000)
    assert kl.value == pytest.approx(0.2 * 1.0001 * 1.0001 * 0.998, rel=1e-12)
    before = kl.value
    kl.update(6.0, 1000)  # err = 0 -> unchanged
    assert kl.value == pytest.approx(before, rel=1e-12)
    kl.update(4.8, 50)  # err = -0.2 exactly -> *(1 - 0.2 * 50 / 10000)
    assert kl.value == pytest.approx(before * 0.999, rel=1e-12)


def test_kl_controller_fixed():
    kl = KLController(0.3)
    for current in (0.0, 10.0, 1e6):
        kl.update(current, 100)
    assert kl.value == 0.3


def test_kl_controller_state_dict():
    a = KLController(0.2, target=6.0)
    a.update(100.0, 1000)
    b = KLController(0.9, target=6.0)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value == pytest.approx(0.2 * 1.02)


# ---------------------------------------------------------------- running moments


def test_running_moments_initial():
    rm = RunningMoments()
    assert rm.mean == 0.0 and rm.std == 1.0
    assert rm.normalize(_t([2.0])).tolist() == [2.0]


def test_running_moments_matches_numpy():
    rng = np.random.default_rng(1)
    batches = [rng.normal(2.0, 3.0, size=n) for n in (5, 3, 5, 1, 7)]
    rm = RunningMoments()
    seen = []
    for b in batches:
        rm.update(_t(b))
        seen.extend(b.tolist())
        all_ = np.array(seen)
        assert rm.mean == pytest.approx(all_.mean(), rel=1e-9, abs=1e-12)
        if len(all_) > 1:
            assert rm.std == pytest.approx(all_.std(ddof=1), rel=1e-9)
    x = _t([0.0, 5.0])
    want = (np.array([0.0, 5.0]) - np.mean(seen)) / np.std(seen, ddof=1)
    assert rm.normalize(x).numpy() == pytest.approx(want, rel=1e-9)


def test_running_moments_hand_values():
    rm = RunningMoments()
    rm.update(_t([1.0, 3.0]))
    rm.update(_t([5.0]))
    # data 1, 3, 5: mean 3, sample std 2
    assert rm.mean == pytest.approx(3.0)
    assert rm.std == pytest.approx(2.0)
    rm.update(_t([]))  # empty batch is a no-op
    assert rm.mean == pytest.approx(3.0) and rm.std == pytest.approx(2.0)


def test_running_moments_state_dict_round_trip():
    rm = RunningMoments()
    rm.update(_t([1.0, 2.0, 4.0]))
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert (other.mean, other.var, other.count) == (rm.mean, rm.var, rm.count)
    rm.update(_t([10.0, -3.0]))
    other.update(_t([10.0, -3.0]))
    assert other.mean == rm.mean and other.std == rm.std
    assert other.mean == pytest.approx(np.mean([1, 2, 4, 10, -3]))
    assert other.std == pytest.approx(np.std([1, 2, 4, 10, -3], ddof=1))


# ---------------------------------------------------------------- explained variance


def test_explained_variance_hand_values():
    ret = _t([[1.0, 2.0], [3.0, 4.0]])
    ones = torch.ones(2, 2, dtype=F64)
    assert explained_variance(ret.clone(), ret, ones).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(2, 2, dtype=F64), ret, ones).item() == pytest.approx(0.0)
    # diff = (0, 1, 0, 1): var 0.25; var(returns) = 1.25 -> 1 - 0.2
    assert explained_variance(_t([[1.0, 1.0], [3.0, 3.0]]), ret, ones).item() == pytest.approx(0.8)


def test_explained_variance_masked():
    ret = _t([[1.0, 2.0, 3.0, 50.0]])
    vals = _t([[1.0, 1.0, 3.0, -50.0]])
    mask = _t([[1, 1, 1, 0]])
    # diff (0, 1, 0): var 2/9; var(returns) = 2/3 -> 1 - 1/3
    assert explained_variance(vals, ret, mask).item() == pytest.approx(2.0 / 3.0)
