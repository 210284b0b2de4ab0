"""What every recipe's ``if __name__ == "__main__"`` does: parse the config, run, and turn user mistakes into one
line on stderr with exit status 2 instead of a stack trace."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .config import ConfigError, parse_args

# A half-configured environment should not make a recipe wait on the network for a model id.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (not a bug): reported in one line."""
    from data_formats import DataFormatError

    from .runs import NonFiniteLossError
    from .templates import TemplateError

    return (ConfigError, DataFormatError, NonFiniteLossError, TemplateError)


def launch(config_cls: type, main: Callable, argv: list[str] | None = None) -> int:
    """Parse ``argv`` into ``config_cls`` and call ``main(cfg)``; returns the process exit status."""
    try:
        cfg = parse_args(config_cls, argv)
        main(cfg)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
