"""train.model and train.loop in isolation: the assembled model is its parts, the blank image of text-only batches
changes nothing, LoRA merges exactly, stage 2 starts from stage 1's projector, and the step arithmetic is the
same for any split of the global batch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionModel, LlamaForCausalLM

from llavacli.prompts import get_template
from train import config, data, loop, model
from train_kit import IMAGE_TOKENS, base_models, dataset
from train_kit import config as write_config


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "train-base"
    llm, clip = base_models(root)
    data_file, images = dataset(root, "finetune")
    return root, llm, clip, data_file, images


def make(parts, tmp_path, stage="finetune", **extra):
    root, llm, clip, data_file, images = parts
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config.load(str(write_config(tmp_path / "c.toml", stage, llm, clip, data_file, images, tmp_path / "out", **extra)), [])
    tok = model.load_tokenizer(cfg)
    vis = model.vision(cfg)
    torch.manual_seed(0)
    return cfg, tok, vis, model.build(cfg, tok, vis, torch.float32)


def test_assembled_model_is_the_llm_and_the_tower_with_a_projector_between(parts, tmp_path):
    _, llm_dir, clip_dir, _, _ = parts
    cfg, tok, vis, net = make(parts, tmp_path)
    llm = LlamaForCausalLM.from_pretrained(llm_dir).eval()
    tower = CLIPVisionModel.from_pretrained(clip_dir).eval()
    net.eval()
    ids = torch.tensor([tok("the red circle is big").input_ids])
    with torch.no_grad():
        ours = net(input_ids=ids).logits
        theirs = llm(ids).logits
        assert torch.equal(ours[..., : theirs.shape[-1]], theirs)
        pixels = torch.randn(1, 3, 56, 56)
        features = net.get_image_features(pixel_values=pixels).pooler_output[0]
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.allclose(features, net.model.multi_modal_projector(hidden)[0])
    assert features.shape == (IMAGE_TOKENS, llm.config.hidden_size)
    assert net.config.image_token_id == tok.convert_tokens_to_ids("<image>") and net.config.image_seq_length == IMAGE_TOKENS
    assert net.config.text_config.vocab_size % 64 == 0 and net.config.text_config.vocab_size >= len(tok)


def test_blank_image_of_a_text_only_batch_changes_neither_loss_nor_gradients(parts, tmp_path):
    cfg, tok, vis, net = make(parts, tmp_path)
    net = model.set_trainable(net, cfg)
    encoder = data.Encoder(tok, get_template("vicuna_v1"), net.config.image_token_id, IMAGE_TOKENS, 256)
    records = data.load_records(cfg.data)
    texts = [r for r in records if "image" not in r]
    samples = [
        {"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels), "pixel_values": None}
        for e in (encoder.encode(r) for r in texts)
    ]
    pixels = data.Pixels(vis.image_size, "pad", vis.mean, vis.std)
    batch = data.Collator(tok.pad_token_id, net.config.image_token_id, IMAGE_TOKENS, pixels)(samples)
    assert batch["pixel_values"].shape[0] == 1  # the blank image

    def grads(loss):
        net.zero_grad()
        loss.backward()
        return {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters() if p.requires_grad}

    with_blank = loop.summed_loss(net, batch)
    g_blank = grads(with_blank)
    n = max(len(s["input_ids"]) for s in samples)
    plain = {k: batch[k][:, :n] for k in ("input_ids", "labels", "attention_mask")} | {"pixel_values": None}
    without = loop.summed_loss(net, plain)
    g_plain = grads(without)
    assert torch.allclose(with_blank, without, rtol=1e-6)
    for name, g in g_blank.items():
        if model.is_projector(name):
            assert g is not None and g.abs().max() == 0, name  # reached, and exactly zero
        else:
            assert torch.allclose(g, g_plain[name], rtol=1e-4, atol=1e-6), name  # float noise of longer matmuls


def test_lora_adapters_merge_into_exactly_the_adapted_model(parts, tmp_path):
    cfg, tok, vis, net = make(parts, tmp_path, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    peft_model = model.set_trainable(net, cfg).eval()
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert {n.split(".lora_")[0].split(".")[-1] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))  # B starts at zero; give the adapters an effect
    ids = torch.tensor([tok("the blue square").input_ids])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged_state = model.merge_lora(peft_model.state_dict(), cfg.lora_alpha / cfg.lora_r)
    assert not any("lora" in k or "base_layer" in k for k in merged_state)
    _, _, _, plain = make(parts, tmp_path / "fresh")
    assert set(merged_state) == set(plain.state_dict())
    plain.load_state_dict(merged_state)
    with torch.no_grad():
        merged = plain.eval()(input_ids=ids).logits
        base = make(parts, tmp_path / "base")[3].eval()(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3  # the adapters did change the model


def test_stage2_starts_from_stage1_projector_in_either_format(parts, tmp_path):
    _, _, _, net = make(parts, tmp_path / "a")
    trained = {k: torch.randn_like(v) for k, v in net.model.multi_modal_projector.state_dict().items()}
    save_file(trained, tmp_path / "projector.safetensors")
    _, _, _, stage2 = make(parts, tmp_path / "b", projector=str(tmp_path))
    for k, v in stage2.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, trained[k])
    # liuhaotian's mm_projector.bin (an nn.Sequential: .0 and .2) loads as linear_1 and linear_2.
    original = {f"model.mm_projector.{'0' if k.startswith('linear_1') else '2'}.{k.split('.')[-1]}": v * 2 for k, v in trained.items()}
    torch.save(original, tmp_path / "mm_projector.bin")
    _, _, _, stage2 = make(parts, tmp_path / "c", projector=str(tmp_path / "mm_projector.bin"))
    for k, v in stage2.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, trained[k] * 2)


def _plan(world, rank, micro, accumulation, grouped=False, n=40):
    lengths = {i: (10 + i if i % 3 else -(5 + i)) for i in range(n)}
    return loop.Plan(list(range(n)), lengths, micro, world, rank, accumulation, 7, grouped)


def test_every_split_of_the_global_batch_sees_the_same_samples_per_step():
    for step in range(12):  # three epochs of four steps
        one = {i for mb in _plan(1, 0, 8, 1).micro_batches(step) for i in mb}
        accumulated = {i for mb in _plan(1, 0, 2, 4).micro_batches(step) for i in mb}
        spread = {i for r in range(4) for mb in _plan(4, r, 2, 1).micro_batches(step) for i in mb}
        mixed = [i for r in range(2) for mb in _plan(2, r, 2, 2).micro_batches(step) for i in mb]
        assert len(one) == 8 and one == accumulated == spread == set(mixed) and len(mixed) == 8
    epoch0 = [i for s in range(5) for mb in _plan(1, 0, 8, 1).micro_batches(s) for i in mb]
    assert len(set(epoch0)) == 40  # 40 samples, 5 steps of 8: each once per epoch


def test_grouping_by_modality_keeps_each_forward_pass_to_one_modality():
    plans = [_plan(2, r, 3, 2, grouped=True, n=61) for r in range(2)]
    for step in range(plans[0].steps_per_epoch):
        for m in range(2):
            megabatch = [i for p in plans for i in p.micro_batches(step)[m]]
            kinds = {plans[0].lengths[i] > 0 for i in megabatch}
            assert len(kinds) == 1 or step == plans[0].steps_per_epoch - 1


def test_learning_rate_follows_transformers_cosine_schedule_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    total, warmup = 50, loop.warmup_steps(50, 0.03)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    schedule = get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * loop.lr_factor(step, total, warmup), abs=1e-12)
        opt.step()
        schedule.step()
    assert warmup == 2 and loop.lr_factor(0, total, warmup) == 0.0
