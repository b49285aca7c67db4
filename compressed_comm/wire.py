"""Wire format: a versioned header followed by 8-byte aligned body sections.

Every payload is one contiguous 1-D ``uint8`` tensor::

    offset  size   field
    0       2      magic  b"CC"
    2       1      version (currently 2; 2 changed the int2 body)
    3       1      codec id (see ``compressed_comm.codecs``)
    4       1      dtype code: 1 float32, 2 float16, 3 bfloat16
    5       1      flags: bit 0 = keyframe (full tensor, lossless)
    6       1      ndim
    7       1      reserved, 0
    8       4      codec parameter (rank for low-rank, k for top-k, else 0)
    12      4      stream sequence number (0 for stateless payloads)
    16      4      stream tag (CRC-32 of the stream's name and origin, 0 if stateless)
    20      4      reserved, 0
    24      8      body length in bytes
    32      8*ndim shape, one uint64 per dimension
    ...            body: the codec's sections, each starting at a multiple of 8

All integers are little-endian. The header size depends only on ``ndim``, and a codec's
body size only on shape, dtype and codec parameters, so every payload size is known in
advance (receivers preallocate; all-gathers need no size exchange).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import torch

from .errors import UnsupportedDtypeError, WireFormatError

__all__ = [
    "MAGIC",
    "VERSION",
    "FLAG_KEYFRAME",
    "SUPPORTED_DTYPES",
    "Header",
    "Section",
    "Layout",
    "header_nbytes",
    "read_header",
    "stream_tag",
    "check_dtype",
]

MAGIC = b"CC"
VERSION = 2
FLAG_KEYFRAME = 1
ALIGN = 8

_FIXED = struct.Struct("<2sBBBBBBIIII Q")
FIXED_NBYTES = _FIXED.size  # 32

_DTYPE_TO_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_TO_DTYPE = {v: k for k, v in _DTYPE_TO_CODE.items()}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPE_TO_CODE)


def check_dtype(dtype: torch.dtype, what: str = "tensor") -> None:
    """Raise :class:`UnsupportedDtypeError` unless ``dtype`` is float16, bfloat16 or float32."""
    if dtype not in _DTYPE_TO_CODE:
        raise UnsupportedDtypeError(
            f"{what} has dtype {dtype}; expected one of float32, float16, bfloat16"
        )


def header_nbytes(ndim: int) -> int:
    """Size in bytes of the header of a payload for a tensor with ``ndim`` dimensions."""
    return FIXED_NBYTES + 8 * ndim


def stream_tag(name: str, origin: int) -> int:
    """The 32-bit tag that identifies a stream in its payload headers."""
    return zlib.crc32(f"{name}\x00{origin}".encode())


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Header:
    """The decoded header of a payload."""

    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    body_nbytes: int
    param: int = 0
    seq: int = 0
    tag: int = 0
    flags: int = 0

    @property
    def nbytes(self) -> int:
        """Header size in bytes."""
        return header_nbytes(len(self.shape))

    @property
    def payload_nbytes(self) -> int:
        """Size in bytes of the whole payload (header + body)."""
        return self.nbytes + self.body_nbytes

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & FLAG_KEYFRAME)

    def to_bytes(self) -> bytes:
        check_dtype(self.dtype, "header")
        fixed = _FIXED.pack(
            MAGIC, VERSION, self.codec_id, _DTYPE_TO_CODE[self.dtype], self.flags,
            len(self.shape), 0, self.param, self.seq & 0xFFFFFFFF, self.tag, 0,
            self.body_nbytes,
        )
        return fixed + struct.pack(f"<{len(self.shape)}Q", *self.shape)

    def write(self, payload: torch.Tensor) -> None:
        """Write this header into the first :attr:`nbytes` bytes of ``payload``."""
        raw = torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8)
        payload[: raw.numel()].copy_(raw)

    def mismatches(self, expected: Header) -> list[str]:
        """Human-readable list of fields where this header differs from ``expected``."""
        out = []
        for field in ("codec_id", "dtype", "shape", "body_nbytes", "param", "seq", "tag", "flags"):
            got, want = getattr(self, field), getattr(expected, field)
            if got != want:
                out.append(f"{field}={got} (expected {want})")
        return out


def read_header(payload: torch.Tensor) -> Header:
    """Parse and validate the header of ``payload``.

    Raises :class:`WireFormatError` if the payload is not a 1-D uint8 tensor, is shorter
    than its header says, has a bad magic or an unknown version or dtype. For a CUDA payload
    this copies the header to the host once (a synchronisation point).
    """
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        got = f"{payload.dtype} tensor of shape {tuple(payload.shape)}" if isinstance(
            payload, torch.Tensor) else type(payload).__name__
        raise WireFormatError(f"payload must be a 1-D uint8 tensor; got {got}")
    total = payload.numel()
    if total < FIXED_NBYTES:
        raise WireFormatError(
            f"payload of {total} bytes is shorter than the {FIXED_NBYTES}-byte fixed header"
        )
    # one host copy: the fixed part and the longest possible shape
    head = payload[:min(total, header_nbytes(255))].cpu().numpy().tobytes()
    fixed = head[:FIXED_NBYTES]
    (magic, version, codec_id, dtype_code, flags, ndim, _r0, param, seq, tag, _r1,
     body_nbytes) = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}; expected {MAGIC!r} (not a compressed_comm payload)")
    if version != VERSION:
        raise WireFormatError(f"payload has wire format version {version}; this build reads version {VERSION}")
    if dtype_code not in _CODE_TO_DTYPE:
        raise WireFormatError(f"payload has unknown dtype code {dtype_code}; expected one of 1, 2, 3")
    hdr_nbytes = header_nbytes(ndim)
    if total < hdr_nbytes:
        raise WireFormatError(f"payload of {total} bytes is shorter than its {hdr_nbytes}-byte header")
    shape = struct.unpack(f"<{ndim}Q", head[FIXED_NBYTES:hdr_nbytes])
    if total != hdr_nbytes + body_nbytes:
        raise WireFormatError(
            f"payload is {total} bytes but its header announces {hdr_nbytes} + {body_nbytes} bytes"
        )
    return Header(codec_id=codec_id, dtype=_CODE_TO_DTYPE[dtype_code], shape=tuple(shape),
                  body_nbytes=body_nbytes, param=param, seq=seq, tag=tag, flags=flags)


@dataclass(frozen=True)
class Section:
    """One typed array in a payload body."""

    name: str
    dtype: torch.dtype
    numel: int


class Layout:
    """Offsets of a codec's body sections; each section starts at a multiple of 8 bytes."""

    __slots__ = ("sections", "offsets", "nbytes", "gaps")

    def __init__(self, *sections: Section) -> None:
        self.sections = sections
        offsets = []
        gaps = []
        pos = 0
        for s in sections:
            offsets.append(pos)
            end = pos + s.numel * s.dtype.itemsize
            pos = _align(end)
            if pos > end:
                gaps.append((end, pos))
        self.offsets = tuple(offsets)
        self.nbytes = pos
        #: (start, end) byte ranges of alignment padding; encoders zero them.
        self.gaps = tuple(gaps)

    def views(self, body: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed 1-D views of each section of ``body`` (a uint8 tensor of :attr:`nbytes`)."""
        out = {}
        for s, off in zip(self.sections, self.offsets):
            raw = body[off: off + s.numel * s.dtype.itemsize]
            out[s.name] = raw.view(s.dtype) if s.dtype != torch.uint8 else raw
        return out


def numel_of(shape: tuple[int, ...]) -> int:
    """Number of elements of a tensor of ``shape``."""
    return math.prod(shape)
