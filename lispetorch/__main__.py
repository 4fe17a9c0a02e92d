"""``python -m lispetorch`` is the ``lispetorch`` command (what ``torchrun -m lispetorch train`` runs)."""

import sys

from .cli import main

sys.exit(main())
