"""The commands' common exit convention: a user error (ConfigError, CheckpointError) prints one line
`error: ...` on stderr and exits 2, never a traceback; everything else propagates."""
from __future__ import annotations

import functools
import sys

from wcl_fast.config import ConfigError

EXIT_USER = 2


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
