"""The codec base class: stateless math from a tensor to one self-describing payload."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..errors import NonFiniteError, WireFormatError
from ..kernels import Kernels, get_kernels
from ..wire import (FLAG_CONFIG, Header, Layout, check_dtype, contiguous_payload, header_nbytes,
                    read_header, verify_checksum)

__all__ = ["Codec", "as_2d", "check_finite", "non_finite_error"]


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed (or copied, if not viewable) as a contiguous ``(N, C)`` tensor, C = last dim."""
    n, c = _nc(tuple(x.shape))
    return x.reshape(n, c).contiguous()


def _nc(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def check_finite(x: torch.Tensor, what: str, kernels: Kernels) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or Inf (synchronises on CUDA)."""
    if x.numel() and not kernels.all_finite(x):
        raise non_finite_error(x, what)


def non_finite_error(x: torch.Tensor, what: str) -> NonFiniteError:
    """The error for a tensor ``x`` found to hold NaN or Inf. (A residual that overflows
    float32 saturates instead; see :func:`compressed_comm.kernels.torch_ref.residual`.)"""
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    return NonFiniteError(
        f"{what} contains {nan} NaN and {inf} Inf values of {x.numel()}; expected finite "
        "values (set CompressionConfig(check_finite=False) to skip this check)"
    )


class Codec(ABC):
    """Stateless compression of a float tensor into one 1-D ``uint8`` payload.

    Tensors of any shape are viewed as ``(N, C)`` with ``C`` the last dimension (a 0-d
    tensor is ``(1, 1)``); float16, bfloat16 and float32 are supported. The payload is a
    versioned header (:mod:`compressed_comm.wire`) plus the codec's body; its size depends
    only on shape, dtype and the codec's parameters (:meth:`payload_nbytes`).

    Subclasses define :attr:`codec_id`, :meth:`layout`, :meth:`encode_into` and
    :meth:`decode_into`; the residual streams call the latter two directly with a
    prediction and a reference to update.
    """

    codec_id: ClassVar[int]
    #: Decoding reproduces the input bit for bit (residual coding is pointless).
    lossless: ClassVar[bool] = False
    #: :meth:`encode_into` takes ``check`` and finds NaN/Inf in the pass that computes its
    #: scales, returning False before writing anything (no separate pass over the input).
    fused_check: ClassVar[bool] = False

    def __init__(self, spec: str, kernels: str | None = None) -> None:
        self.spec = spec
        self.kernels_impl = kernels
        self._kernels: dict[str, Kernels] = {}  # by device type, resolved on first use

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    # ------------------------------------------------------------------ subclass hooks

    @abstractmethod
    def layout(self, n: int, c: int, dtype: torch.dtype) -> Layout:
        """The body sections for an ``(n, c)`` tensor of ``dtype``."""

    def param(self, n: int, c: int) -> int:
        """The codec parameter recorded in the header (0 unless the codec has one)."""
        return 0

    def new_state(self) -> Any:
        """Fresh per-stream encoder state (None for codecs without any)."""
        return None

    @abstractmethod
    def encode_into(
        self,
        x: torch.Tensor,
        pred: torch.Tensor | None,
        ref_out: torch.Tensor | None,
        body: dict[str, torch.Tensor],
        state: Any,
    ) -> bool | None:
        """Encode the residual ``x - pred`` (``x`` if ``pred is None``; saturated at
        +-float32 max where it overflows) of 2-D ``x`` into the body sections and, if
        ``ref_out`` is given, write there exactly what :meth:`decode_into` will reconstruct
        from those sections.

        Codecs with :attr:`fused_check` take a keyword ``check: bool`` and return False,
        having written nothing to ``ref_out``, when ``check`` is set and ``x`` holds NaN or
        Inf (True otherwise)."""

    @abstractmethod
    def decode_into(
        self, body: dict[str, torch.Tensor], pred: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        """Write ``pred + decoded residual`` (or the decoded value) into 2-D ``out``."""

    # ------------------------------------------------------------------ public API

    def kernels(self, device: torch.device) -> Kernels:
        """The kernel implementation this codec uses on ``device`` (resolved once per device
        type, from ``kernels`` or ``$COMPRESSED_COMM_KERNELS`` as they were then)."""
        found = self._kernels.get(device.type)
        if found is None:
            found = self._kernels[device.type] = get_kernels(device, self.kernels_impl)
        return found

    def payload_nbytes(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
        """Exact size in bytes of the payload :meth:`encode` produces for ``shape``, ``dtype``."""
        shape = tuple(int(s) for s in shape)
        check_dtype(dtype)
        return header_nbytes(len(shape)) + self.layout(*_nc(shape), dtype).nbytes

    def header(self, shape: tuple[int, ...], dtype: torch.dtype, **fields: Any) -> Header:
        """The header this codec writes for a tensor of ``shape`` and ``dtype``; ``fields``
        are the stream's (sequence number, tag, flags, session, config; see :class:`Header`)."""
        n, c = _nc(shape)
        return Header(codec_id=self.codec_id, dtype=dtype, shape=shape,
                      body_nbytes=self.layout(n, c, dtype).nbytes, param=self.param(n, c),
                      **fields)

    def encode(self, x: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Compress ``x`` into a payload. ``check`` rejects NaN/Inf with :class:`NonFiniteError`."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.spec}: encode expects a torch.Tensor, got {type(x).__name__}")
        check_dtype(x.dtype, f"{self.spec}: input")
        return self.emit(as_2d(x.detach()), tuple(x.shape), None, None,
                         self.header(tuple(x.shape), x.dtype),
                         check=f"{self.spec}: input" if check else None)

    def decode(self, payload: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct the tensor in ``payload``, into ``out`` if given (same shape and dtype).

        A stream's keyframe decodes too; the config fingerprint that ends a stream's first
        message is skipped."""
        header = read_header(payload)
        payload = contiguous_payload(payload)
        if header.codec_id != self.codec_id:
            raise WireFormatError(
                f"payload was written by codec id {header.codec_id}; this is {self.spec} "
                f"(id {self.codec_id})"
            )
        body = self.layout(*_nc(header.shape), header.dtype).nbytes
        if header.flags & FLAG_CONFIG:  # a fingerprint follows the codec's body
            body = max(body, header.body_nbytes)
        expected = dataclasses.replace(header, body_nbytes=body,
                                       param=self.param(*_nc(header.shape)))
        bad = header.mismatches(expected)
        if bad:
            raise WireFormatError(f"{self.spec}: inconsistent payload header: {', '.join(bad)}")
        verify_checksum(payload, header, self.spec)
        if out is None:
            out = torch.empty(header.shape, dtype=header.dtype, device=payload.device)
        elif (tuple(out.shape) != header.shape or out.dtype != header.dtype
              or out.device != payload.device):
            raise ValueError(
                f"{self.spec}: out has shape {tuple(out.shape)}, dtype {out.dtype} on "
                f"{out.device}; the payload holds shape {header.shape}, dtype {header.dtype} on "
                f"{payload.device}"
            )
        self.absorb(payload, header, None, out)
        return out

    # ------------------------------------------------------------------ shared plumbing

    def emit(
        self,
        x2: torch.Tensor,
        shape: tuple[int, ...],
        pred: torch.Tensor | None,
        ref_out: torch.Tensor | None,
        header: Header,
        state: Any = None,
        check: str | None = None,
        trailer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Allocate a payload, write ``header`` and the encoded body of 2-D ``x2``.

        ``check`` (a description of ``x2`` for the message) rejects NaN/Inf input with
        :class:`NonFiniteError` before ``ref_out`` is touched. ``trailer`` (uint8 bytes that
        ``header``'s body length counts beyond the codec's body: a stream's config
        fingerprint) ends the body."""
        layout = self.layout(x2.shape[0], x2.shape[1], x2.dtype)
        payload = torch.empty(header.payload_nbytes, dtype=torch.uint8, device=x2.device)
        header.write(payload)
        body = payload[header.nbytes:]
        if x2.numel() == 0:
            body.zero_()
        else:
            for start, end in layout.gaps:  # no stale memory on the wire
                body[start:end].zero_()
            if not self.fused_check:
                if check is not None:
                    check_finite(x2, check, self.kernels(x2.device))
                self.encode_into(x2, pred, ref_out, layout.views(body), state)
            elif not self.encode_into(x2, pred, ref_out, layout.views(body), state,
                                      check=check is not None):
                raise non_finite_error(x2, check)
        if trailer is not None:
            payload[payload.numel() - trailer.numel():].copy_(trailer)
        header.seal(payload)
        return payload

    def absorb(
        self, payload: torch.Tensor, header: Header, pred: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        """Decode the body of a validated ``payload`` into ``out`` (any shape; viewed 2-D)."""
        n, c = _nc(header.shape)
        if n * c == 0:
            return
        body = self.layout(n, c, header.dtype).views(payload[header.nbytes:])
        pred2 = None if pred is None else as_2d(pred)
        if out.is_contiguous():
            self.decode_into(body, pred2, out.view(n, c))
        else:
            tmp = torch.empty((n, c), dtype=out.dtype, device=out.device)
            self.decode_into(body, pred2, tmp)
            out.copy_(tmp.view(out.shape))
