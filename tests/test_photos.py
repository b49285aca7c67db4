"""The trained Flux photos model: shipped weights, its testbed checks, the CLI on it."""

from __future__ import annotations

import json

import pytest
import torch

from simulator.photos import (
    CHANNELS,
    NULL_LABEL,
    NUM_CLASSES,
    PHOTOS,
    TOKENS,
    TRANSFORMER_CONFIG,
    WEIGHTS,
    load_photos,
    load_photos_model,
    pack,
    random_crops,
    unpack,
)
from simulator.testbed import THRESHOLD_DB, VISIBLE_DB, check_testbed
from simulator.workloads import make_workload


@pytest.fixture(scope="module")
def model():
    return load_photos_model()


def test_weights_are_committed_small_and_load_fp32_eval(model):
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 4_000_000
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config == TRANSFORMER_CONFIG
    assert type(model.transformer).__name__ == "FluxTransformer2DModel"
    cfg = model.transformer.config
    assert cfg.num_layers >= 1 and cfg.num_single_layers >= 1  # double and single blocks


def test_missing_weights_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_photos"):
        load_photos_model(tmp_path / "nope.safetensors")


def test_velocity_has_1024_tokens(model):
    x = torch.randn(1, TOKENS, CHANNELS)
    with torch.no_grad():
        v = model.velocity(x, torch.tensor([0.5]), torch.tensor([NUM_CLASSES - 1]))
    assert TOKENS == 1024 and v.shape == x.shape and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="labels must lie"):
        model.condition(torch.tensor([NULL_LABEL + 1]))


def test_the_null_label_is_a_condition_of_its_own(model):
    x, t = torch.randn(1, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(0)), \
        torch.tensor([0.7])
    with torch.no_grad():
        null = model.velocity(x, t, torch.tensor([NULL_LABEL]))
        for label in (0, 5):
            assert not torch.allclose(null, model.velocity(x, t, torch.tensor([label])),
                                      atol=1e-3)
    with pytest.raises(ValueError, match="null label"):
        model.condition(torch.tensor([NULL_LABEL + 1]))


def test_weights_without_the_null_label_are_refused(tmp_path):
    from simulator.photos import PhotosModel
    from simulator.training import save_weights

    old = PhotosModel()  # the first trained model had no null label
    old.label_tokens = torch.nn.Embedding(NUM_CLASSES, old.label_tokens.embedding_dim)
    old.label_pooled = torch.nn.Embedding(NUM_CLASSES, old.label_pooled.embedding_dim)
    save_weights(old, tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="null label"):
        load_photos_model(tmp_path / "old.safetensors")


def test_photos_load_and_crops_pack_round_trip():
    photos = load_photos()
    assert len(photos) == len(PHOTOS) == NUM_CLASSES
    assert all(p.shape[0] == 3 and -1 <= p.min() and p.max() <= 1 for p in photos)
    images, labels = random_crops(photos, 3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 64, 64) and labels.shape == (3,)
    assert torch.equal(unpack(pack(images)), images)


def test_the_shipped_model_is_a_testbed():
    """Own patch only and K/V 5 steps stale each lose at least 10 dB (a short run: 1 sample,
    10 steps; ``python -m simulator.testbed`` runs 20)."""
    check = check_testbed(make_workload("photos", batch=1), world=4, steps=10, stale=5)
    assert check.passed, check.lines()
    assert max(check.own_patch_db, check.stale_db) <= VISIBLE_DB - THRESHOLD_DB


def test_cli_runs_the_photos_model(tmp_path, capsys):
    from simulator.cli import main

    assert main(["--model", "photos", "--ranks", "2", "--steps", "2", "--batch", "1",
                 "--codecs", "binary", "--compute-ms", "1", "--out", str(tmp_path),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["model"] == "photos"
    assert [r["method"] for r in out["results"]] == ["raw", "distrifusion", "binary"]
    assert (tmp_path / "images.png").is_file()


def test_training_writes_beside_the_user_not_over_the_shipped_weights(tmp_path, monkeypatch,
                                                                      capsys):
    from simulator import train_photos

    shipped = WEIGHTS.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert train_photos.main(["--steps", "1", "--threads", "1"]) == 0
    for name in ("photos_flux.safetensors", "photos_flux_loss.txt", "photos_flux_loss.png"):
        assert (tmp_path / name).is_file(), name
    assert WEIGHTS.read_bytes() == shipped


def test_weights_of_another_architecture_are_refused():
    from simulator.digits import WEIGHTS as DIGITS_WEIGHTS

    with pytest.raises(ValueError, match="holds a model with config"):
        load_photos_model(DIGITS_WEIGHTS)
