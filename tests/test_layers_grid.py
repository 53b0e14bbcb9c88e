"""--layers and --crop-pct / --crop-mode: which maps form the grid and how images are cropped, recorded
in the cache and replayed by every later stage.

Real random-init timm models (test_resnet: stages at strides 2..32; test_vit: 16-px patches, 4 register
tokens) on tiny generated images at 64 px; each layer's share of the grid is checked against timm's own
forward_intermediates / forward_features, and new images through the inference path against the cache.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipeline.backbones import FINAL, extract_grid, load_backbone, load_backbone_for_cache
from pipeline.cache import Cache, grid_maps
from pipeline.errors import ProtoquantError
from pipeline.geometry import Preprocessing
from pipeline.images import crop_box, read_image_file
from pipeline.inference import ImageModel
from pipeline.model import ProtoQuantHead
from stages.extract import extract
from stages.info import describe, grid_cost
from tests.conftest import make_cub, make_imagefolder

SIZE = 64


def _timm_maps(name: str, x: torch.Tensor, stage: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """timm itself, as the same seeded random init: stage `stage` (B, D, H, W) and forward_features."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # pipeline.backbones.RANDOM_INIT_SEED
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        return model.forward_intermediates(x, indices=[stage], intermediates_only=True)[0], model.forward_features(x)


def test_cnn_stages_concatenate_on_the_finest_grid_with_coarser_maps_upsampled() -> None:
    backbone = load_backbone("test_resnet", image_size=SIZE, layers="2,final")
    assert backbone.layers == (2, FINAL) and backbone.grid == (8, 8)
    assert backbone.layer_shapes == ((8, 8, 48), (2, 2, 96)) and backbone.dim == 48 + 96
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grid = extract_grid(backbone, x)  # (2, 8, 8, 144)
    stage, final = _timm_maps("test_resnet", x, 2)
    torch.testing.assert_close(grid[..., :48], stage.permute(0, 2, 3, 1))
    # every 4 x 4 block of fine cells carries the one coarse cell it lies in (nearest upsampling)
    coarse = final.permute(0, 2, 3, 1)  # (2, 2, 2, 96)
    torch.testing.assert_close(grid[..., 48:], coarse.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2))
    assert not torch.equal(grid[:, 0, 0, 48:], grid[:, 0, 4, 48:])  # the coarse cells do differ


def test_vit_blocks_lose_their_prefix_tokens_and_negative_indices_count_from_the_end() -> None:
    registers = {"reg_tokens": 4}
    backbone = load_backbone("test_vit", image_size=SIZE, layers="-3,final", model_kwargs=registers)
    assert backbone.num_prefix_tokens == 5 and backbone.layers == (3, FINAL)
    assert backbone.grid == (4, 4) and backbone.dim == 128
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        grid = extract_grid(backbone, x)
    block, final = _timm_maps("test_vit", x, 3, img_size=SIZE, **registers)
    torch.testing.assert_close(grid[..., :64], block.permute(0, 2, 3, 1))
    torch.testing.assert_close(grid[..., 64:], final[:, 5:].reshape(1, 4, 4, 64))  # registers and class dropped


def test_bad_layers_and_crops_are_one_line_each() -> None:
    with pytest.raises(ProtoquantError, match=r"feature stages 0\.\.4 \(0: stride 2, .*4: stride 32\) and 'final'; 7"):
        load_backbone("test_resnet", image_size=SIZE, layers="7")
    with pytest.raises(ProtoquantError, match="'deep' is neither a feature-stage index"):
        load_backbone("test_resnet", image_size=SIZE, layers="3,deep")
    with pytest.raises(ProtoquantError, match="already listed"):
        load_backbone("test_resnet", image_size=SIZE, layers="4,-1")
    with pytest.raises(ProtoquantError, match=r"80 px gives grids 5x5, 3x3: .*divisible by the coarsest stride"):
        load_backbone("test_resnet", image_size=80, layers="3,4")
    with pytest.raises(ProtoquantError, match="--crop-mode 'diagonal': choose one of center, squash, border"):
        load_backbone("test_resnet", image_size=SIZE, crop_mode="diagonal")
    with pytest.raises(ProtoquantError, match=r"--crop-pct 1\.5: must be in \(0, 1\]"):
        load_backbone("test_resnet", image_size=SIZE, crop_pct=1.5)


@pytest.fixture(scope="module")
def layered(tmp_path_factory) -> dict:
    """A tiny ImageFolder extracted with --layers 2,final --crop-mode squash --crop-pct 1.0."""
    root = tmp_path_factory.mktemp("layers")
    make_imagefolder(root / "data", per_class={"train": 2, "test": 2})
    extract(root / "data", root / "cache.zarr", backbone="test_resnet", image_size=SIZE, workers=0, batch_size=4,
            layers="2,final", crop_mode="squash", crop_pct=1.0)
    return {"root": root, "cache": Cache(root / "cache.zarr")}


def test_the_cache_records_layers_and_crop_and_inference_rebuilds_its_grid(layered) -> None:
    cache, data = layered["cache"], layered["root"] / "data"
    provenance = cache.provenance
    assert provenance["layers"] == [2, "final"] and provenance["layer_shapes"] == [[8, 8, 48], [2, 2, 96]]
    assert provenance["preprocessing_overrides"] == {"crop_pct": 1.0, "crop_mode": "squash"}
    assert provenance["data_config"]["crop_mode"] == "squash" and cache.grid == (8, 8) and cache.dim == 144
    assert Preprocessing.from_cache(cache) == Preprocessing((SIZE, SIZE), 1.0, "squash", (8, 8))
    test = cache.split("test")
    features = torch.from_numpy(test.features[:].astype(np.float32))
    head = ProtoQuantHead(features.flatten(0, 2)[::7], num_classes=len(cache.classes), tau=0.05, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's crop is replayed, not taken for a timm difference
        model = ImageModel.for_cache(provenance, head)
    images = [read_image_file(data / str(i)) for i in test.ids[:]]  # 32 x 24: squashed, nothing cut
    got = model.grid(model.batch(images))
    assert got.shape == features.shape
    torch.testing.assert_close(got, features, atol=1e-2, rtol=1e-3)
    # the test can fail: the model's own centre crop gives other features
    centre = ImageModel(load_backbone("test_resnet", image_size=SIZE, layers="2,final"), head)
    assert (centre.grid(centre.batch(images)) - features).abs().max() > 0.1


def test_a_cache_made_before_layers_were_recorded_reads_the_final_map(layered) -> None:
    old = {k: v for k, v in layered["cache"].provenance.items()
           if k not in ("layers", "layer_shapes", "preprocessing_overrides")}
    old.update(grid=[2, 2], dim=96, data_config={**old["data_config"], "crop_mode": "center", "crop_pct": 0.95})
    backbone = load_backbone_for_cache(old)
    assert backbone.layers == (FINAL,) and backbone.grid == (2, 2) and backbone.dim == 96
    assert grid_cost(old, 10) == {"layers": ["final"], "layer_shapes": [[2, 2, 96]], "cells": 4, "dim": 96,
                                  "bytes_per_image": 4 * 96 * 2, "images": 10, "gigabytes": 0.0}


def test_info_states_what_the_grid_costs(layered) -> None:
    cost = describe(layered["cache"].path)["grid_cost"]
    assert cost["cells"] == 64 and cost["dim"] == 144 and cost["bytes_per_image"] == 64 * 144 * 2
    assert cost["images"] == 12 and cost["layers"] == [2, "final"]
    result = CliRunner().invoke(app, ["info", str(layered["cache"].path)])
    assert result.exit_code == 0, result.output
    assert "layers 2,final (8x8x48 + 2x2x96)  crop squash 1.0: 64 cells x 144 dims = 18.4 kB per image" in result.output


def test_crop_to_box_squashes_the_whole_box_to_the_input_by_default(tmp_path) -> None:
    truth = make_cub(tmp_path / "cub")
    extract(truth.root, tmp_path / "box.zarr", backbone="test_resnet", image_size=SIZE, workers=0, crop_to_box=True)
    cache = Cache(tmp_path / "box.zarr")
    assert cache.provenance["data_config"]["crop_mode"] == "squash"
    assert cache.provenance["data_config"]["crop_pct"] == 1.0
    train = cache.split("train")
    rel = str(train.ids[0])
    image = Image.open(truth.root / rel).convert("RGB")
    config = cache.provenance["data_config"]
    # the paper's CUB transform by hand: the box, resized to S x S with the model's filter, nothing cut
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[config["interpolation"]]
    pixels = np.asarray(crop_box(image, truth.boxes[rel]).resize((SIZE, SIZE), resample), np.float32) / 255
    x = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(config["mean"]).view(3, 1, 1)) / torch.tensor(
        config["std"]).view(3, 1, 1)
    with torch.no_grad():
        expected = extract_grid(load_backbone("test_resnet", image_size=SIZE, layers=cache.provenance["layers"]), x[None])[0]
    torch.testing.assert_close(torch.from_numpy(train.features[0].astype(np.float32)), expected, atol=1e-2, rtol=1e-3)


def test_cli_extract_refuses_a_bad_crop_in_one_line(imagefolder_data, tmp_path) -> None:
    runner = CliRunner()
    for option, value, expected in (("--crop-mode", "diagonal", "choose one of center, squash, border"),
                                    ("--crop-pct", "1.5", "in (0, 1]"), ("--layers", "9", "feature stages 0..4")):
        result = runner.invoke(app, ["extract", str(imagefolder_data.root), "-b", "test_resnet", "--image-size", "64",
                                     "--out", str(tmp_path / "c.zarr"), "--workers", "0", option, value])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.zarr").exists()


def test_resuming_with_other_layers_is_refused_and_a_final_map_cache_keeps_older_settings(imagefolder_data, tmp_path) -> None:
    out = tmp_path / "c.zarr"
    extract(imagefolder_data.root, out, backbone="test_resnet", image_size=SIZE, workers=0, layers="final")
    assert "layers" not in Cache(out).attrs["settings"]  # a cache made before --layers resumes as before
    with pytest.raises(ProtoquantError, match=r"other settings \(differs in: dim, grid, layers\); it was made with "
                                              r"--layers final --crop-mode squash --crop-pct 1\.0 \(extract's defaults"):
        extract(imagefolder_data.root, out, backbone="test_resnet", image_size=SIZE, workers=0, layers="3,final")
    extract(imagefolder_data.root, out, backbone="test_resnet", image_size=SIZE, workers=0, layers="3,final",
            overwrite=True)
    assert Cache(out).grid == (4, 4) and Cache(out).attrs["settings"]["layers"] == [3, "final"]


def test_a_stride_names_the_deepest_stage_at_that_resolution_in_any_family() -> None:
    assert load_backbone("test_resnet", image_size=SIZE, layers="s16,final").layers == (3, FINAL)  # layer3
    assert load_backbone("test_convnext", image_size=SIZE, layers="s16").layers == (2,)  # stages 0..3: strides 4..32
    assert load_backbone("test_vit", image_size=SIZE, layers="s16").layers == (5,)  # every block is stride 16
    assert load_backbone("test_resnet", image_size=SIZE, layers="auto").layers == (3, 4)  # the measured CNN recipe
    assert load_backbone("test_vit", image_size=SIZE, layers="auto").layers == (FINAL,)
    with pytest.raises(ProtoquantError, match=r"--layers s64: test_resnet has no feature stage at stride 64"):
        load_backbone("test_resnet", image_size=SIZE, layers="s64")


def test_a_default_extraction_is_the_measured_recipe_and_records_it_truthfully(imagefolder_data, tmp_path) -> None:
    """extract's defaults: --layers auto (a CNN's stride-16 + stride-32 stages) and the whole image squashed
    (crop squash 1.0), resolved and recorded as such; the CLI's defaults are the library's, and the old
    recipe stays one explicit choice away."""
    extract(imagefolder_data.root, tmp_path / "lite0.zarr", backbone="tf_efficientnet_lite0", workers=0, batch_size=8)
    cache = Cache(tmp_path / "lite0.zarr")
    provenance = cache.provenance
    assert provenance["layers"] == [3, 4] == cache.attrs["settings"]["layers"]  # 'auto' resolved: s16, s32
    assert provenance["layer_shapes"] == [[14, 14, 112], [7, 7, 320]]
    assert cache.grid == (14, 14) and cache.dim == 432  # 224 px: 4x the cells of the final map's 7 x 7
    assert provenance["preprocessing_overrides"] == {"crop_pct": 1.0, "crop_mode": "squash"}
    assert provenance["data_config"]["crop_mode"] == "squash" and provenance["data_config"]["crop_pct"] == 1.0
    assert Preprocessing.from_cache(cache) == Preprocessing((224, 224), 1.0, "squash", (14, 14))
    result = CliRunner().invoke(app, ["info", str(cache.path)])
    assert result.exit_code == 0, result.output
    assert "layers 3,4 (14x14x112 + 7x7x320) crop squash 1.0: 196 cells x 432 dims" in " ".join(result.output.split())

    runner, data = CliRunner(), str(imagefolder_data.root)
    common = ["-b", "test_resnet", "--image-size", str(SIZE), "--workers", "0"]
    result = runner.invoke(app, ["extract", data, *common, "--out", str(tmp_path / "cli.zarr")])
    assert result.exit_code == 0, result.output
    cli = Cache(tmp_path / "cli.zarr")
    assert cli.provenance["layers"] == [3, 4] and cli.grid == (4, 4)
    assert cli.provenance["preprocessing_overrides"] == {"crop_pct": 1.0, "crop_mode": "squash"}
    result = runner.invoke(app, ["extract", data, *common, "--out", str(tmp_path / "old.zarr"), "--layers", "final",
                                 "--crop-mode", "center", "--crop-pct", "0.875"])
    assert result.exit_code == 0, result.output
    old = Cache(tmp_path / "old.zarr")
    assert old.provenance["layers"] == ["final"] and "layers" not in old.attrs["settings"] and old.grid == (2, 2)
    assert old.provenance["data_config"]["crop_mode"] == "center" and old.provenance["data_config"]["crop_pct"] == 0.875


def test_grid_maps_give_each_maps_channels_and_blocks() -> None:
    layered = {"grid": [8, 8], "dim": 144, "layer_shapes": [[8, 8, 48], [2, 2, 96]]}
    assert grid_maps(layered) == [(0, 48, 1, 1), (48, 144, 4, 4)]
    coarse_first = {"grid": [8, 8], "dim": 144, "layer_shapes": [[2, 2, 96], [8, 8, 48]]}  # --layers final,2
    assert grid_maps(coarse_first) == [(0, 96, 4, 4), (96, 144, 1, 1)]
    assert grid_maps({"grid": [2, 2], "dim": 96}) == [(0, 96, 1, 1)]  # one map (or a cache from before layers)


def test_the_projection_learns_on_the_fine_channels_and_keeps_the_coarse_ones(layered, tmp_path) -> None:
    """--projection-learns fine (the default): the columns reading the upsampled final map stay at the start."""
    from dataclasses import replace

    from pipeline.model import load_head
    from stages.codebook import CodebookSettings, build_codebook
    from stages.train import train
    from tests.test_train import FAST

    cache = layered["cache"].path
    build_codebook(cache, tmp_path / "cb.safetensors", CodebookSettings(k=4, seed=0))
    fast = replace(FAST, epochs=6, projection_dim=16, sparsity="none", ground=False, projection_lr=1e-2)
    weights = {}
    runs = {"start": {"projection_lr": 0.0}, "fine": {}, "all": {"projection_learns": "all"}, "frozen": {"train_codes": False}}
    for name, changes in runs.items():
        train(cache, tmp_path / "cb.safetensors", tmp_path / name, replace(fast, **changes))
        weights[name] = load_head(tmp_path / name / "head.safetensors")[0].projection.weight
    start, fine, every = weights["start"], weights["fine"], weights["all"]
    assert torch.equal(fine[:, 48:], start[:, 48:])  # the final map's 96 channels: exactly their principal directions
    assert (fine[:, :48] - start[:, :48]).abs().max() > 1e-3  # stage 2's 48 channels learned
    assert (every[:, 48:] - start[:, 48:]).abs().max() > 1e-3  # with "all", every column learns
    assert torch.equal(weights["frozen"], start)  # --freeze-codes: the projection keeps its start too
