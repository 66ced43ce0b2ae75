"""``python -m hashdistill`` is the ``hashdistill`` command."""

import sys

from hashdistill.cli import main

sys.exit(main())
