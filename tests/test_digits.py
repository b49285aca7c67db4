"""The committed digits model: it loads, it draws the digit it is asked for, sampling is exact.

A classifier fitted here on scikit-learn's 8x8 digits reads the generated 32x32 images
through ``to_8x8``; the model must draw the class it is conditioned on. The sampler is also
checked against closed forms with a fake velocity field.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.digits import (IMAGE_SIZE, NUM_CLASSES, TEXT_TOKENS, TRANSFORMER_CONFIG, WEIGHTS,
                              DigitsModel, flow_sample, load_dataset, load_digits_model,
                              time_grid, to_8x8)

LABELS = torch.arange(NUM_CLASSES).repeat(2)        # 2 samples per class
STEPS = 20
# Measured with the committed weights, 20 steps: 1.00 on these 20 samples (noise seed 0);
# 0.90 to 1.00 for noise seeds 0-5; 0.97 on 500 samples (50 per class). The threshold
# leaves room for BLAS/CPU differences in the sampled pixels.
MIN_ACCURACY = 0.8


@pytest.fixture(scope="module")
def model() -> DigitsModel:
    return load_digits_model()


@pytest.fixture(scope="module")
def classifier():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001).fit(digits.data, digits.target)


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(len(LABELS), 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen)


def _forward(model: DigitsModel, labels: torch.Tensor):
    cond = model.condition(labels)

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.transformer(hidden_states=x, timestep=t * 1000, **cond,
                                 return_dict=False)[0]
    return forward


@pytest.fixture(scope="module")
def samples(model, noise) -> torch.Tensor:
    return flow_sample(_forward(model, LABELS), noise, STEPS)


def _accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float(np.mean(classifier.predict(to_8x8(images)) == labels.numpy()))


# --- the checkpoint ------------------------------------------------------------------------

def test_checkpoint_is_committed_and_small():
    assert WEIGHTS.is_file()
    assert WEIGHTS.stat().st_size <= 5 * 1024 * 1024


def test_checkpoint_loads_fp32_eval(model):
    assert isinstance(model, DigitsModel)
    assert not model.training
    assert dict(model.transformer.config)["num_layers"] == TRANSFORMER_CONFIG["num_layers"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    heads = TRANSFORMER_CONFIG["num_attention_heads"]
    assert heads % 4 == 0


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits"):
        load_digits_model(tmp_path / "nope.safetensors")


def test_condition_shapes(model):
    cond = model.condition(torch.tensor([3, 1, 4]))
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (3, TEXT_TOKENS,
                                                   TRANSFORMER_CONFIG["joint_attention_dim"])
    assert cond["pooled_projections"].shape == (3, TRANSFORMER_CONFIG["pooled_projection_dim"])
    with pytest.raises(ValueError):
        model.condition(torch.tensor([NUM_CLASSES]))


# --- generated digits ----------------------------------------------------------------------

def test_generated_digits_are_their_class(samples, classifier):
    assert samples.shape == (len(LABELS), 1, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(samples).all()
    assert _accuracy(classifier, samples, LABELS) >= MIN_ACCURACY


def test_noise_is_not_a_digit(noise, classifier):
    # the same pipeline on the starting noise scores near chance (0.1)
    assert _accuracy(classifier, noise.clamp(-1, 1), LABELS) <= 0.3


def test_flow_sample_is_deterministic(model, noise, samples):
    before = noise.clone()
    again = flow_sample(_forward(model, LABELS), noise, STEPS)
    assert torch.equal(again, samples)
    assert torch.equal(noise, before)            # the input is not modified


# --- the sampler, with closed forms --------------------------------------------------------

@pytest.mark.parametrize("steps, shift", [(1, 1.0), (7, 1.0), (20, 3.0)])
def test_flow_sample_is_exact_on_a_straight_path(steps, shift):
    # v = noise - data is constant along the straight path, so Euler lands on data exactly
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    data = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    calls: list[torch.Tensor] = []

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return noise - data

    out = flow_sample(forward, noise, steps, shift=shift)
    torch.testing.assert_close(out, data, rtol=0, atol=1e-12)
    assert len(calls) == steps
    assert all(t.shape == (3,) and t.dtype == torch.float64 for t in calls)
    times = [float(t[0]) for t in calls]
    assert times[0] == 1.0 and times == sorted(times, reverse=True)


def test_time_grid():
    torch.testing.assert_close(time_grid(4, 1.0),
                               torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    # SD3 shift 3: t = 3 s / (1 + 2 s); s = 0.5 -> 0.75
    assert float(time_grid(2, 3.0)[1]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        time_grid(0)


# --- data ----------------------------------------------------------------------------------

def test_dataset_round_trips_through_to_8x8():
    from sklearn.datasets import load_digits

    images, labels = load_dataset()
    assert images.shape == (1797, 1, IMAGE_SIZE, IMAGE_SIZE) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    back = to_8x8(images)
    assert back.shape == (1797, 64)
    # bilinear up then 4x4 mean down blurs a little: on average about 1.1 of 16
    assert np.abs(back - load_digits().data).mean() < 1.5


def test_training_writes_beside_the_user_not_over_the_shipped_weights(tmp_path, monkeypatch,
                                                                      capsys):
    from simulator import train_digits

    shipped = WEIGHTS.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert train_digits.main(["--steps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "about 9 minutes" in out and "digits_sd3.safetensors" in out
    written = tmp_path / "digits_sd3.safetensors"
    assert written.is_file() and written.read_bytes() != shipped
    assert WEIGHTS.read_bytes() == shipped
