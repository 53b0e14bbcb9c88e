"""`--weights FILE`: fine-tuned checkpoints, wrappers and prefixes, and one clear line for every bad file.

Real timm models (random init, `test_resnet`) and real files written with torch.save / safetensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.backbones import extract_grid, load_backbone
from pipeline.errors import ProtoquantError

NAME = "test_resnet"


def trained_state(num_classes: int = 1000, seed: int = 7) -> dict[str, torch.Tensor]:
    """Weights that differ from protoquant's fixed-seed random init, as a fine-tuned model's would."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(NAME, num_classes=num_classes)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)  # running stats too: everything the features use is checked
    return {k: v.clone() for k, v in model.state_dict().items()}


def save(path: Path, obj) -> Path:
    if path.suffix == ".safetensors":
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def assert_loaded(backbone, state: dict[str, torch.Tensor]) -> None:
    loaded = backbone.model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_plain_state_dict_loads_every_tensor(tmp_path: Path, suffix: str) -> None:
    state = trained_state()
    path = save(tmp_path / f"w{suffix}", state)
    backbone = load_backbone(NAME, weights=path, image_size=64)
    assert_loaded(backbone, state)
    assert backbone.weights.startswith(f"file:w{suffix}:sha256:")


@pytest.mark.parametrize("suffix,wrap", [
    (".pth", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}),  # DDP training scripts
    (".pth", lambda sd: {"epoch": 3, "optimizer": {"lr": 0.1}, "model": sd}),         # fault probe 4f5
    (".pth", lambda sd: {"model": {"state_dict": sd}}),                               # nested wrappers
    (".safetensors", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
    (".safetensors", lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}),        # torch.compile
])
def test_wrapped_checkpoints_are_unwrapped(tmp_path: Path, suffix: str, wrap) -> None:
    state = trained_state()
    backbone = load_backbone(NAME, weights=save(tmp_path / f"w{suffix}", wrap(state)), image_size=64)
    assert_loaded(backbone, state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_fine_tuned_classifier_of_another_size_loads_and_features_are_the_checkpoints(tmp_path: Path,
                                                                                        suffix: str) -> None:
    state = trained_state(num_classes=5)  # fault probe 4f'', 4f''': a 5-class fine-tuned head was a traceback
    path = save(tmp_path / f"cub{suffix}", state)
    with pytest.warns(UserWarning, match=r"classifier has 5 classes"):
        backbone = load_backbone(NAME, weights=path, image_size=64)
    assert backbone.model.num_classes == 5  # kept whole, so --use-backbone-head can use it
    assert_loaded(backbone, state)
    reference = timm.create_model(NAME, num_classes=5).eval()
    reference.load_state_dict(state)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_features(x).permute(0, 2, 3, 1)
        assert torch.equal(extract_grid(backbone, x), expected)


def test_a_size_mismatch_outside_the_classifier_is_one_line_naming_the_key(tmp_path: Path) -> None:
    state = trained_state()
    state["conv1.1.running_var"] = torch.ones(7)  # 4f': another architecture's batch norm
    with pytest.raises(ProtoquantError, match=r"does not fit this architecture: 1 keys have other shapes "
                                              r"\(conv1\.1\.running_var \[7\] vs \[\d+\]\).*--backbone"):
        load_backbone(NAME, weights=save(tmp_path / "other.safetensors", state), image_size=64)


def test_missing_and_unexpected_keys_are_one_line(tmp_path: Path) -> None:
    state = trained_state()
    state.pop("conv1.0.weight")
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ProtoquantError, match=r"1 missing keys .*conv1\.0\.weight.*1 unexpected keys .*extra\.weight"):
        load_backbone(NAME, weights=save(tmp_path / "w.pth", state), image_size=64)


@pytest.mark.parametrize("content,message", [
    (torch.zeros(3, 3), r"holds a Tensor, not a state dict"),   # 4f4
    ([torch.zeros(3), torch.ones(2)], r"holds a list, not a state dict"),
    ({"epoch": 3, "note": "no weights here"}, r"holds no tensors \(keys: epoch, note\)"),
])
def test_a_pth_that_is_not_a_state_dict_is_one_line(tmp_path: Path, content, message: str) -> None:
    with pytest.raises(ProtoquantError, match=rf"--weights .*w\.pth {message}"):
        load_backbone(NAME, weights=save(tmp_path / "w.pth", content), image_size=64)


def test_a_pickle_named_safetensors_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "evil_pickle.safetensors"
    torch.save(trained_state(), path)  # 4e': SafetensorError traceback before
    with pytest.raises(ProtoquantError, match=r"evil_pickle\.safetensors is not a safetensors file .*named \.pth"):
        load_backbone(NAME, weights=path, image_size=64)


def test_truncated_files_and_directories_are_one_line(tmp_path: Path) -> None:
    for suffix in (".pth", ".safetensors"):
        path = save(tmp_path / f"cut{suffix}", trained_state())
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ProtoquantError, match=rf"--weights .*cut\{suffix}"):
            load_backbone(NAME, weights=path, image_size=64)
    with pytest.raises(ProtoquantError, match=r"is a directory: pass the weights file"):
        load_backbone(NAME, weights=tmp_path, image_size=64)
    with pytest.raises(ProtoquantError, match=r"no such file"):
        load_backbone(NAME, weights=tmp_path / "absent.pth", image_size=64)


class _RunsCode:
    """A pickle that would create a file when unpickled (fault probe 4e)."""

    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("wrapped", [False, True])
def test_pickles_that_run_code_are_refused_without_running_it(tmp_path: Path, wrapped: bool) -> None:
    marker = tmp_path / "PWNED"
    _RunsCode.target = str(marker)
    payload = {"state_dict": _RunsCode()} if wrapped else _RunsCode()
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    with pytest.raises(ProtoquantError, match=r"could not read it as a plain state dict \(UnpicklingError\)"):
        load_backbone(NAME, weights=path, image_size=64)
    assert not marker.exists()
    with open(path, "wb") as handle:  # a plain pickle, not torch's zip format
        pickle.dump(payload, handle, protocol=2)
    with pytest.raises(ProtoquantError, match=r"could not read it as a plain state dict"):
        load_backbone(NAME, weights=path, image_size=64)
    assert not marker.exists()
