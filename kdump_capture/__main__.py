"""``python3 -m kdump_capture`` runs the command-line interface."""

import sys

from .cli import main

sys.exit(main())
