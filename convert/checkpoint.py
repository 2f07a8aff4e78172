"""Either LLaVA checkpoint layout, read into one neutral description: configs plus named tensors.

Neutral tensor names are llava-hf's as gguf-py's tables know them: `model.layers.N...` and `lm_head.weight`
for the LLaMA, `vision_tower.vision_model...` for CLIP, and `projector.0/.2` (MLP) or `projector` (linear).
Tensors load lazily, one at a time, so a 13B checkpoint converts in little more memory than its largest tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from transformers import CLIPVisionConfig, LlamaConfig

from llavacli.errors import ConvertError
from llavacli.images import CROP, PAD
from llavacli.prompts import DEFAULT_TEMPLATE, TEMPLATES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (pattern, replacement) applied in order; the first that matches wins. Keys that match none are not ours.
_LLAVA_HF_KEYS = [
    (r"^(?:model\.)?language_model\.model\.(.*)$", r"model.\1"),  # transformers 4.x on-disk layout
    (r"^language_model\.lm_head\.(.*)$", r"lm_head.\1"),
    (r"^model\.language_model\.(.*)$", r"model.\1"),  # transformers >= 4.52 layout
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$", r"vision_tower.vision_model.\1"),  # 5.x drops vision_model
    (r"^(?:model\.)?multi_modal_projector\.linear_1\.(.*)$", r"projector.0.\1"),
    (r"^(?:model\.)?multi_modal_projector\.linear_2\.(.*)$", r"projector.2.\1"),
]
_ORIGINAL_KEYS = [
    (r"^model\.mm_projector\.(\d+)\.(.*)$", r"projector.\1.\2"),
    (r"^model\.mm_projector\.(weight|bias)$", r"projector.\1"),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.(.*)$", r"vision_tower.vision_model.\1"),
    (r"^(model\.(?:embed_tokens|layers|norm)\..*)$", r"\1"),
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
]
# A CLIPVisionModel saved by transformers 5 drops the `vision_model.` prefix; a CLIPModel keeps it.
_TOWER_KEYS = [
    (r"^(?:vision_tower\.)?(?:vision_model\.)?((?:embeddings|encoder|pre_layrnorm)\..*)$", r"vision_tower.vision_model.\1")
]


@dataclass
class TensorSource:
    """Where a checkpoint's tensors live: name -> (shape, a loader that returns the tensor)."""

    loaders: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = field(default_factory=dict)

    def add_files(self, files: list[Path], rename: list[tuple[str, str]]) -> None:
        for path in files:
            for key, shape, loader in _open_weights(path):
                for pattern, repl in rename:
                    if re.match(pattern, key):
                        self.loaders[re.sub(pattern, repl, key)] = (shape, loader)
                        break

    def __contains__(self, name: str) -> bool:
        return name in self.loaders

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (checkpoints hold fp16 or bf16; GGUF gets f32, f16 or a quantization)."""
        if name not in self.loaders:
            raise ConvertError(f"checkpoint lacks tensor {name!r}")
        return self.loaders[name][1]().to(torch.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.loaders:
            raise ConvertError(f"checkpoint lacks tensor {name!r}")
        return self.loaders[name][0]

    def names(self, prefix: str) -> list[str]:
        return [n for n in self.loaders if n.startswith(prefix)]


@dataclass
class Checkpoint:
    name: str
    text: LlamaConfig
    vision: CLIPVisionConfig
    projector: str  # "mlp2x_gelu" or "linear"
    feature_layer: int  # index into the tower's hidden states (embeddings = 0), never negative
    image_mode: str  # images.PAD or images.CROP
    tokenizer_dir: Path
    tensors: TensorSource
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_token_id: int | None = None
    template: str = DEFAULT_TEMPLATE  # what the checkpoint was trained on: train/ records it

    @property
    def rope_theta(self) -> float:
        theta = getattr(self.text, "rope_theta", None)
        if theta is None:
            theta = (getattr(self.text, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return float(theta)

    @property
    def head_dim(self) -> int:
        return getattr(self.text, "head_dim", None) or self.text.hidden_size // self.text.num_attention_heads


def _open_weights(path: Path) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt")
            entries = [(key, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()]
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None
        for key, shape in entries:
            yield key, shape, _safetensors_loader(handle, key, path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for a damaged pickle or zip
            raise ConvertError(f"{path}: unreadable PyTorch checkpoint ({_first_line(e)})") from None
        for key, tensor in state.items():
            yield key, tuple(tensor.shape), (lambda t=tensor: t)


def _safetensors_loader(handle, key: str, path: Path) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConvertError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None

    return load


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    return [f for f in files if not f.name.startswith("training_args")]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path.parent}: no {path.name}; not a LLaVA checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def _feature_index(layer: int, n_layers: int) -> int:
    index = layer if layer >= 0 else n_layers + 1 + layer
    if not 0 < index <= n_layers:
        raise ConvertError(f"vision feature layer {layer} is outside a tower of {n_layers} layers")
    return index


def load_checkpoint(directory: Path, *, vision_tower: Path | None = None, fetch=None) -> Checkpoint:
    """Read a llava-hf or original LLaVA checkpoint directory.

    `fetch(repo_id) -> Path` resolves a vision tower named by hub id (original layout only).
    """
    if not directory.is_dir():
        raise ConvertError(f"{directory}: not a directory")
    config = _read_json(directory / "config.json")
    archs = config.get("architectures") or []
    if config.get("model_type") == "llava" and "text_config" in config:
        ckpt = _load_llava_hf(directory, config)
        if vision_tower is not None:
            raise ConvertError("--vision-tower is for original LLaVA checkpoints; llava-hf ones include the tower")
    elif any("Llava" in a for a in archs) or "mm_vision_tower" in config or "mm_hidden_size" in config:
        ckpt = _load_original(directory, config, vision_tower, fetch)
    else:
        kind = config.get("model_type") or ", ".join(archs) or "unknown"
        raise ConvertError(f"{directory}: config.json describes a {kind!r} model, not LLaVA")
    _check_sizes(directory, ckpt)
    _check_complete(ckpt)
    trained = directory / "train_config.json"  # written by train/ beside the model: how it was trained
    if trained.is_file():
        cfg = _read_json(trained)
        stage1 = cfg.get("stage") == "pretrain"
        template = cfg.get("template") or ("plain" if stage1 else DEFAULT_TEMPLATE)
        ckpt.template = template if template in TEMPLATES else DEFAULT_TEMPLATE
        ckpt.image_mode = cfg.get("image_mode") or (CROP if stage1 else PAD)
    return ckpt


_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_sizes(directory: Path, ckpt: Checkpoint) -> None:
    """A size of 0 converts without complaint, and then llama.cpp aborts the process when it loads the file
    (a language model without feed-forward layers: GGML_ASSERT in ggml_mul_mat)."""
    for part, cfg in (("text_config", ckpt.text), ("vision_config", ckpt.vision)):
        for key in _SIZES:
            value = getattr(cfg, key, 1)
            if value is not None and value < 1:
                raise ConvertError(f"{directory}: {part}.{key} is {value}; llama.cpp cannot run a model without it")


def _normalisation(*directories: Path) -> dict:
    """image_mean/image_std from the first preprocessor_config.json found, else CLIP's."""
    for directory in directories:
        path = directory / "preprocessor_config.json"
        if path.is_file():
            cfg = _read_json(path)
            if "image_mean" in cfg and "image_std" in cfg:
                return {"image_mean": tuple(cfg["image_mean"]), "image_std": tuple(cfg["image_std"])}
    return {}


def _load_llava_hf(directory: Path, config: dict) -> Checkpoint:
    from transformers import LlavaConfig

    cfg = LlavaConfig.from_dict(config)
    if cfg.vision_config.model_type != "clip_vision_model":
        raise ConvertError(f"{directory}: vision tower {cfg.vision_config.model_type!r} is not CLIP")
    if cfg.text_config.model_type != "llama":
        raise ConvertError(f"{directory}: language model {cfg.text_config.model_type!r} is not LLaMA")
    if cfg.vision_feature_select_strategy != "default":
        raise ConvertError("only vision_feature_select_strategy='default' (CLS dropped) runs in llama.cpp")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ConvertError("several vision feature layers are not supported")
    if cfg.projector_hidden_act != "gelu":
        raise ConvertError(f"projector activation {cfg.projector_hidden_act!r} is not supported (only gelu)")
    files = _weight_files(directory)
    if not files:
        raise ConvertError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    tensors = TensorSource()
    tensors.add_files(files, _LLAVA_HF_KEYS)
    return Checkpoint(
        name=directory.name,
        text=cfg.text_config,
        vision=cfg.vision_config,
        projector="mlp2x_gelu",
        feature_layer=_feature_index(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers),
        image_mode=PAD,
        tokenizer_dir=directory,
        tensors=tensors,
        image_token_id=cfg.image_token_id,
        **_normalisation(directory),
    )


def _load_original(directory: Path, config: dict, vision_tower: Path | None, fetch) -> Checkpoint:
    if config.get("mm_use_im_start_end"):
        raise ConvertError("checkpoints with mm_use_im_start_end (image start/end tokens) are not supported")
    select = config.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise ConvertError(f"mm_vision_select_feature={select!r} is not supported (only 'patch')")
    projector = config.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise ConvertError(f"projector type {projector!r} is not supported (linear or mlp2x_gelu)")

    tower_dir = _locate_tower(directory, config, vision_tower, fetch)
    text_keys = {k: v for k, v in config.items() if not k.startswith("mm_")}
    text = LlamaConfig(**{k: v for k, v in text_keys.items() if k not in ("architectures", "model_type")})
    vision = CLIPVisionConfig.from_pretrained(tower_dir)

    files = _weight_files(directory)
    if not files:
        raise ConvertError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    tensors = TensorSource()
    tensors.add_files(files, _ORIGINAL_KEYS)
    if not tensors.names("vision_tower."):
        tower_files = _weight_files(tower_dir)
        if not tower_files:
            raise ConvertError(f"{tower_dir}: no vision tower weights")
        tensors.add_files(tower_files, _TOWER_KEYS)
    return Checkpoint(
        name=directory.name,
        text=text,
        vision=vision,
        projector=projector,
        feature_layer=_feature_index(config.get("mm_vision_select_layer", -2), vision.num_hidden_layers),
        image_mode=PAD if config.get("image_aspect_ratio") == "pad" else CROP,
        tokenizer_dir=directory,
        tensors=tensors,
        **_normalisation(tower_dir, directory),
    )


def _locate_tower(directory: Path, config: dict, vision_tower: Path | None, fetch) -> Path:
    if vision_tower is not None:
        if not (vision_tower / "config.json").is_file():
            raise ConvertError(f"--vision-tower {vision_tower}: no CLIP model there (config.json missing)")
        return vision_tower
    named = config.get("mm_vision_tower") or config.get("vision_tower")
    if not named:
        raise ConvertError(f"{directory}: config names no vision tower; pass --vision-tower PATH")
    local = Path(named).expanduser()
    if (local / "config.json").is_file():
        return local
    if fetch is not None and re.fullmatch(r"[\w.-]+/[\w.-]+", named):
        return fetch(named)
    raise ConvertError(f"vision tower {named!r} not found; pass --vision-tower PATH to a CLIP model directory")


def _check_complete(ckpt: Checkpoint) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight", "vision_tower.vision_model.embeddings.class_embedding"]
    needed += [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(ckpt.text.num_hidden_layers)]
    needed += ["projector.weight"] if ckpt.projector == "linear" else ["projector.0.weight", "projector.2.weight"]
    for name in needed:
        if name not in ckpt.tensors:
            raise ConvertError(f"checkpoint lacks tensor {name!r}")
    if ckpt.vision.intermediate_size == ckpt.vision.hidden_size:
        # clip.cpp takes an FFN whose down projection is square for a legacy file with swapped up/down.
        raise ConvertError("vision towers whose FFN width equals their hidden size cannot run in llama.cpp")
