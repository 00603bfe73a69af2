"""The ``taurl`` command line: ``taurl models``, and the subcommands later parts add."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from taurl import __version__
from taurl.errors import TaurlError


def _cmd_models(args: argparse.Namespace) -> int:
    from taurl import models

    if args.models_cmd == "list":
        print(f"models dir: {models.models_dir()}  (set ${models.MODELS_DIR_ENV} to move it)")
        for name, desc, prepared in models.list_models():
            print(f"  {name:<14} {'prepared' if prepared else 'not prepared':<13} {desc}")
        return 0
    path = models.prepare_model(args.name, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taurl", description="Agentic RL for language models: rollout, eval, train."
    )
    parser.add_argument("--version", action="version", version=f"taurl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_models = sub.add_parser("models", help="list or prepare built-in models")
    msub = p_models.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="list built-in models and whether they are prepared")
    p_prep = msub.add_parser("prepare", help="build a built-in model's folder in the cache")
    p_prep.add_argument("name", help="built-in model name, e.g. smollm2-135m")
    p_prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    p_models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except TaurlError as e:
        print(f"taurl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
