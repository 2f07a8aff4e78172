"""One stage of LLaVA's training, from a checked config to a saved llava-hf model.

    stage 1 (pretrain): projector only, template plain, images cropped       -> OUTPUT/ + OUTPUT/projector.safetensors
    stage 2 (finetune): projector + LLM (or LoRA), template vicuna_v1, padded -> OUTPUT/ (LoRA merged)

Order matters for the big runs: the engine first (DeepSpeed ZeRO-3 must be set up before the weights load, so
that they load sharded), then the data is checked in full (a bad data set stops the run before minutes of model
loading), then the model, then resumption.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from llavacli.prompts import get_template
from train import checkpoint, data, loop, model
from train.config import CONFIG_DIR, RESUMABLE_CHANGES, Config, ConfigError, TrainError
from train.logs import LOG_NAME, RunLog

FINISHED = "trainer_state.json"  # in OUTPUT once the model is saved


def _bf16(cfg: Config) -> bool:
    return cfg.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _deepspeed_config(cfg: Config, world: int, bf16: bool) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the config, as the HF Trainer fills them."""
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        path = CONFIG_DIR / cfg.deepspeed_config
    if not path.is_file():
        raise ConfigError(f"deepspeed_config={cfg.deepspeed_config}: no such file (zero2.json and zero3.json ship in {CONFIG_DIR})")
    ds = json.loads(path.read_text())
    accumulation = cfg.global_batch_size // (cfg.per_device_batch_size * world)
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = cfg.global_batch_size
    ds.setdefault("bf16", {})["enabled"] = bf16
    ds.setdefault("fp16", {})["enabled"] = False
    # Clipping is max_grad_norm's, as with the other engines, unless the JSON names a number. (LLaVA's JSONs name
    # none, and DeepSpeed's default then was no clipping; it is 1.0 in recent versions: too fickle to rely on.)
    if not isinstance(ds.get("gradient_clipping"), (int, float)):
        ds["gradient_clipping"] = cfg.max_grad_norm
    from transformers import AutoConfig

    source = cfg.init or cfg.llm
    text = AutoConfig.from_pretrained(source)
    hidden = getattr(text, "text_config", text).hidden_size
    zero = ds.get("zero_optimization", {})
    for key, value in {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    world = int(os.environ.get("WORLD_SIZE", "1"))  # every launcher sets it; the accumulation depends on it
    cfg.set_world(world)
    bf16 = _bf16(cfg)
    plugins = {}
    if cfg.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("engine=deepspeed needs DeepSpeed: pip install deepspeed") from None
        from accelerate.utils import DeepSpeedPlugin

        ds = _deepspeed_config(cfg, world, bf16)
        stage3 = ds.get("zero_optimization", {}).get("stage") == 3
        plugins["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=stage3)
    elif cfg.engine == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            sharding_strategy="FULL_SHARD",
            auto_wrap_policy="transformer_based_wrap",  # the model's _no_split_modules: decoder and encoder layers
            use_orig_params=True,  # frozen and trainable weights share wrapped units
            state_dict_type="SHARDED_STATE_DICT",
            sync_module_states=False,
        )
    if cfg.bits == 4 and cfg.engine != "ddp":
        raise ConfigError("bits=4 (QLoRA) runs with engine=ddp")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.accumulation_steps, sync_with_dataloader=False),
        **plugins,
    )
    if accelerator.num_processes != world:
        raise TrainError(f"the launcher started {world} processes but accelerate runs {accelerator.num_processes}")
    if cfg.engine == "fsdp" and accelerator.distributed_type.name != "FSDP" and accelerator.is_main_process:
        print("engine fsdp: accelerate shards only across several GPUs; this run is plain data parallel", file=sys.stderr)
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, bf16


def _prepare_output(cfg: Config, accelerator) -> tuple[Path, Path | None]:
    """The output directory, and the checkpoint to resume from (None: start afresh)."""
    out = Path(cfg.output_dir)
    finished = out / FINISHED
    if cfg.resume == "never":
        if accelerator.is_main_process:
            shutil.rmtree(out / checkpoint.DIR, ignore_errors=True)
            for name in (FINISHED, LOG_NAME):
                (out / name).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    elif finished.is_file():
        raise TrainError(f"output_dir={out} holds a finished run; choose another output_dir, or resume=never to train it again")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if cfg.resume == "auto":
        found = checkpoint.complete(out)
        return out, found[-1] if found else None
    return out, None if cfg.resume == "never" else Path(cfg.resume)


def _check_resumable(cfg: Config, saved: dict, path: Path) -> None:
    current = cfg.to_dict()
    changed = sorted(k for k, v in saved.items() if k not in RESUMABLE_CHANGES and current.get(k) != v)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"cannot resume from {path}: the config changed ({detail}); use resume=never to start over")


def _load_data(cfg: Config, accelerator, tokenizer, vis: model.Vision, out: Path, say) -> tuple[data.LlavaDataset, data.Audit]:
    from accelerate.utils import gather_object

    records = data.load_records(cfg.data)
    image_id = tokenizer.convert_tokens_to_ids(model.IMAGE_TOKEN)
    encoder = data.Encoder(tokenizer, get_template(cfg.template), image_id, vis.image_seq_length, cfg.max_length)
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = data.audit(records, range(rank, len(records), world), encoder, cfg.image_folder)
    audit = data.collect(records, gather_object(rows) if world > 1 else rows)
    usable = len(audit.lengths)
    say(f"data: {usable} of {audit.n_records} samples usable, {len(audit.rejected)} rejected, {audit.truncated} truncated to max_length={cfg.max_length}")
    if audit.rejected:
        if accelerator.is_main_process:
            audit.write(out / "rejected_samples.json")
        say(f"data: {audit.summary()}; all listed in {out / 'rejected_samples.json'}")
        if len(audit.rejected) > cfg.max_bad_fraction * audit.n_records:
            raise data.DataError(
                f"{audit.summary()}: more than max_bad_fraction={cfg.max_bad_fraction:g}; see {out / 'rejected_samples.json'}"
            )
    pixels = data.Pixels(vis.image_size, cfg.image_mode, vis.mean, vis.std)
    return data.LlavaDataset(records, encoder, cfg.image_folder, pixels), audit


def _optimizer(cfg: Config, net) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW as the HF Trainer sets it up (betas 0.9/0.999, eps 1e-8); the projector may have its own rate."""
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.projector_lr if (cfg.projector_lr and model.is_projector(name)) else cfg.lr
        decay = cfg.weight_decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else 0.0  # ZeRO-3 keeps the shape aside
        groups.setdefault((lr, decay), []).append(p)
    params = [{"params": ps, "lr": lr, "weight_decay": decay} for (lr, decay), ps in groups.items()]
    fused = torch.cuda.is_available() and cfg.bits != 4
    opt = torch.optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)
    return opt, [g["lr"] for g in params]


def run(cfg: Config) -> Path:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data loader workers fork after the audit tokenised
    accelerator, bf16 = make_accelerator(cfg)
    main = accelerator.is_main_process

    def say(text: str) -> None:
        if main:
            print(text, file=sys.stderr, flush=True)

    out, resume_from = _prepare_output(cfg, accelerator)
    if resume_from is not None:
        _check_resumable(cfg, checkpoint.read_state(resume_from)["config"], resume_from)

    tokenizer = model.load_tokenizer(cfg)
    vis = model.vision(cfg)
    dataset, audit = _load_data(cfg, accelerator, tokenizer, vis, out, say)
    plan = loop.Plan(
        audit.usable, audit.lengths, cfg.per_device_batch_size, accelerator.num_processes, accelerator.process_index,
        cfg.accumulation_steps, cfg.seed, cfg.group_by_modality_length,
    )
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    if total < 1:
        raise data.DataError(f"{len(audit.usable)} usable samples make no global batch of {plan.global_batch}")
    say(
        f"training: {total} steps of {plan.global_batch} samples ({accelerator.num_processes} processes x "
        f"{cfg.per_device_batch_size} x {cfg.accumulation_steps} accumulation), {'bf16' if bf16 else 'fp32'}, engine {cfg.engine}"
    )

    # Frozen weights in the compute precision; under plain DDP the trained ones stay fp32 (autocast does the
    # rest). DeepSpeed keeps its own fp32 master copy; FSDP needs one dtype throughout and casts on the fly.
    dtype = torch.bfloat16 if bf16 and cfg.engine != "fsdp" else torch.float32
    net = model.build(cfg, tokenizer, vis, dtype)
    net = model.set_trainable(net, cfg)
    if cfg.engine == "ddp":
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 (ZeRO-3 partitions hold a slice)
    trained = sum(numel(p) for p in net.parameters() if p.requires_grad)
    say(f"model: {trained:,} of {sum(numel(p) for p in net.parameters()):,} weights train")
    optimizer, base_lrs = _optimizer(cfg, net)
    net, optimizer = accelerator.prepare(net, optimizer)

    plain = accelerator.distributed_type.name in ("NO", "MULTI_GPU", "MULTI_CPU")
    if plain:  # checkpoints keep only the trained weights (accelerate saves and loads the unwrapped model)
        trainable = {n for n, p in accelerator.unwrap_model(net).named_parameters() if p.requires_grad}
        accelerator.register_save_state_pre_hook(lambda models, weights, _: _keep_trained(weights, trainable))
        accelerator.register_load_state_pre_hook(lambda models, path: _check_trained(path, trainable))
    save_kwargs = {"exclude_frozen_parameters": True} if cfg.engine == "deepspeed" else {}
    load_kwargs = {"strict": False} if plain else ({"load_module_strict": False} if cfg.engine == "deepspeed" else {})

    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from), **load_kwargs)
        start = checkpoint.read_state(resume_from)["step"]
        say(f"resuming from {resume_from} (step {start})")

    def save_checkpoint(step: int) -> None:
        state = {"step": step, "config": cfg.to_dict()}
        checkpoint.save(accelerator, out, step, state, cfg.save_total_limit, **save_kwargs)

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=loop.StepSampler(plan, start, total),
        collate_fn=data.Collator(tokenizer.pad_token_id, dataset.encoder.image_token_id, vis.image_seq_length, dataset.pixels),
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),  # its workers' seeds must not draw on the restored RNG
    )
    log = RunLog(out, total, start, main, cfg.tensorboard)
    try:
        loop.train(accelerator, net, optimizer, base_lrs, loader, plan, start, total, cfg, log, save_checkpoint)
    finally:
        log.close()

    _save_model(accelerator, net, cfg, tokenizer, vis, out, torch.bfloat16 if bf16 else torch.float32)
    if main:
        (out / FINISHED).write_text(json.dumps({"finished": True, "steps": total}) + "\n")
        say(f"saved {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _save_model(accelerator, net, cfg: Config, tokenizer, vis: model.Vision, out: Path, dtype: torch.dtype) -> None:
    """The trained model as a llava-hf directory, LoRA merged. Every process calls it: ZeRO-3 and FSDP gather."""
    state = accelerator.get_state_dict(net)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(net)
    if cfg.bits == 4:  # QLoRA: the 4-bit base weights dequantized, for merging and saving
        state = model.dequantized_state(unwrapped)
    if cfg.lora_r:
        state = model.merge_lora(state, cfg.lora_alpha / cfg.lora_r)
    model.save(out, model.llava(unwrapped).config, state, tokenizer, vis, dtype, cfg)


def _keep_trained(weights: list[dict], trainable: set[str]) -> None:
    for i, state in enumerate(weights):
        weights[i] = {k: v for k, v in state.items() if k in trainable}
        assert set(weights[i]) == trainable, "the checkpoint would miss trained weights"


def _check_trained(path: str, trainable: set[str]) -> None:
    """The weights are loaded non-strictly (frozen ones are not in the file): make sure the trained ones are."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        missing = trainable - set(f.keys())
    if missing:
        raise TrainError(f"checkpoint {path} lacks {len(missing)} of the weights this run trains (such as {min(missing)})")
