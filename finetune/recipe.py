"""What every recipe's ``if __name__ == "__main__"`` does: parse the config, run, and turn user mistakes into one
line on stderr with exit status 2 instead of a stack trace. Under ``accelerate launch`` or ``torchrun`` the launcher's
own report of the failed process is kept to that line too (``finetune.launcher_exit``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from .config import ConfigError, parse_args
from .launcher_exit import EXIT_USER_ERROR, report_in_child

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
    except ConfigError as e:  # before the other user errors, whose classes import torch
        return report_user_error(e)
    except Exception as e:
        if isinstance(e, user_errors()):
            return report_user_error(e)
        raise
    return 0


def report_user_error(error: BaseException) -> int:
    """Report ``error`` as one ``error: ...`` line (``finetune.launcher_exit.report_in_child``); the exit status."""
    report_in_child(f"error: {' '.join(str(error).split())}")
    return EXIT_USER_ERROR
