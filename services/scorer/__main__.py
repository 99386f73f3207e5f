"""`python -m services.scorer`: serve the scorer with settings from `MATES_*`."""

import logging

from services.scorer.app import serve

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
serve()
