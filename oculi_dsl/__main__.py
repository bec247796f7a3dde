"""``python -m oculi_dsl`` runs the ``oculi-dsl`` command line."""

from oculi_dsl.cli import main

raise SystemExit(main())
