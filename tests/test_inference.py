"""The one inference path (pipeline/inference.py) and the one ranking of evidence (pipeline/model.py).

A real cache of a tiny ImageFolder, extracted with a random-init timm model at --image-size 64, and a
head whose codes are cached patches: new images through ImageModel must give the cached features'
predictions, whatever data config the installed timm would resolve today.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.backbones as backbones
from pipeline.backbones import PreprocessingWarning, load_backbone
from pipeline.cache import Cache
from pipeline.errors import ProtoquantError
from pipeline.images import read_image_file
from pipeline.inference import ImageModel, outputs_of
from pipeline.metrics import top_prototypes
from pipeline.model import ProtoQuantHead, class_contributions, top_contributions
from stages.explain import explain
from stages.extract import extract
from stages.predict import predict
from tests.conftest import make_imagefolder


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inference")
    make_imagefolder(root / "data", per_class={"train": 2, "test": 3})
    extract(root / "data", root / "cache.zarr", backbone="test_resnet", image_size=64, workers=0, batch_size=4,
            crop_mode=None, crop_pct=None)  # the model's own timm crop: the config a newer timm may resolve otherwise
    cache = Cache(root / "cache.zarr")
    train = torch.from_numpy(cache.split("train").features[:].astype(np.float32))  # (N, H, W, D)
    codes = train.flatten(0, 2)[torch.arange(0, train.flatten(0, 2).shape[0], 5)]  # real patches as codes
    head = ProtoQuantHead(codes, num_classes=len(cache.classes), tau=0.05, seed=3)
    return {"root": root, "cache": cache, "head": head}


def _test_images(cache: Cache, data: Path) -> tuple[list[Image.Image], torch.Tensor]:
    test = cache.split("test")
    images = [read_image_file(data / str(i)) for i in test.ids[:]]
    return images, torch.from_numpy(test.features[:].astype(np.float32))


def _another_timm(monkeypatch) -> None:
    """Make load_backbone resolve other defaults, as a newer timm might for the same model."""
    real = backbones.resolve_data_config

    def resolve(*args, **kwargs):
        config = dict(real(*args, **kwargs))
        config.update(crop_pct=1.0, interpolation="nearest", mean=(0.4, 0.4, 0.4))
        return config

    monkeypatch.setattr(backbones, "resolve_data_config", resolve)


def test_new_images_get_the_cached_predictions_when_timm_resolves_another_config(cached, monkeypatch) -> None:
    cache, head = cached["cache"], cached["head"]
    images, features = _test_images(cache, cached["root"] / "data")
    expected = outputs_of(head, features)
    _another_timm(monkeypatch)
    with pytest.warns(PreprocessingWarning, match=r"crop_pct: recorded 0\.95, installed timm 1\.0.*"
                                                  r"interpolation: recorded 'bilinear', installed timm 'nearest'"):
        model = ImageModel.for_cache(cache.provenance, head)
    got = model.outputs(model.batch(images))
    assert got.logits.argmax(1).tolist() == expected.logits.argmax(1).tolist()
    assert torch.allclose(got.logits, expected.logits, atol=1e-3)
    assert torch.allclose(got.presence, expected.presence, atol=1e-3)
    # the test can fail: the re-resolved config (what predict used before) gives other features
    skewed = ImageModel(load_backbone("test_resnet", image_size=64, layers="auto"), head)
    assert (skewed.grid(skewed.batch(images)) - features).abs().max() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_new_images_run_under_extractions_autocast(cached) -> None:
    root = cached["root"]
    extract(root / "data", root / "cuda.zarr", backbone="test_resnet", image_size=64, workers=0, batch_size=4,
            device="cuda", crop_mode=None, crop_pct=None)  # float16 autocast (AUTOCAST_DTYPE), channels-last
    cache = Cache(root / "cuda.zarr")
    images, features = _test_images(cache, root / "data")
    model = ImageModel.for_cache(cache.provenance, copy.deepcopy(cached["head"]), device="cuda")
    assert model.autocast
    got = model.grid(model.batch(images)).cpu()
    assert (got - features).abs().max() <= 0.02 * features.abs().max()  # autocast run for autocast run
    expected = outputs_of(cached["head"], features)
    assert model.outputs(model.batch(images)).logits.argmax(1).cpu().tolist() == expected.logits.argmax(1).tolist()


def test_no_warning_when_the_installed_timm_agrees(cached) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ImageModel.for_cache(cached["cache"].provenance, cached["head"])
    assert model.backbone.data_config["input_size"] == (3, 64, 64) and model.input_size == (64, 64)
    assert model.backbone.data_config["crop_pct"] == 0.95


def test_top_contributions_rank_values_and_cells() -> None:
    codes = torch.eye(4)
    head = ProtoQuantHead(codes, num_classes=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0, 1.0, 1.0], [-1.0, 3.0, 0.5, 0.0]]))
    activation = torch.zeros(1, 4, 2, 3)
    activation[0, 0, 1, 2] = 0.9  # code 0 fires at (1, 2)
    activation[0, 2, 0, 1] = 0.5
    activation[0, 3, 1, 0] = 0.5  # codes 2 and 3 tie for class 0: the lower code comes first
    presence = activation.amax(dim=(2, 3))
    top = top_contributions(head, activation, presence, torch.tensor([0]), top=3)
    assert top.codes.tolist() == [[0, 2, 3]]
    assert torch.allclose(top.values, torch.tensor([[1.8, 0.5, 0.5]]))
    assert top.cells.tolist() == [[[1, 2], [0, 1], [1, 0]]]
    for_one = top_contributions(head, activation, presence, torch.tensor([1]), top=10)
    assert for_one.codes.shape == (1, 4)  # top is capped at K
    assert for_one.codes[0, 0] == 2 and for_one.shown.tolist() == [[True, False, False, False]]  # relu(W) * p
    assert torch.allclose(class_contributions(head, presence, torch.tensor([0])).sum(1),
                          head.logits_from_presence(presence)[:, 0])  # contributions sum to the logit


def test_the_metrics_top_prototype_is_the_first_top_contribution(cached) -> None:
    model = ImageModel.for_cache(cached["cache"].provenance, cached["head"])
    images, _ = _test_images(cached["cache"], cached["root"] / "data")
    out = model.outputs(model.batch(images))
    predicted, code, cell = top_prototypes(model, out)
    top = top_contributions(model.head, out.activation, out.presence, out.logits.argmax(1), 5)
    assert torch.equal(predicted, out.logits.argmax(1))
    assert torch.equal(code, top.codes[:, 0]) and torch.equal(cell, top.cells[:, 0])


def test_predict_and_explain_call_a_directory_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(ProtoquantError, match=r"image .*photos is a directory: pass image files"):
        predict(tmp_path / "no-run", [folder])  # 6b: "does not exist" before
    with pytest.raises(ProtoquantError, match=r"photos is a directory: pass image files"):
        explain(tmp_path / "no-run", [folder], tmp_path / "pages")


def test_an_undecodable_image_argument_does_not_suggest_extract(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ProtoquantError, match=r"cannot decode image .*bad\.jpg") as caught:
        read_image_file(bad)  # 6c: the hint named `extract --skip-bad`, an option of another command
    assert "skip-bad" not in str(caught.value) and "extract" not in str(caught.value)
