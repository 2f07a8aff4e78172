"""The model: transformers' LlavaForConditionalGeneration assembled from a CLIP vision tower and a LLaMA.

LLaVA-1.5 (FACTS.md): the tower's penultimate hidden state, CLS dropped, goes through Linear -> GELU -> Linear
into the LLM's embedding space, one vector per image token. llava-hf's layout adds `<image>` and `<pad>` to the
tokenizer and pads the vocabulary to a multiple of 64; the output of training is that layout, which
`llava convert` reads as it is.

What trains: stage 1 the projector alone; stage 2 the projector and the LLM, fully or through LoRA adapters on
every Linear of the LLM (merged into the weights on save). The vision tower never trains.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train.config import Config, TrainError, projector_file

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf: 32002 tokens -> 32064 rows
PROJECTOR = "model.multi_modal_projector."  # the projector's prefix in LlavaForConditionalGeneration's state dict


class ModelError(TrainError):
    pass


def _loading(what: str, source: str, load):
    """Turn a failed from_pretrained (no such repo, no network, wrong kind of model) into one line."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{what}={source}: cannot load it ({first})") from None


def load_tokenizer(cfg: Config):
    """The LLM's tokenizer with `<image>` (and `<pad>`, when it has no pad token) added, as llava-hf has them."""
    from transformers import AutoTokenizer

    source = cfg.init or cfg.llm
    tok = _loading("init" if cfg.init else "llm", source, lambda: AutoTokenizer.from_pretrained(source))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "right"
    tok.model_max_length = cfg.max_length
    return tok


@dataclass(frozen=True)
class Vision:
    """What the data needs to know about the vision side before any weights load."""

    config: object  # CLIPVisionConfig
    image_size: int
    image_seq_length: int  # patches per image: CLS dropped ("default" feature selection)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    processor: object  # CLIPImageProcessor to save beside the model


def vision(cfg: Config) -> Vision:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig

    source = cfg.init or cfg.vision_tower
    if cfg.init:
        config = _loading("init", source, lambda: LlavaConfig.from_pretrained(source)).vision_config
    else:
        config = _loading("vision_tower", source, lambda: CLIPVisionConfig.from_pretrained(source))
    try:
        processor = CLIPImageProcessor.from_pretrained(source)
    except OSError:  # a bare tower without preprocessor_config.json: CLIP's own settings (its mean and std)
        size = config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return Vision(
        config=config,
        image_size=config.image_size,
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        processor=processor,
    )


def _quantization(cfg: Config, compute_dtype):
    if cfg.bits != 4:
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("bits=4 (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}


def empty_llava(config):
    """LlavaForConditionalGeneration(config) on the meta device: a shell that costs no memory, for parts loaded
    elsewhere. Under ZeRO-3 transformers would build it sharded and initialise it, which a meta shell cannot be:
    its hook is switched off meanwhile (the parts themselves were loaded sharded)."""
    from transformers import LlavaForConditionalGeneration
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        with torch.device("meta"):
            return LlavaForConditionalGeneration(config)
    from accelerate.state import AcceleratorState

    keep = AcceleratorState().deepspeed_plugin.dschf
    unset_hf_deepspeed_config()
    try:
        with torch.device("meta"):
            return LlavaForConditionalGeneration(config)
    finally:
        set_hf_deepspeed_config(keep)


def build(cfg: Config, tokenizer, vis: Vision, dtype: torch.dtype):
    """The LlavaForConditionalGeneration to train, every weight loaded or initialised (seeded), none trainable yet."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    quant = _quantization(cfg, dtype)
    if cfg.init:
        model = _loading("init", cfg.init, lambda: LlavaForConditionalGeneration.from_pretrained(cfg.init, dtype=dtype, **quant))
    else:
        llm = _loading("llm", cfg.llm, lambda: AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=dtype, **quant))
        placement = {"device_map": quant["device_map"]} if quant else {}  # QLoRA: the tower on the LLM's GPU too
        tower = _loading("vision_tower", cfg.vision_tower, lambda: CLIPVisionModel.from_pretrained(cfg.vision_tower, dtype=dtype, **placement))
        config = LlavaConfig(
            vision_config=tower.config,
            text_config=llm.config,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            image_seq_length=vis.image_seq_length,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
        )
        model = empty_llava(config)  # its parts are the loaded models, moved in whole
        model.model.vision_tower = tower
        model.model.language_model = llm.model
        model.lm_head = llm.lm_head
        torch.manual_seed(cfg.seed)
        # A fresh projector with PyTorch's default initialisation, as LLaVA's build_vision_projector makes it.
        device = next(llm.parameters()).device
        model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(device=device, dtype=dtype)
        rows = max(len(tokenizer), llm.config.vocab_size)  # grow only, never drop rows
        model.resize_token_embeddings(rows, pad_to_multiple_of=VOCAB_MULTIPLE)
    if cfg.projector:
        load_projector(model, cfg.projector)
    model.config.use_cache = model.config.text_config.use_cache = False
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_projector(model, path: str) -> None:
    """Stage 1's projector: our projector.safetensors, or original LLaVA's mm_projector.bin (mm_projector.0/.2)."""
    file = projector_file(path)
    if file.suffix == ".bin":
        state = torch.load(file, map_location="cpu", weights_only=True)
        rename = {"0": "linear_1", "2": "linear_2"}
        state = {f"{rename[k.split('.')[-2]]}.{k.split('.')[-1]}": v for k, v in state.items() if "mm_projector" in k}
    else:
        state = load_file(file)
    projector = model.model.multi_modal_projector
    try:
        projector.load_state_dict({k: v.to(projector.linear_1.weight.dtype) for k, v in state.items()})
    except RuntimeError as e:
        raise ModelError(f"projector={path}: does not fit this model ({str(e).splitlines()[0]} ...)") from None


def llm_linear_names(model) -> list[str]:
    """Every Linear of the language model (not the tower, projector or lm_head): LoRA's targets, as LLaVA's."""
    prefix = "model.language_model."
    return [name for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, torch.nn.Linear)]


def set_trainable(model, cfg: Config):
    """Freeze all, then open what this stage trains. Returns the model to train (a PeftModel with LoRA)."""
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.stage == "finetune":
        if cfg.lora_r:
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            if cfg.bits == 4:
                model = prepare_model_for_kbit_training(
                    model, cfg.gradient_checkpointing, {"use_reentrant": False} if cfg.gradient_checkpointing else None
                )
            lora = LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=llm_linear_names(model), bias="none"
            )
            model = get_peft_model(model, lora)  # freezes all but the adapters
        else:
            llava(model).model.language_model.requires_grad_(True)
            llava(model).lm_head.requires_grad_(True)
    llava(model).model.multi_modal_projector.requires_grad_(True)
    llava(model).model.vision_tower.requires_grad_(False)
    return model


def llava(model):
    """The LlavaForConditionalGeneration inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_projector(name: str) -> bool:
    return PROJECTOR in name


# -- the trained model on disk -------------------------------------------------------------------------------


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A PeftModel's state dict with each adapter folded into its weight: W + scaling * B @ A, LoRA keys gone."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for key in state:
        if ".lora_A." in key:
            a = state[key].float()
            b = state[key.replace(".lora_A.", ".lora_B.")].float()
            target = key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"
            out[target] = (out[target].float() + scaling * (b @ a)).to(out[target].dtype)
    return out


def dequantized_state(net) -> dict[str, torch.Tensor]:
    """QLoRA: the state dict with every 4-bit weight dequantized back to its compute dtype."""
    import bitsandbytes as bnb

    state = {}
    for name, module in net.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(p, bnb.nn.Params4bit):
                p = bnb.functional.dequantize_4bit(p.data, p.quant_state)
            state[f"{name}.{pname}" if name else pname] = p.detach()
    return state


def _sentencepiece_model(source: str) -> Path | None:
    """The LLM's tokenizer.model, which llava-hf directories carry beside tokenizer.json (converters prefer it)."""
    local = Path(source)
    if local.is_dir():
        return local / "tokenizer.model" if (local / "tokenizer.model").is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, "tokenizer.model"))
    except Exception:  # no such file in the repo, or offline: tokenizer.json alone describes the vocabulary
        return None


def save(out_dir: Path, config, state: dict[str, torch.Tensor], tokenizer, vis: Vision, dtype: torch.dtype, cfg: Config) -> None:
    """A llava-hf directory: weights + config, tokenizer, image processor; projector.safetensors beside them."""
    from transformers import GenerationConfig, LlavaProcessor

    state = {k: v.detach().to("cpu", dtype) for k, v in state.items()}
    config.use_cache = config.text_config.use_cache = True
    shell = empty_llava(config)
    expected = set(shell.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ModelError(f"the trained weights do not match LlavaForConditionalGeneration (missing {missing}, extra {extra})")
    config.dtype = dtype
    shell.save_pretrained(out_dir, state_dict=state)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)
    processor = LlavaProcessor(
        image_processor=vis.processor,
        tokenizer=tokenizer,
        patch_size=vis.config.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    vis.processor.save_pretrained(out_dir)  # preprocessor_config.json, as llava-hf has it
    if (spm := _sentencepiece_model(cfg.init or cfg.llm)) is not None:
        shutil.copyfile(spm, out_dir / "tokenizer.model")
    save_file({k.removeprefix(PROJECTOR): v.contiguous() for k, v in state.items() if is_projector(k)}, out_dir / "projector.safetensors")
    (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
