"""Train the photos model: ``python -m simulator.train_photos``.

Rectified-flow training of :class:`~simulator.photos.PhotosModel` (a Flux transformer with
:data:`~simulator.photos.TRANSFORMER_CONFIG`) on random 64x64 crops of the photos of
:data:`~simulator.photos.PHOTOS` (see :func:`train`). Options: ``--steps N``, ``--out
PATH``, ``--seed S``, ``--threads T``, ``--log PATH`` (the loss of every step, as text),
``--plot PATH`` (the loss curve, PNG), ``--checkpoint-every N`` (also write the EMA weights
every N steps).

It writes ``photos_flux.safetensors``, ``photos_flux_loss.txt`` and
``photos_flux_loss.png`` in the current folder unless told otherwise; the shipped weights
are replaced only when ``--out`` names them. How the committed
``simulator/weights/photos_flux.safetensors`` was made::

    python -m simulator.train_photos        # = --steps 3000 --seed 0 --threads 1
    cp photos_flux.safetensors simulator/weights/; cp photos_flux_loss.png docs/photos_loss.png

with the defaults below (batch 4, AdamW lr 1e-3 with 50 warmup steps and cosine decay to
1e-4, no weight decay, uniform t, EMA decay 0.995, label dropout 0.1 to the null label for
classifier-free guidance), torch 2.13.0+cpu, diffusers 0.42.1, one thread on a 2-core AMD
EPYC shared with other jobs: training loop 1435 s (24 min; 2.0-2.2 steps/s); loss (mean of
the last 100 steps) 0.1758; means over 250 steps from step 2000 on 0.186, 0.187, 0.178,
0.180: the curve (``docs/photos_loss.png``) has levelled off. The EMA weights in float16
are 956,552 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .photos import NULL_LABEL, WEIGHTS, PhotosModel, load_photos, pack, random_crops
from .training import FlowTrainer, TrainResult, save_weights

__all__ = ["TrainResult", "train", "plot_losses", "main"]

# Defaults of the committed weights.
STEPS = 3000
SEED = 0
BATCH_SIZE = 4
LR = 1e-3
WARMUP = 50
EMA_DECAY = 0.995
LABEL_DROPOUT = 0.1


def train(steps: int = STEPS, seed: int = SEED, *, batch_size: int = BATCH_SIZE, lr: float = LR,
          warmup: int = WARMUP, ema_decay: float = EMA_DECAY,
          label_dropout: float = LABEL_DROPOUT, config: Mapping[str, Any] | None = None,
          log: Path | None = None, checkpoint: Path | None = None, checkpoint_every: int = 0,
          progress: bool = True) -> TrainResult:
    """Rectified-flow training of a :class:`PhotosModel` on :func:`random_crops`.

    Each step draws ``batch_size`` crops ``x_0`` (uniform photo, uniform offset), noise
    ``eps`` and uniform times ``t``, forms ``x_t = (1 - t) x_0 + t eps`` on the packed
    tokens and regresses the velocity ``eps - x_0`` with MSE; each crop's label is replaced
    by :data:`~simulator.photos.NULL_LABEL` with probability ``label_dropout``, so the model
    also learns the unconditional velocity that guidance needs. AdamW (no weight decay),
    linear warmup then cosine decay to 10% of ``lr``; an exponential moving average of the
    weights (decay ``min(ema_decay, (1 + n) / (10 + n))`` at step ``n``) is returned.
    ``log`` gets one ``step loss`` line per step (flushed); with ``checkpoint_every`` the EMA
    weights are also written to ``checkpoint`` every that many steps. Deterministic for a
    given ``seed`` and thread count; the global RNG state is restored afterwards.
    """
    from tqdm import tqdm

    photos = load_photos()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PhotosModel(config)
    gen = torch.Generator().manual_seed(seed + 1)
    trainer = FlowTrainer(model, steps=steps, lr=lr, warmup=warmup, ema_decay=ema_decay)

    losses: list[float] = []
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(open(log, "w")) if log is not None else None
        bar = tqdm(range(steps), desc="train", disable=not progress, mininterval=5.0)
        for step in bar:
            images, labels = random_crops(photos, batch_size, gen)
            drop = torch.rand(batch_size, generator=gen) < label_dropout
            labels = torch.where(drop, NULL_LABEL, labels)
            x0 = pack(images)
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.rand(batch_size, generator=gen)
            tb = t.view(-1, 1, 1)
            loss = torch.nn.functional.mse_loss(
                model.velocity((1 - tb) * x0 + tb * eps, t, labels), eps - x0)
            losses.append(trainer.step(loss, step))
            if log_file is not None:
                log_file.write(f"{step} {losses[-1]:.6f}\n")
                log_file.flush()
            if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                save_weights(trainer.ema, checkpoint, extra={"steps": str(step + 1)})
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return TrainResult(trainer.ema, losses, time.perf_counter() - start)


def plot_losses(losses: list[float], path: Path | str, window: int = 50) -> None:
    """The loss per step (faint) and its running mean over ``window`` steps, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    y = np.asarray(losses, dtype=np.float64)
    w = max(1, min(window, len(y)))
    mean = np.convolve(y, np.ones(w) / w, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(len(y)), y, color="0.8", lw=0.6, label="loss per step")
    ax.plot(np.arange(w - 1, len(y)), mean, color="C0", lw=1.5, label=f"mean of {w} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.set_title("photos model (Flux, 1024 tokens): training loss")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator.train_photos",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("photos_flux.safetensors"),
                        help="safetensors file to write (%(default)s; the shipped weights: "
                             f"{WEIGHTS.relative_to(WEIGHTS.parents[2])})")
    parser.add_argument("--seed", type=int, default=SEED, help="seed (%(default)s)")
    parser.add_argument("--label-dropout", type=float, default=LABEL_DROPOUT,
                        help="probability that a crop is trained with the null label "
                             "(%(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (%(default)s; the result depends on it)")
    parser.add_argument("--log", type=Path, default=Path("photos_flux_loss.txt"),
                        help="loss of every step (%(default)s)")
    parser.add_argument("--plot", type=Path, default=Path("photos_flux_loss.png"),
                        help="loss curve (%(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="also write the EMA weights every N steps (0: only at the end)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(f"training {args.steps} steps -> {args.out}", flush=True)
    result = train(args.steps, args.seed, label_dropout=args.label_dropout, log=args.log,
                   checkpoint=args.out, checkpoint_every=args.checkpoint_every)
    final = sum(result.losses[-100:]) / len(result.losses[-100:])
    save_weights(result.model, args.out, extra={
        "steps": str(args.steps), "seed": str(args.seed),
        "label_dropout": str(args.label_dropout), "final_loss": f"{final:.4f}",
        "train_seconds": f"{result.seconds:.0f}"})
    plot_losses(result.losses, args.plot)
    print(f"steps {args.steps}  seed {args.seed}  final loss (mean of last 100 steps) "
          f"{final:.4f}  train time {result.seconds:.0f} s  -> {args.out} "
          f"({args.out.stat().st_size:,} bytes), {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
