"""`python -m services.loadtest`."""

import sys

from services.loadtest.command import main

sys.exit(main())
