"""Wire format: a versioned header followed by 8-byte aligned body sections.

Every payload is one contiguous 1-D ``uint8`` tensor::

    offset  size   field
    0       2      magic  b"CC"
    2       1      version (currently 4; 3 added session, config and checksum fields, 4 the
                   config fingerprint of a stream's first message)
    3       1      codec id (see ``compressed_comm.codecs``)
    4       1      dtype code: 1 float32, 2 float16, 3 bfloat16
    5       1      flags: bit 0 = keyframe (the tensor itself), bit 1 = body checksum,
                   bit 2 = a slice of a spread keyframe (the body is sub-payloads, below),
                   bit 3 = the body ends with the sender's config fingerprint (below),
                   bit 4 = a status frame: no data (below)
    6       1      ndim
    7       1      stream config: residual order (bits 0-1), open loop (bit 2)
    8       4      codec parameter (rank for low-rank, k for top-k, else 0)
    12      4      stream sequence number (0 for stateless payloads)
    16      4      stream tag (CRC-32 of the stream's name and origin, 0 if stateless)
    20      4      session id (advanced by every new session; 0 if stateless)
    24      4      warmup steps of the stream
    28      4      keyframe period of the stream
    32      4      decay of the stream's order-2 prediction (float32; 0 unless order 2)
    36      4      CRC-32 of the body (0 unless flag bit 1 is set)
    40      8      body length in bytes
    48      8*ndim shape, one uint64 per dimension
    ...            body: the codec's sections, each starting at a multiple of 8

A spread keyframe's message (``Keyframes(spread=K)``) has the stream's
header with flag bit 2 and, as its body, complete payloads (header and body each) of
contiguous row blocks of the tensor viewed ``(N, C)``: the residual-codec payload of the
rows before the slice, the keyframe-codec payload of the slice, that of the rows after
(empty blocks left out). The slice is fixed by the step, so the size is known in advance.

The first message of every stream (sequence number 0) has flag bit 3 and ends its body
with the sender's config fingerprint: a little-endian uint32 CRC-32 per field of
``compressed_comm.config.SHARED_FIELDS`` (:meth:`CompressionConfig.fingerprint`), padded to
a multiple of 8 bytes and counted in the body length. A receiver compares it with its own
and names the fields that differ, whatever the transfer (collective or point-to-point).

A status frame (flag bit 4) stands in for a payload whose sender has none to give, at the
size the receiver expects: a header for a 0-d float32 tensor, then a status byte (1: the
sender's step failed, 2: the sender does not take part in this transfer), 3 zero bytes, the
rank the status is about (uint32), and a UTF-8 text, zero-padded to the frame's size.

All integers are little-endian. The header size depends only on ``ndim``, and a codec's
body size only on shape, dtype and codec parameters, so every payload size is known in
advance (receivers preallocate; all-gathers need no size exchange). Every header field
but the checksum is known to the receiver before the payload arrives, so a receiver
checks the whole header against the one it expects.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import torch

from .errors import (StaleMessageError, StreamOrderError, UnsupportedDtypeError,
                     WireFormatError)

__all__ = [
    "MAGIC",
    "VERSION",
    "FLAG_KEYFRAME",
    "FLAG_CHECKSUM",
    "FLAG_SPREAD",
    "FLAG_CONFIG",
    "FLAG_STATUS",
    "STATUS_FAILED",
    "STATUS_VOID",
    "status_frame",
    "read_status",
    "pack_fingerprint",
    "unpack_fingerprint",
    "SUPPORTED_DTYPES",
    "Header",
    "Section",
    "Layout",
    "header_nbytes",
    "read_header",
    "stream_tag",
    "check_dtype",
    "body_checksum",
    "verify_checksum",
    "contiguous_payload",
    "announced_payload",
    "CONFIG_FIELDS",
    "expect_position",
    "expect",
]

MAGIC = b"CC"
VERSION = 4
FLAG_KEYFRAME = 1
FLAG_CHECKSUM = 2
FLAG_SPREAD = 4
FLAG_CONFIG = 8
FLAG_STATUS = 16
#: status frames: the sender's step failed / the sender does not take part in the transfer
STATUS_FAILED = 1
STATUS_VOID = 2
_OPEN_LOOP = 4
ALIGN = 8
_U32 = 0xFFFFFFFF

_FIXED = struct.Struct("<2sBBBBBB IIII IIfI Q")
FIXED_NBYTES = _FIXED.size  # 48
_CHECKSUM_OFFSET = 36

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
    session: int = 0
    residual_order: int = 0
    closed_loop: bool = True
    warmup_steps: int = 0
    keyframe_period: int = 0
    decay: float = 0.0

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

    @property
    def checksummed(self) -> bool:
        """Whether the body carries a CRC-32 (flag bit 1)."""
        return bool(self.flags & FLAG_CHECKSUM)

    def to_bytes(self, checksum: int = 0) -> bytes:
        check_dtype(self.dtype, "header")
        if self.param > _U32:
            raise ValueError(f"codec parameter {self.param} does not fit the header's 32 bits")
        if not 0 <= self.residual_order <= 3:
            raise ValueError(f"residual order {self.residual_order} does not fit the header")
        stream_cfg = self.residual_order | (0 if self.closed_loop else _OPEN_LOOP)
        fixed = _FIXED.pack(
            MAGIC, VERSION, self.codec_id, _DTYPE_TO_CODE[self.dtype], self.flags,
            len(self.shape), stream_cfg, self.param, self.seq & _U32, self.tag,
            self.session & _U32, min(self.warmup_steps, _U32), min(self.keyframe_period, _U32),
            self.decay, checksum, self.body_nbytes,
        )
        return fixed + struct.pack(f"<{len(self.shape)}Q", *self.shape)

    def write(self, payload: torch.Tensor) -> None:
        """Write this header (checksum field 0) into the first :attr:`nbytes` bytes of
        ``payload``; :func:`seal` fills in the checksum once the body is written."""
        raw = torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8)
        payload[: raw.numel()].copy_(raw)

    def seal(self, payload: torch.Tensor) -> None:
        """Write the CRC-32 of ``payload``'s body into its header if :attr:`checksummed`."""
        if self.checksummed:
            crc = body_checksum(payload[self.nbytes:])
            raw = torch.tensor(list(struct.pack("<I", crc)), dtype=torch.uint8)
            payload[_CHECKSUM_OFFSET:_CHECKSUM_OFFSET + 4].copy_(raw)

    def mismatches(self, expected: Header) -> list[str]:
        """Human-readable list of fields where this header differs from ``expected``
        (all fields but the checksum, which :func:`verify_checksum` checks)."""
        out = []
        for field in ("codec_id", "dtype", "shape", "body_nbytes", "param", "seq", "tag", "flags",
                      "session", "residual_order", "closed_loop", "warmup_steps",
                      "keyframe_period", "decay"):
            got, want = getattr(self, field), getattr(expected, field)
            if field == "decay":  # the wire holds float32
                got, want = _f32(got), _f32(want)
            if got != want:
                out.append(f"{field}={got} (expected {want})")
        return out


#: Header fields that come from the sender's :class:`~compressed_comm.CompressionConfig`.
CONFIG_FIELDS = ("residual_order", "closed_loop", "warmup_steps", "keyframe_period", "decay")


def expect_position(header: Header, expected: Header, what: str) -> None:
    """Raise if ``header`` is not the message a stream expects next: another stream's
    (:class:`WireFormatError`), another session's (:class:`StaleMessageError`) or another
    step's (:class:`StreamOrderError`)."""
    if header.tag != expected.tag:
        raise WireFormatError(f"{what}: payload belongs to another stream (tag "
                              f"{header.tag:#010x}, expected {expected.tag:#010x})")
    if header.session != expected.session:
        raise StaleMessageError(
            f"{what}: payload belongs to session {header.session}, this is session "
            f"{expected.session} (a message of an earlier or later request; discarded)")
    if header.seq != expected.seq:
        kind = "missed" if header.seq > expected.seq else "repeated or stale"
        raise StreamOrderError(f"{what}: expected the payload of step {expected.seq}, got step "
                               f"{header.seq} (a {kind} message)")


def expect(header: Header, expected: Header, what: str,
           differing: list[str] | tuple[str, ...] = ()) -> None:
    """Raise :class:`WireFormatError` if ``header`` differs from ``expected`` (after
    :func:`expect_position`): ``differing`` are the config fields the sender's fingerprint
    names (named with the header values they explain), else the header's config fields,
    else the fields of another shape, codec or size."""
    bad = header.mismatches(expected)
    if differing:
        related = set(differing) | ({"codec_id", "param"} if {
            "codec", "keyframes.codec", "min_bytes", "skip"} & set(differing) else set()) | (
            {"flags"} if {"checksum", "keyframes.spread"} & set(differing) else set()) | (
            {"keyframe_period"} if "keyframes.period" in differing else set())
        shown = [b for b in bad if b.split("=")[0] in related]
        raise WireFormatError(
            f"{what}: the sender's CompressionConfig differs from this rank's in "
            f"{', '.join(differing)}" + (f" ({', '.join(shown)})" if shown else "")
            + "; every rank must use the same config")
    config = [b for b in bad if b.split("=")[0] in CONFIG_FIELDS]
    if (header.flags ^ expected.flags) & FLAG_SPREAD:
        config.append(f"keyframes.spread (step {expected.seq} is "
                      f"{'' if expected.flags & FLAG_SPREAD else 'not '}a slice of a "
                      "spread keyframe here)")
    if config:
        raise WireFormatError(f"{what}: the sender's CompressionConfig differs from this "
                              f"rank's: {', '.join(config)}; every rank must use the same config")
    if bad:
        raise WireFormatError(f"{what}: payload does not match the stream: {', '.join(bad)}")


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


#: the smallest status frame: the header and the status fields
STATUS_MIN_NBYTES = FIXED_NBYTES + 8
_STATUS = struct.Struct("<BxxxI")


def status_frame(nbytes: int, status: int, rank: int, text: str,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """A payload of ``nbytes`` that carries ``status`` about ``rank`` and ``text`` (cut to
    fit) instead of data (see the module docstring)."""
    if nbytes < STATUS_MIN_NBYTES:
        raise ValueError(f"a status frame needs at least {STATUS_MIN_NBYTES} bytes, not {nbytes}")
    header = Header(codec_id=0, dtype=torch.float32, shape=(),
                    body_nbytes=nbytes - FIXED_NBYTES, flags=FLAG_STATUS)
    raw = header.to_bytes() + _STATUS.pack(status, rank & _U32)
    raw += text.encode()[: nbytes - len(raw)]
    raw += bytes(nbytes - len(raw))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


def read_status(payload: torch.Tensor) -> tuple[int, int, str] | None:
    """``(status, rank, text)`` of a status frame; None for anything else (one host copy of
    the fixed header, and of the frame where it is one)."""
    if payload.numel() < STATUS_MIN_NBYTES:
        return None
    head = payload[:FIXED_NBYTES].cpu().numpy().tobytes()
    if head[:2] != MAGIC or not head[5] & FLAG_STATUS:
        return None
    raw = payload.cpu().numpy().tobytes()
    status, rank = _STATUS.unpack_from(raw, FIXED_NBYTES)
    text = raw[STATUS_MIN_NBYTES:].rstrip(b"\x00").decode(errors="replace")
    return status, rank, text


def pack_fingerprint(fingerprint: tuple[int, ...]) -> torch.Tensor:
    """A config fingerprint as the bytes that end a first message's body (8-byte padded)."""
    raw = struct.pack(f"<{len(fingerprint)}I", *fingerprint)
    return torch.frombuffer(bytearray(raw + bytes(-len(raw) % ALIGN)), dtype=torch.uint8)


def unpack_fingerprint(payload: torch.Tensor, fields: int) -> tuple[int, ...]:
    """The config fingerprint of ``fields`` CRCs that ends ``payload``'s body (a host copy)."""
    nbytes = _align(4 * fields)
    raw = payload[payload.numel() - nbytes:].cpu().numpy().tobytes()
    return struct.unpack_from(f"<{fields}I", raw)


def body_checksum(body: torch.Tensor) -> int:
    """CRC-32 (zlib's polynomial) of the bytes of the 1-D uint8 tensor ``body``.

    Computed on the host: a CUDA body is copied there first (a synchronisation point).
    """
    return zlib.crc32(body.detach().cpu().numpy())


def verify_checksum(payload: torch.Tensor, header: Header, what: str) -> None:
    """Raise :class:`WireFormatError` if ``header`` announces a checksum and ``payload``'s
    body does not match it."""
    if not header.checksummed:
        return
    head = payload[_CHECKSUM_OFFSET:_CHECKSUM_OFFSET + 4].cpu().numpy().tobytes()
    want = struct.unpack("<I", head)[0]
    got = body_checksum(payload[header.nbytes:])
    if got != want:
        raise WireFormatError(
            f"{what}: body checksum mismatch (CRC-32 {got:#010x}, header says {want:#010x}): "
            "the payload was corrupted in transit"
        )


def contiguous_payload(payload: torch.Tensor) -> torch.Tensor:
    """``payload`` itself if it is contiguous and 8-byte aligned (as body sections need),
    else an aligned copy."""
    if payload.dim() == 1 and payload.is_contiguous() and payload.data_ptr() % ALIGN == 0:
        return payload
    out = torch.empty(payload.numel(), dtype=torch.uint8, device=payload.device)
    out.copy_(payload.reshape(-1))
    return out


def announced_payload(buffer: torch.Tensor) -> torch.Tensor:
    """The payload at the start of a receive ``buffer`` that may be longer than it: the
    first ``header + body`` bytes its fixed header announces (``buffer`` itself if that
    cannot be read; :func:`read_header` then says what is wrong)."""
    if buffer.numel() < FIXED_NBYTES:
        return buffer
    fixed = buffer[:FIXED_NBYTES].cpu().numpy().tobytes()
    ndim, body = fixed[6], struct.unpack_from("<Q", fixed, FIXED_NBYTES - 8)[0]
    total = header_nbytes(ndim) + body
    return buffer[:total] if fixed[:2] == MAGIC and total <= buffer.numel() else buffer


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
    (magic, version, codec_id, dtype_code, flags, ndim, stream_cfg, param, seq, tag, session,
     warmup, period, decay, _crc, body_nbytes) = _FIXED.unpack(fixed)
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
                  body_nbytes=body_nbytes, param=param, seq=seq, tag=tag, flags=flags,
                  session=session, residual_order=stream_cfg & 3,
                  closed_loop=not stream_cfg & _OPEN_LOOP, warmup_steps=warmup,
                  keyframe_period=period, decay=decay)


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
        return {s.name: body[off: off + s.numel * s.dtype.itemsize].view(s.dtype)
                for s, off in zip(self.sections, self.offsets)}


def numel_of(shape: tuple[int, ...]) -> int:
    """Number of elements of a tensor of ``shape``."""
    return math.prod(shape)
