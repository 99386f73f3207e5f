"""MATES: model-aware pretraining data selection with data influence models.

All of the science lives in this package; the CLI and the services are thin
doors onto it.
"""

__version__ = "0.1.0"
