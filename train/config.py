"""A training run's settings: one flat dataclass, filled from a TOML file and `key=value` overrides.

Nothing here imports torch, so the command line can reject a bad config in a blink. Every key, its type, its
default and its meaning are in `Config` below; `llava train keys` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("pretrain", "finetune")
ENGINES = ("ddp", "deepspeed", "fsdp")


class TrainError(Exception):
    """Anything a user can fix (config, data, model paths): the CLI prints its one-line message and exits 1."""


class SampleError(TrainError):
    """One sample failed mid-run (an image the audit found but cannot read): only its own process knows."""


class ConfigError(TrainError):
    """A config that cannot be used: the message names the file or key at fault."""


def _key(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    stage: str = _key("", "pretrain (stage 1: the projector alone) or finetune (stage 2: projector + LLM); must match the command")

    # The model: assembled from a LLaMA/Vicuna and a CLIP vision tower, or loaded whole from a llava-hf checkpoint.
    llm: str = _key("", "the language model: a local directory or a Hugging Face hub id (lmsys/vicuna-7b-v1.5)")
    vision_tower: str = _key("", "the CLIP vision model: a local directory or a hub id (openai/clip-vit-large-patch14-336)")
    init: str = _key("", "start from this llava-hf checkpoint (a directory) instead of assembling llm + vision_tower")
    projector: str = _key("", "stage 2: stage 1's projector.safetensors, or LLaVA's mm_projector.bin (or the directory holding it)")
    vision_feature_layer: int = _key(-2, "which hidden state of the vision tower feeds the projector (-2: the penultimate)")

    # The data.
    data: str = _key("", "the training set: a JSON list in LLaVA's format")
    image_folder: str = _key("", "the folder that the samples' image paths are relative to")
    template: str = _key("", "conversation template from llavacli.prompts; default: plain for pretrain, vicuna_v1 for finetune")
    image_mode: str = _key("", "pad (pad to a square with the mean colour) or crop; default: crop for pretrain, pad for finetune")
    max_length: int = _key(2048, "longest sequence in tokens, the image's tokens included; longer samples are truncated")
    max_bad_fraction: float = _key(0.001, "stop before training when more than this fraction of samples cannot be used")
    group_by_modality_length: bool = _key(False, "build each batch from image samples only or text-only samples only (LLaVA-1.5 stage 2)")
    num_workers: int = _key(4, "data loader worker processes per GPU")

    # What trains, beyond the stage's own choice (stage 1: projector; stage 2: projector + LLM).
    lora_r: int = _key(0, "stage 2: LoRA rank on every Linear of the LLM; 0 trains the LLM fully")
    lora_alpha: int = _key(256, "LoRA alpha")
    lora_dropout: float = _key(0.05, "LoRA dropout")
    bits: int = _key(16, "16, or 4 for QLoRA (a 4-bit nf4 LLM under the LoRA adapters; needs bitsandbytes and a GPU)")

    # Optimisation: AdamW (betas 0.9/0.999, eps 1e-8) with linear warmup then cosine decay to zero.
    epochs: float = _key(1.0, "passes over the data")
    max_steps: int = _key(0, "stop after this many optimizer steps (0: as many as the epochs give)")
    global_batch_size: int = _key(128, "samples per optimizer step over all GPUs; gradient accumulation makes up the rest")
    per_device_batch_size: int = _key(16, "samples per GPU per forward pass")
    lr: float = _key(2e-5, "peak learning rate")
    projector_lr: float = _key(0.0, "peak learning rate of the projector (0: the same as lr)")
    weight_decay: float = _key(0.0, "AdamW weight decay, on matrices only")
    warmup_ratio: float = _key(0.03, "fraction of the steps spent warming the learning rate up from zero")
    max_grad_norm: float = _key(1.0, "clip the gradient's global norm to this (0: no clipping)")
    seed: int = _key(42, "seed of the weights' initialisation and the data order")

    # Precision, memory and the distributed engine.
    bf16: bool = _key(True, "bfloat16 mixed precision where the GPU has it (fp32 otherwise)")
    tf32: bool = _key(True, "TensorFloat-32 matmuls where the GPU has them")
    gradient_checkpointing: bool = _key(True, "recompute activations in the backward pass to save memory")
    engine: str = _key("ddp", "ddp (plain data parallel, also one GPU), deepspeed or fsdp")
    deepspeed_config: str = _key("", "with engine=deepspeed: a DeepSpeed JSON (zero2.json and zero3.json ship with the configs)")

    # Output and bookkeeping.
    output_dir: str = _key("", "where the checkpoints, the log and the trained model go")
    save_steps: int = _key(0, "write a resumable checkpoint every this many optimizer steps (0: never)")
    save_total_limit: int = _key(1, "keep this many checkpoints, the newest")
    resume: str = _key("auto", "auto (from the newest checkpoint in output_dir, if any), never, or a checkpoint directory")
    log_steps: int = _key(1, "write a log line every this many optimizer steps")
    tensorboard: bool = _key(True, "also log to TensorBoard under output_dir/tensorboard, when tensorboard is installed")

    # ---------------------------------------------------------------------------------------------------------

    @property
    def accumulation_steps(self) -> int:
        """Gradient accumulation per optimizer step, for this many processes (set by resolve)."""
        return self.global_batch_size // (self.per_device_batch_size * self._world)

    _world: int = field(default=1, repr=False, metadata={"internal": True})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields()}

    def validate(self, command: str) -> None:
        """Checks that need no torch: known choices, consistent numbers, files that must exist."""
        if self.stage != command:
            raise ConfigError(f"this is a {self.stage or 'stage-less'} config; run `{self.stage or command}` with it, or set stage={command}")
        for key in ("output_dir", "data"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is not set")
        if not self.init and not (self.llm and self.vision_tower):
            raise ConfigError("set llm and vision_tower (the models to assemble), or init (a llava-hf checkpoint)")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.engine == "deepspeed" and not self.deepspeed_config:
            raise ConfigError("engine=deepspeed needs deepspeed_config (zero2.json or zero3.json)")
        if self.image_mode not in ("pad", "crop"):
            raise ConfigError(f"image_mode={self.image_mode!r}: choose pad or crop")
        if self.bits not in (4, 16):
            raise ConfigError(f"bits={self.bits}: choose 16, or 4 for QLoRA")
        if self.bits == 4 and not self.lora_r:
            raise ConfigError("bits=4 (QLoRA) trains LoRA adapters: set lora_r")
        if self.stage == "pretrain" and self.lora_r:
            raise ConfigError("stage 1 trains the projector alone: lora_r applies to finetune")
        for key in ("global_batch_size", "per_device_batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1")
        if self.global_batch_size % self.per_device_batch_size:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_batch_size={self.per_device_batch_size}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio must be in [0, 1)")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ConfigError(f"resume={self.resume}: no such checkpoint directory")
        from llavacli.prompts import TEMPLATES

        if self.template not in TEMPLATES:
            raise ConfigError(f"template={self.template!r}: choose one of {', '.join(TEMPLATES)}")
        if not Path(self.data).is_file():
            raise ConfigError(f"data={self.data}: no such file")
        if self.image_folder and not Path(self.image_folder).is_dir():
            raise ConfigError(f"image_folder={self.image_folder}: no such directory")
        for key in ("llm", "vision_tower", "init"):
            _check_model_source(key, getattr(self, key))
        if self.projector and not projector_file(self.projector).is_file():
            raise ConfigError(f"projector={self.projector}: no projector.safetensors (which stage 1 writes) or mm_projector.bin there")

    def set_world(self, world: int) -> None:
        """Fixes the number of processes; the per-device batch times the processes must divide the global batch."""
        if self.global_batch_size % (self.per_device_batch_size * world):
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_batch_size x processes"
                f" = {self.per_device_batch_size} x {world}"
            )
        self._world = world


def fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if not f.metadata.get("internal")]


def projector_file(path: str) -> Path:
    """A projector file, or the one in a directory: stage 1's projector.safetensors, or LLaVA's mm_projector.bin."""
    p = Path(path)
    if not p.is_dir():
        return p
    original = p / "mm_projector.bin"
    return original if original.is_file() and not (p / "projector.safetensors").is_file() else p / "projector.safetensors"


def _check_model_source(key: str, value: str) -> None:
    """A local path must exist; anything else that looks like `org/name` is left to the hub to judge."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.exists():
        return
    looks_local = value.startswith((".", "/", "~")) or value.count("/") != 1
    if looks_local:
        raise ConfigError(f"{key}={value}: no such directory (and not a hub id of the form org/name)")


STAGE_DEFAULTS = {
    # What the recipe does in each stage when the config does not say (FACTS.md: plain + crop, then vicuna_v1 + pad).
    "pretrain": {"template": "plain", "image_mode": "crop"},
    "finetune": {"template": "vicuna_v1", "image_mode": "pad"},
}


def find_config(name: str) -> Path:
    """A config file by path, or by the name of one shipped in train/configs (with or without .toml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"{name}: no such config file (shipped configs: {shipped})")


def parse_value(key: str, text: str, kind: type):
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text}: expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text}: expected a number") from None
    return text


def _types() -> dict[str, type]:
    return {f.name: {"str": str, "int": int, "float": float, "bool": bool}[f.type] for f in fields()}


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, [f.name for f in fields()], n=1)
    hint = f" (did you mean {close[0]}?)" if close else "; `llava train keys` lists them"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def load(path: str, overrides: list[str]) -> Config:
    """The config file, then the overrides in order, then the stage's defaults for what is still unset."""
    file = find_config(path)
    try:
        values = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid TOML ({e})") from None
    types = _types()
    cfg = Config()
    for key, value in values.items():
        if key not in types:
            raise _unknown(key, str(file))
        kind = types[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{file}: {key} = {value!r} is not a {kind.__name__}")
        setattr(cfg, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"{item!r}: overrides are key=value")
        if key not in types:
            raise _unknown(key, "command line")
        setattr(cfg, key, parse_value(key, text, types[key]))
    for key, value in STAGE_DEFAULTS.get(cfg.stage, {}).items():
        if not getattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


def save(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"resume", "num_workers", "save_steps", "save_total_limit", "log_steps", "tensorboard", "output_dir", "per_device_batch_size", "gradient_checkpointing"}


def describe_keys() -> str:
    lines = []
    for f in fields():
        lines.append(f"  {f.name} = {f.default!r}  ({f.type})\n      {f.metadata['help']}")
    return "\n".join(lines)
