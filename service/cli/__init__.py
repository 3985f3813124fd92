"""The `filo` command line: one module per command, each exposing `register(subparsers)`.

Commands register themselves here so that each lives in its own small module and the
dispatcher never grows logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "inspect",
    "serve",
    "worker",
    "describe",
    "loadtest",
    "bench",
    "catalog",
    "synth",
    "train",
    "eval",
    "calibrate",
    "learn",
    "convert_grounding",
    "standin",
    "line",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filo",
        description="FiLo Inspect: zero-shot anomaly detection and localisation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        # every listed command must exist: a module moved or renamed fails here, loudly, instead of
        # vanishing from `filo --help`
        module = importlib.import_module(f"service.cli.{name}_cmd")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
