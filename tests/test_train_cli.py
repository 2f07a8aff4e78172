"""`llava train` / `python -m train`: one-line errors and exit codes, configs that carry the paper's recipe,
overrides, and a data set with too many unusable samples stopped before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train import config
from train.cli import main
from train_kit import REPO, base_models, dataset, env, run_inprocess
from train_kit import config as write_config


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, train.cli, train.config; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), check=True)


@pytest.mark.parametrize(
    "argv, code, message",
    [
        ([], 2, "usage: llava train pretrain CONFIG"),
        (["bake"], 2, "usage error: unknown command 'bake'"),
        (["pretrain"], 2, "usage error: pretrain needs a CONFIG"),
        (["pretrain", "no/such.toml"], 1, "error: no/such.toml: no such config file (shipped configs: llava-1.5-13b-finetune"),
        (["pretrain", "llava-1.5-7b-pretrain", "lrr=1e-3"], 1, "error: command line: unknown key 'lrr' (did you mean lr?)"),
        (["pretrain", "llava-1.5-7b-pretrain", "bf16=maybe"], 1, "error: bf16=maybe: expected true or false"),
        (["pretrain", "llava-1.5-7b-pretrain", "lr"], 1, "error: 'lr': overrides are key=value"),
        (["finetune", "llava-1.5-7b-pretrain"], 1, "error: this is a pretrain config; run `pretrain` with it"),
        (["pretrain", "llava-1.5-7b-pretrain"], 1, "error: data=playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json: no such file"),
        (["pretrain", "llava-1.5-7b-pretrain", "global_batch_size=100"], 1, "is not a multiple of per_device_batch_size=32"),
        (["scienceqa", "/no/such/dir", "out.json"], 1, "error: /no/such/dir: needs ScienceQA's problems.json"),
    ],
)
def test_bad_input_gives_one_line_and_an_exit_code(argv, code, message, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if code == 1:
        assert len(err.strip().splitlines()) == 1 and err.startswith("llava train: error: ")


def test_a_bad_config_file_is_named(tmp_path, capsys):
    (tmp_path / "a.toml").write_text('stage = "pretrain"\nlearning_rate = 1e-3\n')
    (tmp_path / "b.toml").write_text('stage = "pretrain"\nepochs = "one"\n')
    (tmp_path / "c.toml").write_text("stage = \n")
    assert [main(["pretrain", str(tmp_path / n)]) for n in ("a.toml", "b.toml", "c.toml")] == [1, 1, 1]
    lines = capsys.readouterr().err.splitlines()
    assert "a.toml: unknown key 'learning_rate'" in lines[0]
    assert "b.toml: epochs = 'one' is not a float" in lines[1]
    assert "c.toml: not valid TOML" in lines[2]


def test_shipped_configs_carry_the_papers_settings():
    pre = config.load("llava-1.5-7b-pretrain", [])
    fine = config.load("llava-1.5-7b-finetune", [])
    lora = config.load("llava-1.5-7b-finetune-lora", [])
    qlora = config.load("llava-1.5-7b-finetune-qlora", [])
    sqa = config.load("llava-1.5-7b-scienceqa", [])
    for c in (pre, fine, lora, qlora, sqa):
        assert (c.max_length, c.warmup_ratio, c.weight_decay, c.bf16, c.tf32, c.gradient_checkpointing) == (2048, 0.03, 0.0, True, True, True)
        assert c.max_grad_norm == 0.0  # LLaVA's DeepSpeed runs clipped nothing
        assert c.vision_tower == "openai/clip-vit-large-patch14-336" and c.vision_feature_layer == -2
    assert (pre.stage, pre.global_batch_size, pre.lr, pre.epochs, pre.template, pre.image_mode) == ("pretrain", 256, 1e-3, 1.0, "plain", "crop")
    assert (pre.engine, pre.deepspeed_config, pre.llm) == ("deepspeed", "zero2.json", "lmsys/vicuna-7b-v1.5")
    assert (fine.stage, fine.global_batch_size, fine.lr, fine.epochs, fine.template, fine.image_mode) == ("finetune", 128, 2e-5, 1.0, "vicuna_v1", "pad")
    assert (fine.engine, fine.deepspeed_config, fine.group_by_modality_length, fine.lora_r) == ("deepspeed", "zero3.json", True, 0)
    assert fine.projector == "checkpoints/llava-v1.5-7b-pretrain/projector.safetensors" == pre.output_dir + "/projector.safetensors"
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lr, lora.projector_lr) == (128, 256, 0.05, 2e-4, 2e-5)
    assert (qlora.bits, qlora.lora_r, qlora.engine) == (4, 128, "ddp")
    assert (sqa.epochs, sqa.lr, sqa.global_batch_size) == (12.0, 2e-5, 128)
    thirteen = config.load("llava-1.5-13b-finetune", [])
    assert thirteen.llm == "lmsys/vicuna-13b-v1.5" and thirteen.to_dict() | {"llm": "", "projector": "", "output_dir": ""} == fine.to_dict() | {"llm": "", "projector": "", "output_dir": ""}
    zero2 = json.loads((config.CONFIG_DIR / "zero2.json").read_text())
    zero3 = json.loads((config.CONFIG_DIR / "zero3.json").read_text())
    assert zero2["zero_optimization"]["stage"] == 2 and zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "gradient_clipping" not in zero2 and "gradient_clipping" not in zero3  # as in LLaVA's scripts/


def test_overrides_are_typed_and_stage_defaults_fill_the_rest(tmp_path):
    (tmp_path / "c.toml").write_text('stage = "finetune"\nlr = 1\n')
    cfg = config.load(str(tmp_path / "c.toml"), ["lr=3e-4", "bf16=false", "epochs=2", "lora_r=8", "--output_dir=runs/x"])
    assert (cfg.lr, cfg.bf16, cfg.epochs, cfg.lora_r, cfg.output_dir) == (3e-4, False, 2.0, 8, "runs/x")
    assert (cfg.template, cfg.image_mode) == ("vicuna_v1", "pad")
    assert config.load(str(tmp_path / "c.toml"), ["template=plain"]).template == "plain"


def test_too_many_unusable_samples_stop_the_run_before_training(tmp_path, tmp_path_factory, capsys):
    llm, clip = base_models(tmp_path_factory.getbasetemp() / "train-base")
    data_file, images = dataset(tmp_path_factory.getbasetemp() / "train-base", "finetune")
    records = json.loads(data_file.read_text())
    records[1]["image"] = "nowhere.png"
    records[2]["conversations"][0]["value"] = "no image marker here"
    (tmp_path / "d.json").write_text(json.dumps(records))
    cfg = write_config(tmp_path / "c.toml", "finetune", llm, clip, tmp_path / "d.json", images, tmp_path / "out", max_bad_fraction=0.1)
    assert run_inprocess(["finetune", str(cfg)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("llava train: error: 2 of 10 samples cannot be used (")
    assert "missing image: 1" in last and "image count: 1" in last and "finetune-1, finetune-2" in last
    rejected = json.loads((tmp_path / "out" / "rejected_samples.json").read_text())
    assert [(r["id"], r["reason"]) for r in rejected] == [("finetune-1", "missing image"), ("finetune-2", "image count")]
    assert not (tmp_path / "out" / "log.jsonl").exists()  # not one step was taken
    # Within the threshold the run goes on without them, and says so first.
    assert run_inprocess(["finetune", str(cfg), "max_bad_fraction=0.25", "max_steps=1"]) == 0
    assert "data: 8 of 10 samples usable, 2 rejected" in capsys.readouterr().err
