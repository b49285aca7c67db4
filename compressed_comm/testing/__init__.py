"""Test doubles: N virtual ranks in one process and a transport that injects faults.

Test code that runs over a :class:`~compressed_comm.Transport` without processes or a
network, and see what it does when messages are lost, corrupted or late, or a rank dies:

* :func:`run_ranks` -- run ``fn(transport)`` on N virtual ranks, one thread each, over an
  in-memory :class:`Fabric` (:class:`InProcessTransport`) that counts bytes per link;
* :class:`FaultyTransport` -- wraps a transport and drops, duplicates, reorders, corrupts or
  delays its outgoing messages or kills its rank, as a :class:`FaultPlan` says;
  :func:`faulty_world` makes a fabric and one per rank.

Example (rank 0's first message is dropped: the receiver times out)::

    from compressed_comm import CommTimeoutError, CompressedGroup
    from compressed_comm.testing import Fault, FaultPlan, faulty_world, run_ranks

    fabric, transports = faulty_world(2, FaultPlan(schedule={0: Fault.DROP}))
    run_ranks(2, lambda t: my_code(CompressedGroup(transports[t.rank])), fabric=fabric)
"""

from .faults import HEADER_BYTES, Fault, FaultPlan, FaultyTransport, Injection, faulty_world
from .inprocess import Fabric, InProcessTransport, run_ranks

__all__ = ["Fabric", "InProcessTransport", "run_ranks", "HEADER_BYTES", "Fault", "FaultPlan",
           "FaultyTransport", "Injection", "faulty_world"]
