"""Print each checkpoint's constrained-choice policy: P(C) for every prompt id of the training prompts.

    python scripts/policy_probs.py <run>/config.yaml <run>/checkpoints/last.ckpt [more.ckpt ...]

Prompt id bits (``lit_moral.prompts.prompt_id``): 3 = my last move, 2 = the other's last move (1 = D),
1 = the option order of field 1, 0 = the option order of the format line (1 = D listed first). A policy whose
P(C) follows bit 0 alone answers by the label's position, whatever the state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_moral.cli import cli_main  # noqa: E402
from lit_moral.evaluate_runs import _model_config  # noqa: E402
from lit_moral.evaluation import load_weights  # noqa: E402
from lit_moral.prompts import prompt_bits  # noqa: E402


def policy_probs(config: str, ckpts: list[str]) -> tuple[list[tuple[int, int, int, int]], dict[str, list[float]]]:
    """``(prompt bits by id, {checkpoint: P(C) by prompt id})`` of the run config's first agent."""
    module = cli_main(["--config", _model_config(config)], run=False).model
    module.configure_model()
    module.policy.eval()
    r = module.renderer
    agent = module.agent_names[0]
    out: dict[str, list[float]] = {}
    for ckpt in ckpts:
        load_weights(module, ckpt)
        with torch.no_grad():
            lp = module.policy.candidate_logprobs([(agent, r.token_ids[p]) for p in range(r.n_ids)], r.action_ids)
        out[ckpt] = torch.softmax(lp["seq_logp"], -1)[:, 0].tolist()
    return [prompt_bits(p) for p in range(r.n_ids)], out


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    bits, probs = policy_probs(argv[0], argv[1:])
    print("prompt id bits (me, other, order_1, order_2):", bits)
    for ckpt, pc in probs.items():
        print(f"{ckpt}: P(C) by prompt id:", " ".join(f"{x:.4f}" for x in pc))


if __name__ == "__main__":
    main(sys.argv[1:])
