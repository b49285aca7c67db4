"""Moved to :mod:`compressed_comm.testing` (this path is kept for one release)."""

import warnings

from compressed_comm.testing.inprocess import Fabric, InProcessTransport, run_ranks

__all__ = ["Fabric", "InProcessTransport", "run_ranks"]

warnings.warn("simulator.inprocess moved to compressed_comm.testing", DeprecationWarning,
              stacklevel=2)
