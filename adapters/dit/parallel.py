"""Run a diffusers DiT across ranks: split image tokens, parallel attention, gather output.

``parallelize(transformer, transport, ParallelConfig(...))`` installs, on this rank's copy of
the model, (1) a hook that keeps only this rank's contiguous share of the image tokens right
after the patch embedding (positional embeddings are computed on the full grid first),
(2) parallel attention processors on every image self-attention, and (3) a hook that
all-gathers the output tokens (exactly) before the unpatchify, so the model's output is the
full tensor on every rank. Text tokens are replicated: every rank embeds and updates them.

Each call of the transformer is one denoising step, unless calls are tagged
(:meth:`DiTParallel.tag`: ``"cond"``, ``"uncond"`` for guidance run as two calls per step) or
steps are marked by a pipeline's scheduler (:func:`adapters.xdit.enable_compression` with
``patch=``): every call of a step then has its own streams (:mod:`adapters.calls`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch._library.effects import EffectType

from compressed_comm import (
    CompressedGroup,
    CompressionConfig,
    RawGroup,
    SessionStats,
    Transport,
    ops,
)
from compressed_comm.group import DEFAULT_TIMEOUT

from ..calls import StepCalls
from .attention import ParallelAttention, TokenSplit, token_split
from .processors import CogVideoXProcessor, FluxProcessor, JointProcessor, SelfProcessor

__all__ = ["ParallelConfig", "DiTParallel", "parallelize", "SUPPORTED_MODELS", "PARALLELISMS"]

PARALLELISMS = ("patch", "ring", "ulysses")

#: model class -> (processor class names replaced, our processor, module whose output holds
#: the full image tokens)
SUPPORTED_MODELS: Mapping[str, tuple[tuple[str, ...], type, str]] = MappingProxyType({
    "FluxTransformer2DModel": (("FluxAttnProcessor",), FluxProcessor, "x_embedder"),
    "SD3Transformer2DModel": (("JointAttnProcessor2_0",), JointProcessor, "pos_embed"),
    "PixArtTransformer2DModel": (("AttnProcessor2_0",), SelfProcessor, "pos_embed"),
    "CogVideoXTransformer3DModel": (("CogVideoXAttnProcessor2_0",), CogVideoXProcessor,
                                    "patch_embed"),
})


@dataclass(frozen=True)
class ParallelConfig:
    """How the transformer runs across ranks.

    * ``parallelism`` -- ``"patch"`` (each rank's attention all-gathers K/V of the other
      patches), ``"ring"`` (K/V blocks travel the ring) or ``"ulysses"`` (all-to-all from
      token shards to head shards).
    * ``compression`` -- None sends K/V raw (exact parallel result); a
      :class:`~compressed_comm.CompressionConfig` sends residual-compressed K/V.
    * ``asynchronous`` -- DistriFusion-style: after ``warmup`` synchronous steps, the other
      patches' K/V are those gathered one step earlier, and this step's gather overlaps
      compute. Patch parallelism only; combines with compression.
    * ``timeout`` -- seconds any transfer may take before it raises.
    """

    parallelism: str = "patch"
    compression: CompressionConfig | None = None
    asynchronous: bool = False
    warmup: int = 1
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"unknown parallelism {self.parallelism!r}; expected one of "
                             f"{', '.join(PARALLELISMS)}")
        if self.asynchronous and self.parallelism != "patch":
            raise ValueError(f"asynchronous (DistriFusion-style) exchange needs patch "
                             f"parallelism, not {self.parallelism!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


class DiTParallel:
    """The parallel state of one rank's transformer; created by :func:`parallelize`.

    ``calls``: the :class:`~adapters.calls.StepCalls` of an owner that marks steps and
    begins calls itself (a pipeline's hooks); by default each call of the model begins one.
    """

    def __init__(self, model: torch.nn.Module, transport: Transport,
                 config: ParallelConfig, calls: StepCalls | None = None) -> None:
        name = type(model).__name__
        if name not in SUPPORTED_MODELS:
            raise ValueError(f"unsupported model {name}; supported: {', '.join(SUPPORTED_MODELS)}")
        self.model = model
        self.config = config
        self.exchange = (CompressedGroup(transport, config.compression, timeout=config.timeout)
                         if config.compression is not None else
                         RawGroup(transport, timeout=config.timeout))
        self._output = RawGroup(transport, timeout=config.timeout)
        self.rank, self.world_size = transport.rank, transport.world_size
        self._owns_calls = calls is None
        self.calls = StepCalls() if calls is None else calls
        self.calls.on_step_end(self._step_ended)
        self._text_len = 0
        self._compiled_layers = 0  # attention layers run by dit_attend in this call
        self._attention: ParallelAttention | None = None
        self._hooks: list[Any] = []
        self._processors: dict[str, Any] = {}
        #: how compiled graphs reach this object (:func:`dit_attend`)
        self.key = ops.bind(self)
        self._install(name)

    def __repr__(self) -> str:
        return (f"DiTParallel({type(self.model).__name__}, rank={self.rank}/{self.world_size}, "
                f"{self.config.parallelism}, step={self.step})")

    # ------------------------------------------------------------------ public

    @property
    def step(self) -> int:
        """Denoising steps completed in this generation (a step ends when the next begins)."""
        return self.calls.step

    def tag(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Calls of the model inside run on streams of their own, named ``name``: tag each
        call of a step (``"cond"``, ``"uncond"``) when guidance runs as several calls per
        step; a tag seen again starts the next step."""
        return self.calls.tagged(name)

    @property
    def split(self) -> TokenSplit | None:
        """The split of the image tokens over ranks (known after the first step)."""
        return self._attention.split if self._attention is not None else None

    def new_generation(self) -> None:
        """Start a new request: finish pending transfers, drop residual state (every rank)."""
        if self._attention is not None:
            self._attention.finish()
        self.exchange.new_session()
        self._output.new_session()
        self._attention = None
        self.calls.reset()

    def finish(self) -> None:
        """Complete transfers still in flight (call at the end of a generation)."""
        if self._attention is not None:
            self._attention.finish()

    def stats(self) -> SessionStats | None:
        """Per-stream statistics of the compressed exchange (None for the raw exchange)."""
        return self.exchange.stats() if isinstance(self.exchange, CompressedGroup) else None

    def remove(self) -> None:
        """Restore the original processors and remove every hook."""
        self.finish()
        modules = dict(self.model.named_modules())
        for name, proc in self._processors.items():
            modules[name].set_processor(proc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._processors.clear()

    # ------------------------------------------------------------------ installation

    def _install(self, model_name: str) -> None:
        replaced, processor_cls, embed_name = SUPPORTED_MODELS[model_name]
        modules = dict(self.model.named_modules())
        targets = []
        for name, module in modules.items():
            proc = getattr(module, "processor", None)
            if proc is None or not self._is_self_attention(model_name, name, module):
                continue
            if type(proc).__name__ not in replaced:
                raise ValueError(f"{model_name}.{name}: unsupported attention processor "
                                 f"{type(proc).__name__}; expected {' or '.join(replaced)}")
            targets.append((name, module, proc))
        if not targets:
            raise ValueError(f"{model_name}: found no attention layers to parallelise")
        for name, module, proc in targets:
            self._processors[name] = proc
            # one callable for every processor: compiled blocks then share one graph
            module.set_processor(processor_cls(name, self._attend, self._text_length))
        self._hooks.append(self.model.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        self._hooks.append(modules[embed_name].register_forward_hook(self._split_tokens))
        self._hooks.append(modules["proj_out"].register_forward_hook(self._gather_tokens))

    @staticmethod
    def _is_self_attention(model_name: str, name: str, module: Any) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        if model_name == "PixArtTransformer2DModel":
            return leaf == "attn1"
        if model_name == "CogVideoXTransformer3DModel":
            return leaf == "attn1"
        return leaf in ("attn", "attn2")  # Flux and SD3 (attn2: SD3.5 dual attention)

    # ------------------------------------------------------------------ hooks

    def _text_length(self) -> int:
        return self._text_len

    def _begin_step(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._owns_calls:
            self.calls.begin_call()
        self._compiled_layers = 0
        ehs = kwargs.get("encoder_hidden_states")
        self._text_len = ehs.shape[1] if ehs is not None else 0
        img_ids = kwargs.get("img_ids")
        if img_ids is not None:
            # Flux: rotary positions come from img_ids; keep this rank's rows
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            kwargs["img_ids"] = ids[self._ensure_split(ids.shape[0]).slice(self.rank)]
        rotary = kwargs.get("image_rotary_emb")
        if rotary is not None:
            # CogVideoX: the rotary table covers all video tokens; keep this rank's rows
            local = self._ensure_split(rotary[0].shape[0]).slice(self.rank)
            kwargs["image_rotary_emb"] = tuple(r[local] for r in rotary)
        return args, kwargs

    def _step_ended(self) -> None:
        self.exchange.step()
        self._output.step()

    def _ensure_split(self, total: int) -> TokenSplit:
        """The split of ``total`` image tokens (created on the first step of a generation)."""
        if self._attention is not None and self._attention.split.total == total:
            return self._attention.split
        if self._attention is not None and self.step:
            raise RuntimeError(f"rank {self.rank}: the image token count changed from "
                               f"{self._attention.split.total} to {total} within a "
                               "generation; call new_generation() between requests")
        self._attention = ParallelAttention(
            self.exchange, token_split(total, self.world_size), self.config.parallelism,
            self.config.asynchronous, self.config.warmup)
        return self._attention.split

    def _split_tokens(self, module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        text = args[0].shape[1] if type(self.model).__name__ == "CogVideoXTransformer3DModel" else 0
        local = self._ensure_split(output.shape[1] - text).slice(self.rank)
        if text:
            return torch.cat([output[:, :text], output[:, text:][:, local]], dim=1)
        # contiguous: compiled blocks see one layout in every block (one graph)
        return output[:, local].contiguous()

    def _gather_tokens(self, module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        split = self._attention.split
        b, _, c = output.shape
        parts = self._output.all_gather(output.contiguous(), stream="output",
                                        shapes=[(b, n, c) for n in split.counts])
        return torch.cat(parts, dim=1)

    def _attend(self, proc: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                text: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention of processor ``proc``: :meth:`attend_now` of its layer, or inside a
        compiled graph the custom op :func:`dit_attend` (one opaque node, no graph break)
        that runs it. The layer's name stays out of the graph (one graph serves every
        block): streams there are named in call order, ``compiled.attn<n>``."""
        if torch.compiler.is_compiling():
            tq, tk, tv = (None, None, None) if text is None else text
            outs = dit_attend(q, k, v, tq, tk, tv, self.key)
            return outs[0], (outs[1] if len(outs) > 1 else None)
        return self.attend_now(proc.layer, q, k, v, text)

    def attend_next(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    text: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`attend_now` as the next attention layer of this call run in a compiled
        graph (``compiled.attn<n>``)."""
        n, self._compiled_layers = self._compiled_layers, self._compiled_layers + 1
        return self.attend_now(f"compiled.attn{n}", q, k, v, text)

    def attend_now(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   text: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's parallel attention of layer ``layer`` in the current call."""
        if self._attention is None:
            raise RuntimeError(f"{layer}: attention ran before the image tokens were split")
        return self._attention(self.calls.prefix + layer, q, k, v, text)


@torch.library.custom_op("compressed_comm::dit_attend", mutates_args=())
def dit_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_q: torch.Tensor | None,
               text_k: torch.Tensor | None, text_v: torch.Tensor | None,
               binding: str) -> list[torch.Tensor]:
    """:meth:`DiTParallel.attend_next` of the :class:`DiTParallel` bound as ``binding``
    (:func:`compressed_comm.ops.bind`): the image output ``(B, H, n, D)`` and, with text
    q/k/v, the text output ``(B, H, T, D)``, as new contiguous tensors."""
    owner = ops.bound(binding)
    if not isinstance(owner, DiTParallel):
        raise TypeError(f"binding {binding!r} is a {type(owner).__name__}, not a DiTParallel")
    text = None if text_q is None or text_k is None or text_v is None else (text_q, text_k,
                                                                            text_v)
    image, text_out = owner.attend_next(q, k, v, text)
    outs = [image] if text_out is None else [image, text_out]
    return [t.clone(memory_format=torch.contiguous_format) for t in outs]


@dit_attend.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_q: torch.Tensor | None,
      text_k: torch.Tensor | None, text_v: torch.Tensor | None,
      binding: str) -> list[torch.Tensor]:
    return [torch.empty(t.shape, dtype=q.dtype) for t in (q, text_q) if t is not None]


# the exchange's streams and references are state outside any graph: keep every call, in order
torch.library._register_effectful_op("compressed_comm::dit_attend", EffectType.ORDERED)


def parallelize(model: torch.nn.Module, transport: Transport,
                config: ParallelConfig | None = None, *,
                calls: StepCalls | None = None) -> DiTParallel:
    """Make this rank's ``model`` (a supported diffusers transformer) run across
    ``transport``'s ranks; every rank calls it on its own copy of the same model
    (``calls``: see :class:`DiTParallel`)."""
    return DiTParallel(model, transport, config or ParallelConfig(), calls)
