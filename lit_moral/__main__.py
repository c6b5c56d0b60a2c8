"""``python -m lit_moral <command>`` (and the ``lit-moral`` console script).

    fit, test, warmup   LightningCLI commands (lit_moral.cli): train, evaluate a checkpoint, the format warm-up
    dpo, reward-model   preference training on labelled pairs (lit_moral.preference), through lit_moral.cli too
    evaluate            several checkpoints of one run together, CIs over runs (lit_moral.evaluate_runs)
    play                play against a trained agent in a terminal (lit_moral.play)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None):
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "play":
        from lit_moral.play import main as play

        return play(args[1:])
    if args and args[0] == "evaluate":
        from lit_moral.evaluate_runs import main as evaluate

        return evaluate(args[1:])
    from lit_moral.cli import cli_main

    return cli_main(None if argv is None else args)


if __name__ == "__main__":
    main()
