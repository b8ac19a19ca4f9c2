"""``python -m proxy …`` runs the ``shepherd`` command."""

import sys

from proxy.cli import main

sys.exit(main())
