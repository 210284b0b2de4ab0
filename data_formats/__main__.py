"""``python -m data_formats``: see :mod:`data_formats.cli`."""

from .cli import main

raise SystemExit(main())
