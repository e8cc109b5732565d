"""The commands' common exit convention: a user error (ConfigError, CheckpointError, a bad command-line
argument) prints one line `error: ...` on stderr and exits 2, never a traceback; everything else
propagates. Every command builds its parser with `ArgumentParser` and wraps its main with `command`."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from wcl_fast.config import ConfigError

EXIT_USER = 2


class UsageError(ConfigError):
    """A bad command-line argument."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError, so that `command` prints them as one line and returns 2
    (argparse would print its whole usage block and exit); --help is unchanged."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (--help lists the options)")


def at_least(low: int | float, kind=int):
    """argparse type: a number (int or float) >= low, named in the error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def between(low: int, high: int):
    """argparse type: an integer in [low, high]."""

    def parse(text: str):
        value = at_least(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


def output_file(option: str, path: str | os.PathLike | None) -> Path | None:
    """Check before any work that `path` can be written (its folder exists and is writable, it is not a
    folder): a bench's or demo's results are not lost at the end of the run."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option}: '{path}' is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{option}: the folder '{folder}' does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{option}: the folder '{folder}' is not writable; choose another path")
    return path


def command(main):
    """Decorator for a command's `main(argv=None) -> int`."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER
        finally:
            from wcl_fast import dist as wdist

            wdist.cleanup()

    return wrapper


def config_arguments(prog: str, description: str, overrides_help: str, argv=None):
    """The arguments of the config-driven commands (train, knn, linear, finetune): --config FILE and
    key=value overrides."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML experiment file, e.g. configs/imagenet_wcl_200ep.yaml")
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser.parse_args(argv)
