"""Moved to :mod:`compressed_comm.testing` (this path is kept for one release)."""

import warnings

from compressed_comm.testing.faults import (
    HEADER_BYTES,
    Fault,
    FaultPlan,
    FaultyTransport,
    Injection,
    faulty_world,
)

__all__ = ["HEADER_BYTES", "Fault", "FaultPlan", "FaultyTransport", "Injection", "faulty_world"]

warnings.warn("simulator.faults moved to compressed_comm.testing", DeprecationWarning,
              stacklevel=2)
