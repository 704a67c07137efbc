"""``python -m mc2sim``: the command line."""

from mc2sim.cli import main

raise SystemExit(main())
