"""Which two GGUF files a model name means: presets on the Hugging Face Hub, the bundled demo, or local paths.

Hub presets live in the standard Hugging Face cache (HF_HOME, HF_HUB_CACHE and HF_ENDPOINT are honoured),
so other tools share the downloads. Each preset pins a commit, so a downloaded model resolves without any
network call and its files cannot change under a known checksum.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from llavacli.errors import ModelError

DEFAULT_MODEL = "llava-1.5-7b"
DEMO_DIR = Path(__file__).parent / "data" / "demo"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    text_file: str
    mmproj_file: str
    repo_id: str | None = None  # None: the files ship inside the package, in DEMO_DIR
    revision: str | None = None  # a commit hash
    text_sha256: str | None = None
    mmproj_sha256: str | None = None

    @property
    def bundled(self) -> bool:
        return self.repo_id is None


# Checksums are those the Hub lists for the pinned commits; None where it was not available to us.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="llava-1.5-7b",
            description="LLaVA-1.5 7B, Q4_K text model + f16 projector (4.1 GB + 624 MB)",
            repo_id="mys/ggml_llava-v1.5-7b",
            revision="9b713a64048c7f982ec3969e60e9f61f7a2730c2",
            text_file="ggml-model-q4_k.gguf",
            mmproj_file="mmproj-model-f16.gguf",
            text_sha256="7ac9c2f7b8d76cc7f3118cdf0953ebab7a7a9b12bad5dbe237219d2ab61765ea",
            mmproj_sha256=None,
        ),
        Preset(
            name="llava-1.5-13b",
            description="LLaVA-1.5 13B, Q4_K text model + f16 projector (7.9 GB + 645 MB)",
            repo_id="mys/ggml_llava-v1.5-13b",
            revision="c407ffa3883daa71dede98e890d1b88566a93402",
            text_file="ggml-model-q4_k.gguf",
            mmproj_file="mmproj-model-f16.gguf",
            text_sha256="6b886ec5a539426434ba2477196539184cf8e880b6c40106ee954261aa2b602f",
            mmproj_sha256="3ee8038be0be43eac5bee15fca42215fb98e00d2ebf9c9d0c453eb2573cae1aa",
        ),
        Preset(
            name="demo",
            description="the miniature LLaVA this project trains itself on pictures of coloured shapes (4 MB, bundled): it knows nothing else",
            text_file="demo.gguf",
            mmproj_file="demo.mmproj.gguf",
        ),
    )
}


# --- Resolution -------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str | None, mmproj: str | None = None, *, download: bool = True) -> tuple[Path, Path]:
    """The (text model, mmproj) paths for a preset name or a GGUF path; `mmproj` overrides the found one.

    A preset that is not downloaded yet is downloaded (progress on stderr) unless download=False, which
    makes it a ModelError instead.
    """
    name = name_or_path or DEFAULT_MODEL
    explicit = _existing_file(mmproj, "--mmproj") if mmproj is not None else None
    # A name with a slash or a .gguf suffix is always a path, so a stray file cannot shadow a preset.
    if name in PRESETS and not _looks_like_path(name):
        text, found = preset_paths(PRESETS[name], download=download)
        return text, explicit or found
    if not _looks_like_path(name) and not os.path.exists(name):
        raise ModelError(
            f"model {name}: no such preset or file (presets: {', '.join(PRESETS)}; "
            "a local model is the path of its .gguf file)"
        )
    text = _existing_file(name, "model")
    return text, explicit or find_mmproj(text)


def find_mmproj(text: Path) -> Path:
    """The projector that sits beside a text model: `<stem>.mmproj.gguf`, else the one `*mmproj*.gguf` there."""
    paired = text.with_name(f"{text.stem}.mmproj.gguf")
    if paired.is_file():
        return paired
    folder = text.parent
    candidates = sorted(p for p in folder.glob("*mmproj*.gguf") if p.is_file() and p.resolve() != text.resolve())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelError(
            f"model {text}: no mmproj file beside it (looked for {paired.name} and *mmproj*.gguf in "
            f"{folder}); pass --mmproj"
        )
    names = ", ".join(p.name for p in candidates)
    raise ModelError(f"model {text}: several mmproj files beside it ({names}); choose one with --mmproj")


def preset_paths(preset: Preset, *, download: bool = True) -> tuple[Path, Path]:
    """The preset's two local files, downloaded and checked first if needed (and allowed)."""
    if preset.bundled:
        text, mmproj = DEMO_DIR / preset.text_file, DEMO_DIR / preset.mmproj_file
        if not (text.is_file() and mmproj.is_file()):
            raise ModelError(f"model {preset.name}: not bundled with this installation (no {text})")
        return text, mmproj
    paths = []
    for filename, sha256 in _files(preset):
        path = cached_path(preset, filename)
        if path is None:
            if not download:
                raise ModelError(f"model {preset.name}: not downloaded; run: llava models pull {preset.name}")
            path = _download(preset, filename, sha256)
        paths.append(path)
    return paths[0], paths[1]


def cached_path(preset: Preset, filename: str) -> Path | None:
    """Where the preset's file is in the Hugging Face cache, or None if it is not there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(preset.repo_id, filename, revision=preset.revision)
    return Path(found) if isinstance(found, str) else None


def pull(name: str, *, verify: bool = True) -> tuple[Path, Path]:
    """Download a preset's files if missing; with verify, check cached ones too and fetch again any damaged."""
    preset = _preset(name)
    if preset.bundled:
        return preset_paths(preset)
    if verify:
        for filename, sha256 in _files(preset):
            path = cached_path(preset, filename)
            expected = path and (sha256 or _sha256_named_by_blob(path))
            if expected and _sha256(path) != expected:
                print(f"{preset.name}: cached {filename} is damaged; downloading it again", file=sys.stderr)
                _discard(path)
    return preset_paths(preset, download=True)


def remove(name: str) -> int:
    """Delete a preset's files from the Hugging Face cache; returns the bytes freed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    preset = _preset(name)
    if preset.bundled:
        raise ModelError(f"model {preset.name}: bundled with llava-cli, nothing to remove")
    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        cache = None
    wanted = {preset.text_file, preset.mmproj_file}
    files = [
        file
        for repo in (cache.repos if cache else ())
        if repo.repo_id == preset.repo_id and repo.repo_type == "model"
        for revision in repo.revisions
        for file in revision.files
        if file.file_name in wanted
    ]
    if not files:
        raise ModelError(f"model {preset.name}: not downloaded, nothing to remove")
    strategy = cache.delete_files(*files)
    strategy.execute()
    return strategy.expected_freed_size


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"model {name}: no such preset (presets: {', '.join(PRESETS)})") from None


def _files(preset: Preset) -> list[tuple[str, str | None]]:
    return [(preset.text_file, preset.text_sha256), (preset.mmproj_file, preset.mmproj_sha256)]


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.lower().endswith(".gguf")


def _existing_file(path: str, role: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ModelError(f"{role} {path}: is a directory; give the path of a .gguf file")
    if not p.is_file():
        raise ModelError(f"{role} {path}: no such file")
    return p


def _download(preset: Preset, filename: str, sha256: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model {preset.name}: {filename} from {constants.ENDPOINT}/{preset.repo_id}"
    if constants.is_offline_mode():
        raise ModelError(f"{where}: not downloaded, and HF_HUB_OFFLINE is set")
    unreachable = _unreachable(constants.ENDPOINT)
    if unreachable:
        raise ModelError(f"{where}: cannot reach the Hub ({unreachable}); `--model demo` needs no network")
    print(f"downloading {preset.name}: {filename} into {hub_cache_dir()}", file=sys.stderr)
    try:
        # Resumes by itself (HTTP Range) when the connection drops mid-file.
        path = Path(hf_hub_download(preset.repo_id, filename, revision=preset.revision))
    except RepositoryNotFoundError:
        raise ModelError(f"{where}: repository not found") from None
    except (RemoteEntryNotFoundError, RevisionNotFoundError):
        raise ModelError(f"{where}: file or revision {preset.revision} not found") from None
    except LocalEntryNotFoundError as e:
        cause = _first_line(e.__cause__) if e.__cause__ else "no connection"
        raise ModelError(f"{where}: cannot reach the Hub ({cause})") from None
    except HfHubHTTPError as e:
        raise ModelError(f"{where}: HTTP {e.response.status_code}") from None
    except OSError as e:  # a size mismatch after retries, a full disk
        raise ModelError(f"{where}: download failed ({_first_line(e)})") from None
    except Exception as e:  # the HTTP client's own errors (its library differs across huggingface_hub versions)
        raise ModelError(f"{where}: download failed ({type(e).__name__}: {_first_line(e)})") from None
    # Without a checksum of our own, the Hub's: an LFS file's ETag, which names its blob, is its sha256.
    expected = sha256 or _sha256_named_by_blob(path)
    if expected:
        print(f"checking the sha256 of {filename}", file=sys.stderr)
        actual = _sha256(path)
        if actual != expected:
            _discard(path)
            raise ModelError(
                f"{where}: checksum mismatch (expected sha256 {expected}, got {actual}); "
                "the download was deleted, try again"
            )
    return path


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why no TCP connection to the endpoint opens, or None when one does (or a proxy stands between).

    huggingface_hub retries an unreachable host five times over 23 seconds, logging each try; one connect
    answers the same question at once."""
    import socket
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    if not url.hostname or (urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname)):
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or _first_line(e)}"
    return None


def _sha256_named_by_blob(path: Path) -> str | None:
    name = path.resolve().name
    return name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None


def _discard(path: Path) -> None:
    """Remove a cache entry: the snapshot link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _size(n: float) -> str:
    units = ("B", "kB", "MB", "GB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


# --- `llava models ...` ----------------------------------------------------------------------------------

models_app = typer.Typer(
    name="models",
    help="List, download, locate and delete the preset models (kept in the Hugging Face cache).",
    no_args_is_help=True,
    add_completion=False,
)


@models_app.command("list")
def list_command() -> None:
    """The presets, whether each is downloaded, and its size on disk."""
    rows = [("NAME", "STATUS", "SIZE", "DESCRIPTION")]
    for preset in PRESETS.values():
        if preset.bundled:
            paths = [DEMO_DIR / preset.text_file, DEMO_DIR / preset.mmproj_file]
            present = [p for p in paths if p.is_file()]
            status = "bundled" if len(present) == 2 else "missing"
        else:
            present = [p for f, _ in _files(preset) if (p := cached_path(preset, f)) is not None]
            status = ("not downloaded", "partial", "downloaded")[len(present)]
        size = _size(sum(p.stat().st_size for p in present)) if present else "-"
        name = preset.name + (" (default)" if preset.name == DEFAULT_MODEL else "")
        rows.append((name, status, size, preset.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])


@models_app.command("pull")
def pull_command(
    names: list[str] = typer.Argument(..., help="Preset names, e.g. llava-1.5-7b."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip re-checking files already downloaded."),
) -> None:
    """Download presets (resuming a dropped connection) and check their sha256."""
    for name in names:
        text, mmproj = pull(name, verify=not no_verify)
        typer.echo(f"{name}: ready ({_size(text.stat().st_size + mmproj.stat().st_size)})")


@models_app.command("rm")
def rm_command(names: list[str] = typer.Argument(..., help="Preset names.")) -> None:
    """Delete presets' files from the Hugging Face cache."""
    for name in names:
        freed = remove(name)
        typer.echo(f"{name}: removed ({_size(freed)} freed)")


@models_app.command("path")
def path_command(
    name: str = typer.Argument(None, help="A preset name or a .gguf path; none: the cache folder."),
    mmproj: str = typer.Option(None, "--mmproj", help="The projector, if not the one found beside the model."),
) -> None:
    """Print the local text model and mmproj paths (one a line) that a model name resolves to. Downloads nothing."""
    if name is None:
        typer.echo(str(hub_cache_dir()))
        return
    for path in resolve_model(name, mmproj, download=False):
        typer.echo(str(path))
