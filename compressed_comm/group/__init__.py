"""Groups: stateful compressed collectives over a transport (:class:`CompressedGroup`) and
the same collectives uncompressed (:class:`RawGroup`).

Every collective names a *stream* (say ``"layer7.k"``); the group derives one residual
stream per flow of data from it -- per origin for all-gathers and ring passes, per
``(src, dst)`` pair for point-to-point and all-to-all -- and keeps them in a
:class:`~compressed_comm.Session`. Payload sizes follow from shapes, dtype, codec and step,
so receivers preallocate; before a compressed collective the ranks check, in a small size
handshake, that they agree on them (``CompressionConfig(handshake=True)``).

All ranks must issue the same collectives on the same streams in the same order, as with
any ``torch.distributed`` code. Tensors returned by the collectives (other than the caller's
own) are the streams' references: they are updated in place by the stream's next message,
so clone them to keep them across steps.

The package, by job:

* :mod:`.handle` -- :class:`Handle`, a transfer in flight;
* :mod:`.ledger` -- what a rank posted in a session, and the drain that ends it;
* :mod:`.control` -- the size handshake and its block format;
* :mod:`.framing` -- raw bytes or residual-stream payloads: the groups' one difference;
* :mod:`.collectives` -- point-to-point, all-gather, ring pass and all-to-all, once;
* :mod:`.reductions` -- reduce-scatter and all-reduce over those;
* :mod:`.groups` -- :class:`CompressedGroup` and :class:`RawGroup`;
* :mod:`.protocol` -- :class:`Collectives`, the type of either.
"""

from .collectives import DEFAULT_TIMEOUT
from .control import handshake_nbytes
from .groups import CompressedGroup, RawGroup
from .handle import Handle
from .protocol import Collectives

__all__ = ["CompressedGroup", "RawGroup", "Collectives", "Handle", "handshake_nbytes",
           "DEFAULT_TIMEOUT"]
