"""``python -m launcher ...`` is ``ldm-serve ...`` (used for the child processes of ``up``)."""

import sys

from launcher.main import main

sys.exit(main())
