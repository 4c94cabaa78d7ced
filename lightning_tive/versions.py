"""The torch and transformers releases this package needs, checked when it is imported.

The check reads installed-distribution metadata only, so `import lightning_tive` (and
`fetch-smollm2`) still imports neither torch nor transformers. pyproject.toml states the same
lower bounds (a test keeps the two in step).
"""

from __future__ import annotations

import importlib.metadata
import os
import re

#: Set to 1 to import anyway (e.g. on an image whose torch cannot be changed); what then fails is unknown.
SKIP_ENV = "LIGHTNING_TIVE_SKIP_VERSION_CHECK"

#: distribution -> (pip requirement, the lowest release in it, what needs that release).
REQUIRED: dict[str, tuple[str, tuple[int, ...], str]] = {
    "torch": (
        "torch>=2.11,<2.14",
        (2, 11),
        "sharded runs read FSDP2's private unit state (`fully_shard.state(m)`), whose layout is known from 2.11 "
        "(run on a GPU) to 2.13",
    ),
    "transformers": (
        "transformers>=5.6,<6",
        (5, 6),
        "the CLIP image processor is `CLIPImageProcessorPil` (new in 5.4), and the CLIP tower's weights are "
        "`vision_tower.encoder.*` (5.6 on; `vision_tower.vision_model.encoder.*` before), the names checkpoints hold",
    ),
}


def installed_version(distribution: str) -> str | None:
    """The installed version of `distribution` from its metadata, or None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version: '2.13.0+cpu' -> (2, 13, 0), '2.12.0rc1' -> (2, 12, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"cannot read a release number from the version {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def check_versions() -> None:
    """Raise ImportError naming every installed release older than required, and the pip command.

    A distribution that is not installed is left to its own import, which names it.
    """
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    too_old = []
    for name, (requirement, lowest, reason) in REQUIRED.items():
        version = installed_version(name)
        if version is not None and release(version) < lowest:
            too_old.append((name, version, requirement, reason))
    if not too_old:
        return
    lines = [f"  {requirement} is needed, {name} {version} is installed: {reason}"
             for name, version, requirement, reason in too_old]
    command = "pip install --upgrade " + " ".join(f"'{requirement}'" for _, _, requirement, _ in too_old)
    raise ImportError(
        "lightning_tive cannot run with the installed versions:\n" + "\n".join(lines) + f"\nUpgrade with: {command}"
        + " (for torch, add the --index-url of your CUDA build from pytorch.org). "
        + f"To import anyway, at your own risk, set {SKIP_ENV}=1."
    )
