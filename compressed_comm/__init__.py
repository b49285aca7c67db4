"""compressed_comm: residual compression of torch.distributed traffic for diffusion serving.

Diffusion models run the same network for tens of steps and the activations that parallel
inference exchanges change little between steps. compressed_comm sends a compressed
residual against what the receiver already holds, keeping sender and receiver references
bit-identical (closed loop), so quantisation error is fed back instead of accumulating.

Core API:

* :func:`get_codec` / :func:`available_codecs` -- stateless codecs (tensor <-> payload);
* :class:`StreamEncoder` / :class:`StreamDecoder` -- one closed-loop residual stream;
* :class:`Session` -- the streams of one request, with statistics;
* :class:`CompressionConfig` -- every knob in one frozen dataclass;
* :class:`CompressedGroup` -- compressed send/recv, all-gather, ring pass and all-to-all
  over a :class:`Transport` (:class:`TorchDistTransport` for torch.distributed);
  :class:`RawGroup` the same uncompressed, :class:`Collectives` the type of either;
* :func:`wrap_process_group` -- a drop-in process group for plain ``torch.distributed`` code;
* :func:`warmup` -- compile the kernels ahead of the first request.
"""

from .codecs import Codec, available_codecs, get_codec
from .config import CompressionConfig
from .keyframes import Keyframes, KeyframeSchedule
from .errors import (
    CancelledError,
    CommError,
    CommTimeoutError,
    CompressedCommError,
    GroupFailedError,
    NonFiniteError,
    PeerFailedError,
    StaleMessageError,
    StreamMismatchError,
    StreamOrderError,
    UnsupportedDtypeError,
    WireFormatError,
)
from .group import Collectives, CompressedGroup, Handle, RawGroup
from .process_group import CompressedProcessGroup, wrap_process_group
from .session import Session, SessionStats
from .stream import StreamDecoder, StreamEncoder, StreamKey, StreamStats
from .transport import P2POp, TorchDistTransport, Transport, Work
from .warmup import warmup
from .wire import Header, read_header

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "get_codec",
    "available_codecs",
    "CompressionConfig",
    "Keyframes",
    "KeyframeSchedule",
    "StreamEncoder",
    "StreamDecoder",
    "StreamStats",
    "Session",
    "SessionStats",
    "StreamKey",
    "Header",
    "read_header",
    "Transport",
    "TorchDistTransport",
    "Work",
    "P2POp",
    "CompressedGroup",
    "RawGroup",
    "Collectives",
    "Handle",
    "wrap_process_group",
    "CompressedProcessGroup",
    "CompressedCommError",
    "WireFormatError",
    "StreamMismatchError",
    "StreamOrderError",
    "StaleMessageError",
    "NonFiniteError",
    "UnsupportedDtypeError",
    "CommError",
    "CommTimeoutError",
    "GroupFailedError",
    "PeerFailedError",
    "CancelledError",
    "warmup",
]
