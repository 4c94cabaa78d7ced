"""The import-time version check: too-old torch / transformers are refused with the pip command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_tive import versions

ROOT = Path(__file__).resolve().parents[1]


def fake_versions(monkeypatch, **installed: str | None) -> None:
    monkeypatch.setattr(versions, "installed_version", lambda name: installed.get(name, "99.0"))


def test_old_torch_and_transformers_are_refused_naming_both_versions_and_the_pip_command(monkeypatch):
    monkeypatch.delenv(versions.SKIP_ENV, raising=False)
    fake_versions(monkeypatch, torch="2.10.0+cu128", transformers="5.5.0")
    with pytest.raises(ImportError) as refused:
        versions.check_versions()
    message = str(refused.value)
    assert "torch>=2.11,<2.14 is needed, torch 2.10.0+cu128 is installed" in message
    assert "transformers>=5.6,<6 is needed, transformers 5.5.0 is installed" in message
    assert "pip install --upgrade 'torch>=2.11,<2.14' 'transformers>=5.6,<6'" in message
    assert versions.SKIP_ENV in message


@pytest.mark.parametrize(
    "installed",
    [
        {"torch": "2.11.0", "transformers": "5.6.0"},  # the lowest supported releases
        {"torch": "2.12.0a0+79aa17489c.nv26.04", "transformers": "5.25.0.dev0"},  # container / source builds
        {"torch": None, "transformers": None},  # not installed: their own import names them
    ],
)
def test_supported_or_missing_versions_pass(monkeypatch, installed):
    monkeypatch.delenv(versions.SKIP_ENV, raising=False)
    fake_versions(monkeypatch, **installed)
    versions.check_versions()


def test_only_the_old_one_is_named(monkeypatch):
    monkeypatch.delenv(versions.SKIP_ENV, raising=False)
    fake_versions(monkeypatch, torch="2.13.0", transformers="4.57.1")
    with pytest.raises(ImportError, match="transformers 4.57.1 is installed") as refused:
        versions.check_versions()
    assert "--upgrade 'transformers>=5.6,<6' (" in str(refused.value) and "'torch>=" not in str(refused.value)


def test_the_skip_variable_lets_an_old_version_through(monkeypatch):
    fake_versions(monkeypatch, torch="2.4.0")
    monkeypatch.setenv(versions.SKIP_ENV, "1")
    versions.check_versions()
    monkeypatch.setenv(versions.SKIP_ENV, "0")
    with pytest.raises(ImportError):
        versions.check_versions()


def test_release_numbers():
    assert versions.release("2.13.0+cpu") == (2, 13, 0)
    assert versions.release("2.12.0rc1") == (2, 12, 0)
    assert versions.release("5.6") == (5, 6)
    assert versions.release("2.12.0") >= (2, 12) > versions.release("2.11.9")
    with pytest.raises(ValueError, match="cannot read a release number"):
        versions.release("unknown")


def test_importing_the_package_runs_the_check_and_imports_neither_torch_nor_transformers():
    fake_old_torch = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '2.10.0' if name == 'torch' else real(name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != versions.SKIP_ENV}
    proc = subprocess.run([sys.executable, "-c", fake_old_torch + "import lightning_tive"], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "ImportError: lightning_tive cannot run" in proc.stderr
    assert "torch 2.10.0 is installed" in proc.stderr
    check = "import sys, lightning_tive; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == "[]"


def test_pyproject_lower_bounds_are_the_checked_ones():
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    declared = re.findall(r'"([^"]+)"', dependencies)
    for requirement, _, _ in versions.REQUIRED.values():
        assert requirement in declared, f"pyproject.toml's dependencies should hold {requirement!r}: {declared}"
