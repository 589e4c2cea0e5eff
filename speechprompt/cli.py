"""The ``speechprompt`` command. Each subcommand lives in its own module, which defines
``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first line is the one-line help."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from speechprompt import __version__
from speechprompt.errors import SpeechPromptError

# name -> module. Order is the order of `speechprompt --help`.
COMMANDS: dict[str, str] = {
    "synth": "speechprompt.data_prep.synth",
    "prepare-dataset": "speechprompt.data_prep.datasets",
    "kmeans": "speechprompt.data_prep.kmeans",
    "prepare": "speechprompt.data_prep.speech2unit",
    "units-probe": "speechprompt.data_prep.units_probe",
    "pretrain-ulm": "speechprompt.pretrain",
    "pretrain-hubert": "speechprompt.pretrain_hubert",
    "score": "speechprompt.score",
    "train": "speechprompt.train",
    "evaluate": "speechprompt.evaluate",
    "infer": "speechprompt.infer",
    "compare": "speechprompt.compare",
    "superb": "speechprompt.superb.train",
    "mask-analysis": "speechprompt.mask_analysis",
    "prune": "speechprompt.prune",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the layout of descriptions and epilogs.

    A default is not repeated where there is none to show (``None``) or where the help text already states it.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechprompt",
        description="Adapt frozen speech models to new tasks with tiny per-task parameters.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"speechprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name, help=doc.splitlines()[0] if doc else None, description=doc, formatter_class=_Formatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except SpeechPromptError as e:
        print(f"speechprompt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"speechprompt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
