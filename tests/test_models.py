"""Model names and paths: local GGUF pairs, presets, and `llava models list|pull|rm|path` against a local Hub."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from llavacli import models
from llavacli.errors import ModelError
from llavacli.models import Preset, find_mmproj, resolve_model
from localhub import LocalHub

ROOT = Path(__file__).resolve().parent.parent
REPO = "tester/tiny-llava-gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXT = b"GGUF" + bytes(range(256)) * 400  # ~100 kB: big enough to be cut half-way
MMPROJ = b"GGUF" + b"projector" * 1000
TINY = Preset(
    name="tiny",
    description="test preset",
    repo_id=REPO,
    revision=COMMIT,
    text_file="tiny-q4_k.gguf",
    mmproj_file="mmproj-tiny-f16.gguf",
    text_sha256=hashlib.sha256(TEXT).hexdigest(),
    mmproj_sha256=hashlib.sha256(MMPROJ).hexdigest(),
)

# `llava models ...` as the CLI runs it, with the test's preset added to the table.
CLI = """
import json, os, sys
from llavacli import models
from llavacli.errors import LlavaError
for p in json.loads(os.environ["LLAVA_TEST_PRESETS"]):
    models.PRESETS[p["name"]] = models.Preset(**p)
try:
    if sys.argv[1:2] == ["resolve"]:  # what `llava ask --model NAME` does first
        print(*models.resolve_model(sys.argv[2]), sep="\\n")
    else:
        models.models_app(prog_name="llava models")
except LlavaError as e:
    print(f"llava: error: {e}", file=sys.stderr)
    sys.exit(1)
"""


def touch(path: Path, data: bytes = b"GGUF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- local GGUF paths ------------------------------------------------------------------------------------


def test_gguf_path_pairs_with_mmproj_named_after_it(tmp_path):
    text = touch(tmp_path / "llava.gguf")
    touch(tmp_path / "mmproj-other.gguf")
    paired = touch(tmp_path / "llava.mmproj.gguf")
    assert resolve_model(str(text)) == (text, paired)


def test_gguf_path_pairs_with_the_only_mmproj_beside_it(tmp_path):
    text = touch(tmp_path / "ggml-model-q4_k.gguf")
    mmproj = touch(tmp_path / "mmproj-model-f16.gguf")
    assert resolve_model(str(text)) == (text, mmproj)


def test_several_mmproj_candidates_are_an_error_naming_them(tmp_path):
    text = touch(tmp_path / "model.gguf")
    touch(tmp_path / "mmproj-a.gguf")
    touch(tmp_path / "mmproj-b.gguf")
    with pytest.raises(ModelError, match="several mmproj files.*mmproj-a.gguf, mmproj-b.gguf.*--mmproj"):
        find_mmproj(text)


def test_no_mmproj_beside_the_model_is_an_error_suggesting_the_option(tmp_path):
    text = touch(tmp_path / "model.gguf")
    with pytest.raises(ModelError, match=r"model .*model.gguf: no mmproj file beside it.*pass --mmproj"):
        resolve_model(str(text))


def test_explicit_mmproj_wins_over_the_one_beside_the_model(tmp_path):
    text = touch(tmp_path / "model.gguf")
    touch(tmp_path / "model.mmproj.gguf")
    chosen = touch(tmp_path / "elsewhere" / "proj.gguf")
    assert resolve_model(str(text), str(chosen)) == (text, chosen)


def test_missing_mmproj_option_is_an_error_naming_the_option(tmp_path):
    text = touch(tmp_path / "model.gguf")
    with pytest.raises(ModelError, match=r"^--mmproj .*nope.gguf: no such file$"):
        resolve_model(str(text), str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_unusable_model_path_is_a_one_line_error(tmp_path, make):
    path = tmp_path / "model.gguf"
    if make == "directory":
        path.mkdir()
    with pytest.raises(ModelError) as err:
        resolve_model(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_name_that_is_no_preset_and_no_file_lists_the_presets():
    with pytest.raises(ModelError, match=r"model llava-9: no such preset or file \(presets: llava-1.5-7b, "):
        resolve_model("llava-9")


def test_default_model_is_llava_1_5_7b_and_presets_are_pinned():
    assert models.DEFAULT_MODEL == "llava-1.5-7b" and {"llava-1.5-7b", "llava-1.5-13b", "demo"} <= set(models.PRESETS)
    for preset in models.PRESETS.values():
        if not preset.bundled:
            assert len(preset.revision) == 40 and preset.text_file.endswith(".gguf")
            for sha in (preset.text_sha256, preset.mmproj_sha256):
                assert sha is None or len(bytes.fromhex(sha)) == 32


def test_demo_preset_resolves_to_the_bundled_files(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "DEMO_DIR", tmp_path)
    with pytest.raises(ModelError, match="model demo: not bundled with this installation"):
        resolve_model("demo")
    text, mmproj = touch(tmp_path / "demo.gguf"), touch(tmp_path / "demo.mmproj.gguf")
    assert resolve_model("demo") == (text, mmproj)


# --- presets from the Hub, through `llava models` ---------------------------------------------------------


@pytest.fixture
def hub():
    with LocalHub() as hub:
        hub.add_file(REPO, TINY.text_file, TEXT, COMMIT)
        hub.add_file(REPO, TINY.mmproj_file, MMPROJ, COMMIT)
        yield hub


@pytest.fixture
def llava_models(hub, tmp_path):
    """Run `llava models ARGS...` in a fresh process with the Hub at the local server and a private HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=str(ROOT),
    )

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        presets = json.dumps([asdict(p) for p in run.presets])
        return subprocess.run(
            [sys.executable, "-c", CLI, *args],
            env={**env, "LLAVA_TEST_PRESETS": presets, **extra_env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    run.presets = [TINY]
    run.cache = tmp_path / "hf" / "hub"
    return run


def blobs(cache: Path) -> list[bytes]:
    return [p.read_bytes() for p in cache.glob("models--*/blobs/*") if p.is_file()]


def test_pull_downloads_verified_files_that_path_and_list_then_show(llava_models):
    pulled = llava_models("pull", "tiny")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith("tiny: ready")

    shown = llava_models("path", "tiny")
    assert shown.returncode == 0, shown.stderr
    text, mmproj = (Path(line) for line in shown.stdout.splitlines())
    assert text.read_bytes() == TEXT and mmproj.read_bytes() == MMPROJ
    assert llava_models.cache in text.parents  # the standard HF cache under HF_HOME

    listed = llava_models("list").stdout
    assert any(line.startswith("tiny ") and " downloaded " in line for line in listed.splitlines())


def test_ask_with_a_preset_downloads_it_on_first_use(llava_models, hub):
    first = llava_models("resolve", "tiny")
    assert first.returncode == 0, first.stderr
    assert Path(first.stdout.splitlines()[0]).read_bytes() == TEXT
    gets = sum(1 for method, *_ in hub.requests if method == "GET")

    again = llava_models("resolve", "tiny")
    assert again.stdout == first.stdout
    assert sum(1 for method, *_ in hub.requests if method == "GET") == gets  # no second download


def test_dropped_connection_resumes_where_it_stopped(llava_models, hub):
    # huggingface_hub writes 10 MiB chunks: the file must be long enough for one to land before the cut.
    big = TEXT * 250
    llava_models.presets = [replace(TINY, text_sha256=hashlib.sha256(big).hexdigest())]
    hub.files[(REPO, TINY.text_file)] = big
    hub.drop_once.add((REPO, TINY.text_file))
    pulled = llava_models("pull", "tiny")
    assert pulled.returncode == 0, pulled.stderr
    text_gets = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith(TINY.text_file)]
    assert text_gets[0] is None and len(text_gets) == 2
    resumed_at = int(text_gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(big) // 2
    path = Path(llava_models("path", "tiny").stdout.splitlines()[0])
    assert path.read_bytes() == big


def test_corrupted_download_is_a_clear_error_and_is_not_kept(llava_models, hub):
    bad = TEXT[:-1] + b"!"
    hub.files[(REPO, TINY.text_file)] = bad
    pulled = llava_models("pull", "tiny")
    assert pulled.returncode == 1
    error = pulled.stderr.strip().splitlines()[-1]
    assert error.startswith("llava: error: model tiny: tiny-q4_k.gguf from ") and "checksum mismatch" in error
    assert "Traceback" not in pulled.stderr
    assert bad not in blobs(llava_models.cache)
    assert "not downloaded" in llava_models("path", "tiny").stderr

    hub.files[(REPO, TINY.text_file)] = TEXT  # the Hub is fixed: pulling again works
    assert llava_models("pull", "tiny").returncode == 0


def test_without_a_checksum_of_its_own_the_download_is_checked_against_the_hub_etag(llava_models, hub):
    llava_models.presets = [replace(TINY, mmproj_sha256=None)]
    hub.etags[(REPO, TINY.mmproj_file)] = TINY.mmproj_sha256  # what the Hub says the file is...
    hub.files[(REPO, TINY.mmproj_file)] = MMPROJ[:-1] + b"?"  # ...and what arrives
    pulled = llava_models("pull", "tiny")
    assert pulled.returncode == 1
    assert "mmproj-tiny-f16.gguf" in pulled.stderr and "checksum mismatch" in pulled.stderr
    assert llava_models("path", "tiny").returncode == 1


def test_pull_replaces_a_cached_file_damaged_on_disk(llava_models):
    assert llava_models("pull", "tiny").returncode == 0
    text = Path(llava_models("path", "tiny").stdout.splitlines()[0])
    text.resolve().write_bytes(b"GGUF damaged")
    pulled = llava_models("pull", "tiny")
    assert pulled.returncode == 0, pulled.stderr
    assert "damaged" in pulled.stderr and text.read_bytes() == TEXT


def test_rm_deletes_the_preset_files_from_the_cache(llava_models):
    assert llava_models("pull", "tiny").returncode == 0
    removed = llava_models("rm", "tiny")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("tiny: removed")
    assert blobs(llava_models.cache) == []
    shown = llava_models("path", "tiny")
    assert shown.returncode == 1
    assert shown.stderr.strip() == "llava: error: model tiny: not downloaded; run: llava models pull tiny"
    again = llava_models("rm", "tiny")
    assert again.returncode == 1 and "not downloaded, nothing to remove" in again.stderr


def test_path_without_a_name_prints_the_cache_folder(llava_models):
    shown = llava_models("path")
    assert shown.returncode == 0 and Path(shown.stdout.strip()) == llava_models.cache


def test_missing_repository_is_a_clear_error(llava_models, hub):
    hub.repos.clear()
    pulled = llava_models("pull", "tiny")
    assert pulled.returncode == 1
    assert pulled.stderr.strip().endswith(f"{REPO}: repository not found")


def test_offline_mode_is_named_in_the_error_instead_of_waiting_for_the_network(llava_models, hub):
    pulled = llava_models("pull", "tiny", HF_HUB_OFFLINE="1")
    assert pulled.returncode == 1
    assert pulled.stderr.strip().endswith("not downloaded, and HF_HUB_OFFLINE is set")
    assert not [r for r in hub.requests if "/resolve/" in r[1]]


def test_an_unreachable_hub_fails_at_once_without_retries(llava_models):
    """huggingface_hub alone retries a host that refuses connections five times, over 23 seconds, logging
    each try; the error is one line, with no retry before it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    pulled = llava_models("pull", "tiny", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert pulled.returncode == 1
    line = pulled.stderr.strip()
    assert "\n" not in line and "Retrying" not in line
    assert f"cannot reach the Hub (127.0.0.1:{port}: " in line and "--model demo" in line
