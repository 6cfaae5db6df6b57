"""``xtok-kd distill`` (being written)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("distill", help="(being written)")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
