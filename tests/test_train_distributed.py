"""Many processes, and runs that die: `torchrun` with two processes computes what one process computes, and a run
killed between or while writing checkpoints resumes to the very same weights."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import config
from train.logs import read
from train_kit import REPO, base_models, dataset, env, run_inprocess, run_module, weights
from train_kit import config as write_config

# Two processes of two samples against one process of four (global batch 4 either way), 8 steps of stage 2.
# Same samples per step by construction, so the only differences are float32 rounding: gloo sums the two
# halves' gradients and token counts in another order, and the matmuls see batches of 2 instead of 4, ~1e-7
# relative per operation. The loss, a mean over the global batch, carries that almost unchanged; the weights
# less so, because Adam divides each gradient by its own running scale, which magnifies rounding in
# coordinates whose gradient is near zero, up to the step size (lr = 1e-3 per step).
# Observed: losses within 4.8e-7 (one float32 ulp of a loss near 5), weights within 5.5e-6.
# Bounds: 2e-5 on the loss (40x) and 1e-4 on the weights (18x), still far below what a real disagreement
# makes: averaging per-process token means instead of one mean over the global batch moves these very steps'
# losses by 5e-3 to 2e-2 (measured on this data), a sample seen twice or missed by more; weights move by up to
# lr x steps = 8e-3.
LOSS_TOLERANCE = 2e-5
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "train-base"
    llm, clip = base_models(root)
    data_file, images = dataset(root, "finetune")
    return llm, clip, data_file, images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO = dict(epochs=4.0, global_batch_size=4, per_device_batch_size=2, lr=1e-3, save_steps=2)


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]


@pytest.fixture(scope="module")
def two_processes(parts, tmp_path_factory):
    """Stage 2 under `torchrun --nproc_per_node 2` (gloo), uninterrupted: 8 steps of 2 x 2 samples."""
    llm, clip, data_file, images = parts
    work = tmp_path_factory.mktemp("two")
    cfg = write_config(work / "two.toml", "finetune", llm, clip, data_file, images, work / "out", **TWO)
    result = run_module(["finetune", str(cfg)], launcher=_torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training: 8 steps of 4 samples (2 processes x 2 x 1 accumulation)" in result.stderr
    return work / "out"


@pytest.fixture(scope="module")
def one_process(parts, tmp_path_factory):
    """The same run in one process with the whole global batch of 4."""
    llm, clip, data_file, images = parts
    work = tmp_path_factory.mktemp("one")
    cfg = write_config(work / "one.toml", "finetune", llm, clip, data_file, images, work / "out", **TWO | {"per_device_batch_size": 4})
    assert run_inprocess(["finetune", str(cfg)]) == 0
    return work / "out"


def _close(out_a: Path, out_b: Path) -> None:
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(read(out_a), read(out_b), strict=True)]
    assert max(gaps) <= LOSS_TOLERANCE, gaps
    w_a, w_b = weights(out_a), weights(out_b)
    assert max((w_a[k] - w_b[k]).abs().max().item() for k in w_a) <= WEIGHT_TOLERANCE


def test_two_process_torchrun_gives_the_loss_curve_of_one_process_with_the_same_global_batch(one_process, two_processes):
    log_one, log_two = read(one_process), read(two_processes)
    assert [r["step"] for r in log_one] == [r["step"] for r in log_two] == list(range(1, 9))
    assert [r["tokens"] for r in log_one] == [r["tokens"] for r in log_two]  # the same samples, step by step
    assert log_one[-1]["loss"] < log_one[0]["loss"] - 0.5  # a curve that goes somewhere
    _close(one_process, two_processes)


def test_a_killed_two_process_run_resumes_to_the_same_final_weights(parts, two_processes, tmp_path):
    llm, clip, data_file, images = parts
    cfg = write_config(tmp_path / "c.toml", "finetune", llm, clip, data_file, images, tmp_path / "out", **TWO)
    killed = run_module(["finetune", str(cfg)], launcher=_torchrun(), extra_env={"LLAVA_TRAIN_KILL_AT": "step:5"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-00000004"]
    resumed = run_module(["finetune", str(cfg)], launcher=_torchrun())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 4)" in resumed.stderr
    reference, got = weights(two_processes), weights(tmp_path / "out")
    for k in reference:
        assert torch.equal(reference[k], got[k]), k
    assert [r["loss"] for r in read(two_processes)] == [r["loss"] for r in read(tmp_path / "out")]


def test_a_run_killed_while_writing_a_checkpoint_resumes_to_the_same_final_weights(parts, tmp_path):
    llm, clip, data_file, images = parts
    # LoRA with dropout: resuming must restore the random state too, not just weights and optimizer.
    common = dict(epochs=4.0, save_steps=2, lora_r=4, lora_alpha=8, lora_dropout=0.1)
    whole = write_config(tmp_path / "whole.toml", "finetune", llm, clip, data_file, images, tmp_path / "whole", **common)
    broken = write_config(tmp_path / "broken.toml", "finetune", llm, clip, data_file, images, tmp_path / "broken", **common)
    assert run_inprocess(["finetune", str(whole)]) == 0

    # SIGKILL after step 6's checkpoint is written but before it is renamed into place.
    killed = run_module(["finetune", str(broken)], extra_env={"LLAVA_TRAIN_KILL_AT": "save:6"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = tmp_path / "broken" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-00000006.tmp", "step-00000004"]
    assert not (tmp_path / "broken" / "model.safetensors").exists()

    assert run_inprocess(["finetune", str(broken)]) == 0  # the same command: resume=auto
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000006"]  # save_total_limit=1, stale temp gone
    w_whole, w_resumed = weights(tmp_path / "whole"), weights(tmp_path / "broken")
    assert set(w_whole) == set(w_resumed) and not any("lora" in k for k in w_whole)
    for k in w_whole:
        assert torch.equal(w_whole[k], w_resumed[k]), k
    assert [r["loss"] for r in read(tmp_path / "whole")] == [r["loss"] for r in read(tmp_path / "broken")]
    # LoRA was merged into the LLM's Linear weights (llava-hf's file names: language_model.model.*); the rest stayed.
    base = weights(llm)
    assert not torch.equal(w_whole["language_model.model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(w_whole["language_model.model.layers.0.input_layernorm.weight"], base["model.layers.0.input_layernorm.weight"])


def test_resuming_with_a_changed_recipe_is_refused(parts, tmp_path, capfd):
    llm, clip, data_file, images = parts
    cfg = write_config(tmp_path / "c.toml", "finetune", llm, clip, data_file, images, tmp_path / "out", epochs=2.0, save_steps=2)
    # The checkpoint a run of this config leaves behind (its state file is what resumption reads first).
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "config": config.load(str(cfg), []).to_dict()}))
    assert run_inprocess(["finetune", str(cfg), "lr=5e-4", "num_workers=2"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"llava train: error: cannot resume from {ckpt}: the config changed (lr: 0.001 -> 0.0005)")


# DeepSpeed is not among the test requirements: where it is installed (on a machine without a GPU, through its
# CPU accelerator; accelerate turns DeepSpeed off for cpu=True, hence the small launcher), ZeRO-3 must train what
# plain data parallelism trains, and resume after a kill.
DEEPSPEED_LAUNCHER = """
import sys, accelerate, torch
if not torch.cuda.is_available():
    init = accelerate.Accelerator.__init__
    accelerate.Accelerator.__init__ = lambda self, *a, **k: init(self, *a, **(k | {"cpu": False}))
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero3_trains_what_plain_data_parallel_trains_and_resumes(parts, one_process, tmp_path):
    llm, clip, data_file, images = parts
    cfg = write_config(tmp_path / "c.toml", "finetune", llm, clip, data_file, images, tmp_path / "out",
                       **TWO | {"engine": "deepspeed", "deepspeed_config": "zero3.json"})
    launch = [sys.executable, "-c", DEEPSPEED_LAUNCHER]
    single = {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    killed = subprocess.run(launch + ["finetune", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env() | single | {"MASTER_PORT": str(_free_port()), "LLAVA_TRAIN_KILL_AT": "step:5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "step-00000004" / "latest").is_file()  # DeepSpeed's own format
    resumed = subprocess.run(launch + ["finetune", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env=env() | single | {"MASTER_PORT": str(_free_port())})
    assert resumed.returncode == 0 and "(step 4)" in resumed.stderr, resumed.stderr[-3000:]
    _close(one_process, tmp_path / "out")
