"""The argparse building blocks of the ``candor-client``, ``candor-server`` and ``candor-sim``
commands: one parser of command modules, one way to declare a command, and the options
they share (``-c KEY=VALUE``, ``-v``).

A command module exposes ``register(subparsers)``, which declares its commands with
:func:`add_command`; each command's handler takes the parsed namespace and returns the
exit code (``common.errors.run_command`` runs it).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence

__all__ = ["add_command", "add_config_option", "add_verbose_option", "command_parser"]

Handler = Callable[[argparse.Namespace], int]


def command_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    """A parser with one required sub-command, declared by each of ``modules`` (import
    paths of modules with ``register(subparsers)``), in that order."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def add_command(subparsers, name: str, handler: Handler, *, help: str,
                positionals: Sequence[str | tuple[str, str]] = ("dir",)) -> argparse.ArgumentParser:
    """Declare command ``name`` run by ``handler``, with its positional arguments.

    Args:
        positionals: each a name, or a (name, help) pair; by default the one ``dir`` of
            the site or federation directory the command works on.

    Returns:
        The command's parser, for its options.
    """
    parser = subparsers.add_parser(name, help=help)
    for positional in positionals:
        arg, arg_help = (positional, None) if isinstance(positional, str) else positional
        parser.add_argument(arg, help=arg_help)
    parser.set_defaults(func=handler)
    return parser


def add_config_option(parser: argparse.ArgumentParser, *, help: str) -> None:
    """``-c/--config KEY=VALUE``, repeatable, into ``args.config`` (a list; read it with
    ``common.config.merge_overrides``)."""
    parser.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_verbose_option(parser: argparse.ArgumentParser, *, help: str) -> None:
    """``-v/--verbose`` into ``args.verbose``."""
    parser.add_argument("-v", "--verbose", action="store_true", help=help)
