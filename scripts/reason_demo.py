"""Run configs/reason_cpu.yaml (a short reason-mode fit on SmolLM2, CPU) and save its transcripts and final metrics.

Writes ``docs/results/reason/``: ``metrics.json`` (every logged scalar per iteration), ``transcripts.md`` (the
last iteration's prompts and full answers with their parse, plus the SampleLogger text of every iteration) and
``config.yaml`` (the config as run)::

    OMP_NUM_THREADS=1 python scripts/reason_demo.py [--root /tmp/reason_run] [extra CLI args ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_moral.cli import cli_main  # noqa: E402
from lit_moral.reason import mentions_previous_move, parse_reasoned, uses_moral_vocabulary  # noqa: E402


def _transcripts(module, n: int) -> list[str]:
    out = []
    for agent, s in module.last_samples.items():
        for k in range(min(n, len(s))):
            text = module.tokenizer.decode(list(s.responses[k]), skip_special_tokens=True)
            action, kind = parse_reasoned(text, module.style.actions)
            prev = int(s.prev_other[k])
            out.append(f"### {agent}, game {int(s.episode[k])}, round {int(s.round[k])} (A's last move: "
                       f"{module.style.actions[prev]})\n\n**prompt** (user turn, end)\n\n```\n"
                       f"{module.renderer.texts[int(s.pid[k])][-420:]}\n```\n\n**answer** "
                       f"({len(s.responses[k])} tokens)\n\n```\n{text}\n```\n\nparse: {kind}; reward "
                       f"{float(s.reward[k]):g}; mentions A's previous move: "
                       f"{mentions_previous_move(text, module.style.actions, prev)}; moral vocabulary: "
                       f"{uses_moral_vocabulary(text)}\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="/tmp/reason_run")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "reason"))
    p.add_argument("--transcripts", type=int, default=6)
    args, extra = p.parse_known_args()
    shutil.rmtree(args.root, ignore_errors=True)
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "reason_cpu.yaml"), "--trainer.default_root_dir",
                    args.root, *extra])
    from tests.helpers import scalars

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tags = scalars(cli.trainer.log_dir)
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in sorted(tags.items())}, indent=1) + "\n")
    (out / "transcripts.md").write_text("# Reason mode on SmolLM2-135M-Instruct: last iteration's answers\n\n"
                                        + "\n".join(_transcripts(cli.model, args.transcripts)))
    shutil.copy(Path(cli.trainer.log_dir) / "config.yaml", out / "config.yaml")
    print(json.dumps({k: v[-1][1] for k, v in sorted(tags.items())}))


if __name__ == "__main__":
    main()
