"""hashdistill: binary-code image retrieval models for the edge.

Importing this package is cheap on purpose: the edge runtime (``hashdistill.export.runtime``)
and the numpy-only codes module must work where torch is not installed, so nothing heavy is
imported here.
"""

__version__ = "0.1.0"
