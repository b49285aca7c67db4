"""Attention over image tokens spread across ranks: patch (gather), ring and Ulysses.

Every strategy computes, for this rank's local image queries (and the replicated text
queries, if the model attends jointly), softmax attention over the keys and values of *all*
image tokens plus the text tokens -- the same result as single-device attention, up to
floating-point summation order (exact for the raw exchange, approximate for compressed or
stale K/V). Text tokens are computed on every rank and never sent; Ulysses alone has to
all-gather the text tokens' attention *outputs*, because each rank computes them only for
its own heads.

Communication layout: K/V (and Ulysses' chunks) travel token-major as ``(B, n, H * D)`` so
that a codec's ``(N, C)`` view is tokens x channels, like the activations it was tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compressed_comm import Collectives

from ..stale import StaleGather

__all__ = ["TokenSplit", "ParallelAttention", "token_split"]


@dataclass(frozen=True)
class TokenSplit:
    """How ``total`` image tokens are split into contiguous per-rank ranges (uneven allowed)."""

    total: int
    counts: tuple[int, ...]

    @property
    def world(self) -> int:
        return len(self.counts)

    def start(self, rank: int) -> int:
        return sum(self.counts[:rank])

    def slice(self, rank: int) -> slice:
        return slice(self.start(rank), self.start(rank) + self.counts[rank])


def token_split(total: int, world: int) -> TokenSplit:
    """Balanced contiguous split: the first ``total % world`` ranks get one token more."""
    base, extra = divmod(total, world)
    return TokenSplit(total, tuple(base + (r < extra) for r in range(world)))


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, n, D) -> token-major (B, n, H * D), contiguous."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, H * D) -> (B, H, n, D)."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over one key block, with its log-sum-exp (float32)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse), v.float()), lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine per-block attention results into attention over the union of the blocks."""
    lse = torch.logsumexp(torch.cat([p[1] for p in parts], dim=-1), dim=-1, keepdim=True)
    out = torch.zeros_like(parts[0][0])
    for o, block_lse in parts:
        out += torch.exp(block_lse - lse) * o
    return out


@dataclass
class ParallelAttention:
    """One rank's attention strategy; ``exchange`` moves K/V (raw or compressed).

    ``mode`` is ``"patch"`` (all-gather K/V; with ``asynchronous`` the other ranks' K/V are
    one step stale after the first ``warmup`` (at least one) synchronous gathers of each
    stream, as in DistriFusion), ``"ring"`` (pass
    K/V blocks around the ring, merging partial results with log-sum-exp) or ``"ulysses"``
    (all-to-all from token shards to head shards and back).
    """

    exchange: Collectives
    split: TokenSplit
    mode: str = "patch"
    asynchronous: bool = False
    warmup: int = 1
    _stale: StaleGather = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._stale = StaleGather(self.warmup)

    @property
    def rank(self) -> int:
        return self.exchange.rank

    def __call__(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention outputs ``(image (B, H, n, D), text (B, H, T, D) or None)`` for local
        image q/k/v (B, H, n, D) and replicated text q/k/v (B, H, T, D)."""
        if q.shape[2] != self.split.counts[self.rank]:
            raise RuntimeError(f"{layer}: rank {self.rank} holds {q.shape[2]} image tokens, the "
                               f"split says {self.split.counts[self.rank]}")
        if self.mode == "patch":
            return self._patch(layer, q, k, v, text)
        if self.mode == "ring":
            return self._ring(layer, q, k, v, text)
        return self._ulysses(layer, q, k, v, text)

    def finish(self) -> None:
        """Complete transfers still in flight (asynchronous mode) at the end of a generation."""
        self._stale.finish()

    # ------------------------------------------------------------------ strategies

    def _shapes(self, like: torch.Tensor) -> list[tuple[int, ...]]:
        b, _, hd = like.shape
        return [(b, n, hd) for n in self.split.counts]

    def _gather(self, stream: str, local: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``local`` (token-major), fresh or -- asynchronously -- one step stale."""
        shapes = self._shapes(local)
        if self.asynchronous:
            return self._stale(self.exchange, local, stream, shapes)
        return self.exchange.all_gather(local, stream=stream, shapes=shapes)

    def _patch(self, layer, q, k, v, text):
        heads = q.shape[1]
        keys = torch.cat(self._gather(f"{layer}.k", _to_tokens(k)), dim=1)
        values = torch.cat(self._gather(f"{layer}.v", _to_tokens(v)), dim=1)
        keys, values = _to_heads(keys, heads), _to_heads(values, heads)
        n = q.shape[2]
        if text is not None:
            q = torch.cat([q, text[0]], dim=2)
            keys = torch.cat([keys, text[1]], dim=2)
            values = torch.cat([values, text[2]], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)
        return out[:, :, :n], (out[:, :, n:] if text is not None else None)

    def _ring(self, layer, q, k, v, text):
        heads = q.shape[1]
        n = q.shape[2]
        queries = q if text is None else torch.cat([q, text[0]], dim=2)
        shapes = self._shapes(_to_tokens(k))
        blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for (origin, kb), (_, vb) in zip(
                self.exchange.ring_iter(_to_tokens(k), stream=f"{layer}.k", shapes=shapes),
                self.exchange.ring_iter(_to_tokens(v), stream=f"{layer}.v", shapes=shapes)):
            blocks[origin] = _partial(queries, _to_heads(kb, heads), _to_heads(vb, heads))
        # merge in one fixed order on every rank, so replicated text outputs stay identical
        parts = [blocks[o] for o in range(self.split.world)]
        if text is not None:
            parts.append(_partial(queries, text[1], text[2]))
        out = _merge(parts).to(q.dtype)
        return out[:, :, :n], (out[:, :, n:] if text is not None else None)

    def _ulysses(self, layer, q, k, v, text):
        world, me = self.split.world, self.rank
        b, heads, n, d = q.shape
        if heads % world:
            raise ValueError(f"{layer}: Ulysses needs the head count ({heads}) to be a multiple "
                             f"of the world size ({world})")
        hg = heads // world
        counts = self.split.counts

        def scatter_heads(x: torch.Tensor, stream: str) -> torch.Tensor:
            # (B, H, n, D) -> all tokens of my head group, (B, hg, N, D)
            chunks = [_to_tokens(x[:, g * hg:(g + 1) * hg]).reshape(b * n, hg * d)
                      for g in range(world)]
            out = self.exchange.all_to_all(torch.cat(chunks), stream=stream,
                                           input_split_sizes=[b * n] * world,
                                           output_split_sizes=[b * c for c in counts])
            parts = [p.view(b, c, hg * d) for p, c in zip(out.split([b * c for c in counts]),
                                                            counts)]
            return _to_heads(torch.cat(parts, dim=1), hg)

        qs, ks, vs = (scatter_heads(t, f"{layer}.{name}") for t, name in
                      ((q, "q"), (k, "k"), (v, "v")))
        mine = slice(me * hg, (me + 1) * hg)
        total = qs.shape[2]
        if text is not None:
            qs = torch.cat([qs, text[0][:, mine]], dim=2)
            ks = torch.cat([ks, text[1][:, mine]], dim=2)
            vs = torch.cat([vs, text[2][:, mine]], dim=2)
        out = F.scaled_dot_product_attention(qs, ks, vs)
        # back: image tokens of rank r, my heads -> rank r; receive my tokens, every head group
        img = _to_tokens(out[:, :, :total])
        chunks = [img[:, self.split.slice(r)].reshape(b * counts[r], hg * d) for r in range(world)]
        back = self.exchange.all_to_all(torch.cat(chunks), stream=f"{layer}.o",
                                        input_split_sizes=[b * c for c in counts],
                                        output_split_sizes=[b * n] * world)
        image = torch.cat([p.view(b, n, hg * d) for p in back.split(b * n)], dim=2)
        image = _to_heads(image, heads)
        if text is None:
            return image, None
        text_out = self.exchange.all_gather(_to_tokens(out[:, :, total:]),
                                            stream=f"{layer}.text_out")
        return image, _to_heads(torch.cat(text_out, dim=2), heads)

