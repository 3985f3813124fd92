"""`filo line --config line.yaml`: the line connector, cameras and hot folders to the service and its verdicts to
the PLC, MQTT and folders (docs/line.md). `filo line --check line.yaml` validates the file and reaches every
camera, PLC, broker and the service, one line each (exit 0: all reached, 1: not).

A client of the HTTP API: it runs on the line PC with the `line` extra (`pip install '.[line]'`), and this
module imports it only when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("line", help="run the line connector (cameras and folders -> service -> PLC)",
                              description=__doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", metavar="FILE", help="run every station of this file until SIGTERM")
    which.add_argument("--check", metavar="FILE", help="validate the file and reach everything it names")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        from filo_line.app import main as line_main
    except ModuleNotFoundError as exc:
        print(f"filo line: {exc.name} is not installed; install the line extra: pip install '.[line]'")
        return 2
    return line_main(config_path=args.config, check_path=args.check, log_level=args.log_level)
