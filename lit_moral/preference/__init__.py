"""The preference route (protocol section 11): labelled pairs, DPO, and a learned reward model for RL.

* :mod:`~lit_moral.preference.pairs`: the moral labeller, label noise, JSONL files of pairs;
* :mod:`~lit_moral.preference.losses`: pure DPO and Bradley-Terry losses;
* :mod:`~lit_moral.preference.dpo`: ``python -m lit_moral dpo`` (:class:`DPO`);
* :mod:`~lit_moral.preference.reward_model`: ``python -m lit_moral reward-model`` (:class:`RewardModel`) and
  :class:`LearnedReward`, the trained reward model as a reward for RL.

See ``docs/preference.md``.
"""

from lit_moral.preference.dpo import DPO
from lit_moral.preference.pairs import PairConfig, PreferencePair, label_pairs, read_pairs, write_pairs
from lit_moral.preference.reward_model import LearnedReward, RewardModel, check_learned, learned_rewards

__all__ = ["DPO", "LearnedReward", "PairConfig", "PreferencePair", "RewardModel", "check_learned", "label_pairs",
           "learned_rewards", "read_pairs", "write_pairs"]
