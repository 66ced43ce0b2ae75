"""``python -m hashdistill`` is the ``hashdistill`` command."""

import sys

from hashdistill.app.cli import main

sys.exit(main())
