"""Network and GPU cost model: how long a collective takes on a link, and a step's time.

Presets describe interconnects (:data:`LINKS`) and GPUs (:data:`GPUS`) with *achieved*
numbers, not datasheet peaks; each preset's ``description`` says where its numbers come
from. :func:`collective_seconds` prices one collective with a ring/pairwise model and
:func:`estimate_step` combines compute and communication, with or without overlap.

The model is deliberately simple (alpha-beta, no congestion, no protocol switching by
message size); it is meant for comparing methods on one link, not for predicting a
cluster to the millisecond.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

__all__ = [
    "Link",
    "GPU",
    "LINKS",
    "GPUS",
    "COLLECTIVES",
    "get_link",
    "parse_link",
    "get_gpu",
    "collective_seconds",
    "StepEstimate",
    "estimate_step",
]

GB = 1e9
GIB = 1024**3
TFLOPS = 1e12


@dataclass(frozen=True)
class Link:
    """An interconnect between the GPUs of one parallel group."""

    name: str
    description: str    # what the link is and where the numbers come from
    bandwidth: float    # achieved bytes/s, per direction, per GPU
    latency: float      # seconds per message (per hop), software included

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be positive, "
                             f"got {self.bandwidth}")
        if not self.latency >= 0:
            raise ValueError(f"link {self.name!r}: latency must be >= 0, got {self.latency}")

    def seconds(self, nbytes: float) -> float:
        """Time for one message of ``nbytes`` over one hop: latency + nbytes / bandwidth."""
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class GPU:
    """A GPU's dense bf16 throughput and memory."""

    name: str
    peak_bf16_flops: float      # dense (no sparsity) bf16 tensor-core FLOP/s, datasheet
    achieved_fraction: float    # share of the peak a DiT step achieves end to end
    memory_bytes: int
    description: str = ""       # sources and reasoning
    #: achieved device-memory bytes/s (a codec's passes over a message run at this rate)
    memory_bandwidth: float = 1e12

    def __post_init__(self) -> None:
        if not self.peak_bf16_flops > 0:
            raise ValueError(f"GPU {self.name!r}: peak_bf16_flops must be positive")
        if not 0 < self.achieved_fraction <= 1:
            raise ValueError(f"GPU {self.name!r}: achieved_fraction must be in (0, 1], got "
                             f"{self.achieved_fraction}")

    @property
    def achieved_flops(self) -> float:
        """FLOP/s this model assumes a DiT step runs at."""
        return self.peak_bf16_flops * self.achieved_fraction


def _links(*links: Link) -> Mapping[str, Link]:
    return MappingProxyType({link.name: link for link in links})


def _gpus(*gpus: GPU) -> Mapping[str, GPU]:
    return MappingProxyType({gpu.name: gpu for gpu in gpus})


#: Interconnect presets, keyed by name. Bandwidths are achieved large-message rates per
#: direction per GPU with every GPU of the group sending at once; latencies are per
#: message and include the collective library's software overhead.
LINKS: Mapping[str, Link] = _links(
    Link(
        "nvlink4",
        "H100 SXM NVLink 4 through NVSwitch. Nominal 450 GB/s per direction (18 links x "
        "25 GB/s). cuda-samples p2pBandwidthLatencyTest on HGX H100 measures ~376 GB/s "
        "unidirectional (NVIDIA/nccl#1264) and NCCL tops out near 360 GB/s per direction "
        "(NVIDIA/nccl-tests#312), so 360 GB/s. Latency 3 us per hop: ~1-2 us NVLink "
        "load/store latency plus NCCL's per-step synchronisation.",
        bandwidth=360 * GB,
        latency=3e-6,
    ),
    Link(
        "pcie4",
        "PCIe 4.0 x16 with GPU peer-to-peer (A100 PCIe, L40). Nominal 31.5 GB/s per "
        "direction (16 GT/s x 16 lanes, 128b/130b); ~25 GB/s is the measured peak after TLP "
        "overheads (ZaidQureshi/bam#54; p2pBandwidthLatencyTest on Gen4 boards); 22 GB/s "
        "assumed when every GPU of a ring sends at once through a shared switch or root "
        "complex. Latency 5 us: ~2 us P2P write latency plus NCCL proxy/synchronisation.",
        bandwidth=22 * GB,
        latency=5e-6,
    ),
    Link(
        "pcie-host",
        "PCIe without P2P (typical of L20 / RTX 4090 boxes): every transfer is staged "
        "through pinned host memory (NCCL SHM transport), so each hop is two DMA copies and "
        "all GPUs contend for the root complex and DRAM. A single pair copies at 20-22 GB/s "
        "(P2P-disabled p2pBandwidthLatencyTest on 6x RTX 4090, NVIDIA/nccl#814), but NCCL "
        "collectives on 8x L20 through SHM average ~6 GB/s bus bandwidth over all sizes "
        "(NVIDIA/nccl#1817); 10 GB/s per direction assumed for large messages on 4-8 GPUs. "
        "Latency 15 us: two copies plus host-side flag polling.",
        bandwidth=10 * GB,
        latency=15e-6,
    ),
    Link(
        "100gbe",
        "100 Gb Ethernet with RoCE v2 (GPUDirect RDMA), one NIC per GPU. Line rate "
        "12.5 GB/s; RDMA write benchmarks reach ~92-95 Gb/s and NCCL's net transport about "
        "88% of line rate, so 11 GB/s. Latency 10 us: ~2-3 us NIC+switch plus NCCL proxy "
        "thread and PCIe crossings.",
        bandwidth=11 * GB,
        latency=10e-6,
    ),
    Link(
        "25gbe",
        "25 Gb Ethernet, TCP (NCCL socket transport), one NIC per GPU. Line rate "
        "3.125 GB/s; TCP goodput at MTU 1500 is at most 1448/1538 = 94% of it (iperf3 "
        "reaches ~23.5 Gb/s), NCCL sockets a little less: 2.8 GB/s. Latency 25 us: kernel "
        "TCP stack both ends, GPU<->host copies, switch.",
        bandwidth=2.8 * GB,
        latency=25e-6,
    ),
    Link(
        "10gbe",
        "10 Gb Ethernet, TCP (NCCL socket transport), one NIC per GPU. Line rate "
        "1.25 GB/s; iperf3 TCP goodput at MTU 1500 is ~9.4 Gb/s (1448/1538 of line rate), "
        "so 1.15 GB/s with NCCL's socket overhead. Latency 30 us: kernel TCP stack both "
        "ends, GPU<->host copies, switch.",
        bandwidth=1.15 * GB,
        latency=30e-6,
    ),
    Link(
        "1gbe",
        "1 Gb Ethernet, TCP. Line rate 125 MB/s; iperf3 TCP goodput ~940 Mb/s at MTU 1500, "
        "so 115 MB/s. Latency 50 us: 12 us to serialise one 1500-byte frame plus the TCP "
        "stacks and switch.",
        bandwidth=0.115 * GB,
        latency=50e-6,
    ),
)

#: GPU presets, keyed by name. Peaks are datasheet dense bf16 tensor-core rates.
GPUS: Mapping[str, GPU] = _gpus(
    GPU(
        "l20",
        peak_bf16_flops=119.5 * TFLOPS,
        achieved_fraction=0.66,
        memory_bytes=48 * GIB,
        description="NVIDIA L20 (AD102, PCIe 4.0 x16, 48 GB GDDR6 at 864 GB/s, no NVLink): "
        "119.5 TFLOPS dense fp16/bf16 (2x its 59.8 TFLOPS fp32; about a third of an L40S). "
        "Achieved 0.66, calibrated: FLUX.1-dev, 1024x1024, 28 steps, plain diffusers on one "
        "L20 takes 26.36 s (chengzeyi/ParaAttention doc/fastest_flux.md, commit 4de137c), "
        "which this model's FLOP count reaches at 0.66 of peak (text encoder and VAE, a few "
        "percent of that time, included in the measurement).",
        memory_bandwidth=0.864e12 * 0.8,  # 864 GB/s GDDR6 (datasheet) at 80 % achieved
    ),
    GPU(
        "a100",
        peak_bf16_flops=312 * TFLOPS,
        achieved_fraction=0.5,
        memory_bytes=80 * GIB,
        description="NVIDIA A100 SXM4 80 GB: 312 TFLOPS dense bf16 (datasheet). Achieved "
        "0.5: with it, this model's FLOP count for CogVideoX-2b (50 steps, CFG) gives "
        "~77 s of transformer time against the model card's ~90 s per video on one A100, "
        "VAE decoding included.",
        memory_bandwidth=2.039e12 * 0.8,  # 2039 GB/s HBM2e (datasheet) at 80 % achieved
    ),
    GPU(
        "h100",
        peak_bf16_flops=989 * TFLOPS,
        achieved_fraction=0.31,
        memory_bytes=80 * GIB,
        description="NVIDIA H100 SXM5 80 GB: 989 TFLOPS dense bf16 (datasheet). Achieved "
        "0.31, calibrated: FLUX.1-dev, 1024px, 28 steps on one H100 takes 6.71 s with "
        "PyTorch (4.30 s with torch.compile; xdit-project/xDiT docs/performance/flux.md, "
        "commit 248abec), which this model's FLOP count reaches at 0.31 of peak; the "
        "CogVideoX-2b model card's ~45 s per video on one H100 (VAE included) suggests 0.35.",
        memory_bandwidth=3.35e12 * 0.8,  # 3.35 TB/s HBM3 (datasheet) at 80 % achieved
    ),
    GPU(
        "h20",
        peak_bf16_flops=148 * TFLOPS,
        achieved_fraction=0.65,
        memory_bytes=96 * GIB,
        description="NVIDIA H20 (Hopper, 96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s): 148 "
        "TFLOPS dense fp16/bf16 (published specification). Achieved 0.65 (assumption): "
        "with ~37 FLOP/B of machine balance, DiT GEMMs and attention are firmly compute "
        "bound and run closer to peak than on an H100.",
        memory_bandwidth=4.0e12 * 0.8,  # 4.0 TB/s HBM3 (datasheet) at 80 % achieved
    ),
)

#: The collectives :func:`collective_seconds` prices.
COLLECTIVES = ("all_gather", "ring", "all_to_all", "p2p")


def choose(table: Mapping[str, Any], name: str, what: str) -> Any:
    """``table[name]`` (case-insensitive); ``ValueError`` listing the choices if unknown."""
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        return table[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}") from None


_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)(bit|bps|B/s)\s*$",
                   re.IGNORECASE)
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(ns|us|ms|s)\s*$")
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_link(spec: str) -> Link:
    """A link a user describes as ``RATE[,LATENCY]``: ``800mbit``, ``25gbit,20us``,
    ``10GB/s,5us`` (``bit``/``bps``: bits per second, ``B/s``: bytes per second; decimal
    prefixes k, M, G, T; latency in ns, us, ms or s, 0 if left out). The rate is what one
    GPU achieves per direction. ``ValueError`` naming the expected form otherwise."""
    rate, _, latency = spec.partition(",")
    m = _RATE.match(rate)
    t = _TIME.match(latency) if latency else None
    if m is None or (latency and t is None):
        raise ValueError(
            f"link {spec!r}: expected a preset ({', '.join(LINKS)}) or RATE[,LATENCY] such as "
            "'800mbit', '25gbit,20us' or '10GB/s,5us'")
    value = float(m.group(1)) * _PREFIX[m.group(2).lower()]
    bandwidth = value if m.group(3) == "B/s" else value / 8
    seconds = float(t.group(1)) * _SECONDS[t.group(2)] if t else 0.0
    return Link(spec.strip(), f"user-described link: {bandwidth / GB:.4g} GB/s per direction, "
                f"{seconds * 1e6:.4g} us per message", bandwidth=bandwidth, latency=seconds)


def get_link(name: str) -> Link:
    """The :data:`LINKS` preset ``name``, or a link described as ``RATE[,LATENCY]``
    (:func:`parse_link`); ``ValueError`` listing the choices if neither."""
    if isinstance(name, str) and name.strip().lower() in LINKS:
        return LINKS[name.strip().lower()]
    return parse_link(name)


def get_gpu(name: str) -> GPU:
    """The :data:`GPUS` preset ``name``; ``ValueError`` listing the choices if unknown."""
    return choose(GPUS, name, "GPU")


def collective_seconds(kind: str, message_bytes: float, world: int, link: Link) -> float:
    """Seconds for one collective of ``world`` ranks over ``link``.

    ``message_bytes`` is each rank's message: its block for ``all_gather`` and ``ring``,
    the bytes it sends to *each* other rank for ``all_to_all``, the one message for
    ``p2p``. The model (alpha-beta, every rank sending and receiving at once over its own
    link, one hop costing ``latency + bytes / bandwidth``):

    * ``all_gather``: ring algorithm, ``world - 1`` steps, each rank forwarding one block
      per step: ``(world - 1) * (latency + B / bandwidth)``;
    * ``ring``: a ring pass of one block per rank (ring attention), ``world - 1`` hops,
      same cost as ``all_gather``;
    * ``all_to_all``: pairwise exchange, ``world - 1`` rounds, each rank sending ``B`` to
      one peer per round: ``(world - 1) * (latency + B / bandwidth)``;
    * ``p2p``: one message, one hop: ``latency + B / bandwidth``.

    A world of one rank communicates nothing: 0.
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}; choose one of {', '.join(COLLECTIVES)}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    if message_bytes < 0:
        raise ValueError(f"message_bytes must be >= 0, got {message_bytes}")
    if world == 1:
        return 0.0
    if kind == "p2p":
        return link.seconds(message_bytes)
    return (world - 1) * link.seconds(message_bytes)


@dataclass(frozen=True)
class StepEstimate:
    """The time of one denoising step on one rank."""

    compute_s: float
    comm_s: float           # all communication of the step
    exposed_comm_s: float   # the part not hidden behind compute
    step_s: float           # compute + exposed communication
    overlap: bool           # communication runs during compute (asynchronous)


def estimate_step(compute_s: float, comm_s: float, overlap: bool,
                  blocking_s: float = 0.0, hides: float = 1.0) -> StepEstimate:
    """Step time from compute and communication seconds.

    Synchronous (``overlap=False``): the step waits for all of its communication,
    ``compute + comm``. Asynchronous (``overlap=True``, DistriFusion-style stale
    activations): communication runs during compute and only ``max(0, comm - compute)``
    is exposed, except ``blocking_s`` of it (control exchanges: they block),
    which is always exposed. ``hides`` is the share of the overlapped communication that
    can hide at all (1: all of it, up to the compute); the rest is exposed.
    """
    if compute_s < 0 or comm_s < 0:
        raise ValueError(f"compute_s and comm_s must be >= 0, got {compute_s}, {comm_s}")
    if not 0 <= blocking_s <= comm_s:
        raise ValueError(f"blocking_s must be in [0, comm_s={comm_s}], got {blocking_s}")
    if not 0 <= hides <= 1:
        raise ValueError(f"hides must be in [0, 1], got {hides}")
    hidden = min(hides * (comm_s - blocking_s), compute_s) if overlap else 0.0
    exposed = comm_s - hidden
    return StepEstimate(compute_s=compute_s, comm_s=comm_s, exposed_comm_s=exposed,
                        step_s=compute_s + exposed, overlap=overlap)
