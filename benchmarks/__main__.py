"""``python -m benchmarks``: see :mod:`benchmarks.cli` (or run with --help)."""

from .cli import main

raise SystemExit(main())
