"""Whole stages on tiny models: what stage 1 changes, that stage 2 learns, and that its result runs in `llava ask`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conftest import run_llava
from train import config, model
from train.logs import read
from train_kit import IMAGE_TOKENS, base_models, dataset, run_inprocess, weights
from train_kit import config as write_config

SINGLE_TURN = {  # the training set's "what is in the image?" samples: image -> answer
    "red-square": "a red square.",
    "green-circle": "a green circle.",
    "blue-circle": "a blue circle.",
    "blue-square": "a blue square.",
    "yellow-square": "a yellow square.",
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "train-base"
    llm, clip = base_models(root)
    return root, llm, clip


@pytest.fixture(scope="module")
def overfit(parts, tmp_path_factory):
    """Stage 2 on the ten-sample set until it knows it by heart: 40 epochs of 5 steps, global batch 2."""
    root, llm, clip = parts
    data_file, images = dataset(root, "finetune")
    work = tmp_path_factory.mktemp("overfit")
    cfg = write_config(work / "c.toml", "finetune", llm, clip, data_file, images, work / "out",
                       epochs=40.0, lr=2e-3, warmup_ratio=0.1, global_batch_size=2, per_device_batch_size=2, tensorboard=True)
    return cfg, work / "out", images


def test_stage1_changes_only_the_projector(parts, tmp_path):
    root, llm, clip = parts
    data_file, images = dataset(root, "pretrain")
    cfg_file = write_config(tmp_path / "c.toml", "pretrain", llm, clip, data_file, images, tmp_path / "out", epochs=3.0, lr=5e-3)
    assert run_inprocess(["pretrain", str(cfg_file)]) == 0

    cfg = config.load(str(cfg_file), [])
    tok, vis = model.load_tokenizer(cfg), model.vision(cfg)
    initial = model.build(cfg, tok, vis, torch.float32).state_dict()  # the same seeded assembly the run began from
    trained = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    assert set(trained) == set(initial)
    changed = sorted(k for k in initial if not torch.equal(initial[k], trained[k]))
    assert changed == sorted(k for k in initial if model.is_projector(k))
    assert len(changed) == 4  # linear_1 and linear_2, weight and bias: every one of them moved
    # ... and the frozen parts are the base models' own weights, bit for bit.
    llm_weights = weights(llm)
    assert torch.equal(trained["model.language_model.layers.0.self_attn.q_proj.weight"], llm_weights["model.layers.0.self_attn.q_proj.weight"])
    rows = llm_weights["lm_head.weight"].shape[0]
    assert torch.equal(trained["lm_head.weight"][:rows], llm_weights["lm_head.weight"])
    # The projector file that stage 2 loads is the trained projector.
    saved = model.load_file(tmp_path / "out" / "projector.safetensors")
    assert {model.PROJECTOR + k for k in saved} == set(changed)
    for k, v in saved.items():
        assert torch.equal(trained[model.PROJECTOR + k], v)
    # It is a llava-hf directory: the processor expands <image> to the model's image tokens.
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    ids = processor(text="<image>\nhi", images=torch.zeros(3, 56, 56), return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == IMAGE_TOKENS
    assert (tmp_path / "out" / "preprocessor_config.json").is_file() and (tmp_path / "out" / "tokenizer.model").is_file()


def test_loss_falls_on_a_small_overfit_set_and_the_run_reports_progress(overfit, capfd):
    cfg, out, _ = overfit
    assert run_inprocess(["finetune", str(cfg)]) == 0
    log = read(out)
    assert [r["step"] for r in log] == list(range(1, 201))
    losses = [r["loss"] for r in log]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.0 and last < 0.1, (first, last)
    assert log[0]["lr"] == 0.0 and max(r["lr"] for r in log) == pytest.approx(2e-3) and log[-1]["lr"] < 1e-5
    assert all(r["grad_norm"] is not None and r["samples_per_s"] > 0 for r in log)
    err = capfd.readouterr().err
    assert "loss " in err and "lr " in err and "samples/s" in err and "ETA" in err
    assert "data: 10 of 10 samples usable" in err
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # Finished: the same command again is refused instead of silently starting over.
    assert run_inprocess(["finetune", str(cfg)]) == 1
    assert "holds a finished run" in capfd.readouterr().err


def test_the_result_of_training_converts_and_answers_through_the_installed_llava_ask(overfit, tmp_path):
    cfg, out, images = overfit
    if not (out / "trainer_state.json").exists():
        assert run_inprocess(["finetune", str(cfg)]) == 0
    converted = run_llava("convert", out, tmp_path, "--outtype", "f32", "--name", "tiny")
    assert converted.returncode == 0, converted.stderr[-2000:]
    gguf = tmp_path / "tiny.gguf"
    assert gguf.is_file() and (tmp_path / "tiny.mmproj.gguf").is_file()
    paths = [images / f"{name}.png" for name in SINGLE_TURN]
    asked = run_llava("ask", "--model", gguf, *paths, "what is in the image?", "--json")
    assert asked.returncode == 0, asked.stderr[-2000:]
    answers = {Path(r["image"]).stem: r["answer"].strip() for r in map(json.loads, asked.stdout.splitlines())}
    assert answers == SINGLE_TURN
