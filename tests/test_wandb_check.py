"""An online WandbLogger without an API key or a route to its host stops the CLI before anything is built."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from lightning_tive import wandb_check
from lightning_tive.cli import run_cli
from lightning_tive.model import LlavaModule
from lightning_tive.wandb_check import WandbUnavailable, check_wandb_loggers

pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
KEY = "k" * 40  # the length W&B API keys have
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listening_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        yield s.getsockname()[1]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No key anywhere wandb looks, no proxy, and W&B's host a closed local port: no network is touched.

    WANDB_MODE stays `disabled` (conftest): the loggers below ask for `mode: online` themselves, so
    wandb's per-process settings, should the check load them, stay as the rest of the suite expects.
    """
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    (tmp_path / "home").mkdir()
    return url


def wandb_logger(**init_args) -> Namespace:
    args = {"project": "lightning_tive", "name": "run", "save_dir": "runs/x", "offline": False, "mode": "online",
            **init_args}
    return Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(**args))


def cli_args(tmp_path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / "smoke.yaml"),
            "--trainer.default_root_dir", str(tmp_path / "run"), *extra]


def test_online_logger_without_a_key_stops_the_cli_before_the_model_is_built(no_credentials, tmp_path, monkeypatch):
    def build(self, on_meta=False):
        raise AssertionError("the model was built before the W&B check")

    monkeypatch.setattr(LlavaModule, "build_model", build)
    with pytest.raises(WandbUnavailable) as stopped:
        run_cli(cli_args(tmp_path, "--trainer.logger.init_args.offline", "false",
                         "--trainer.logger.init_args.mode", "online"), run=False)
    message = str(stopped.value)
    assert "WandbLogger(project=lightning_tive, name=smoke) is set to log online" in message
    assert f"no W&B API key for {no_credentials} is configured" in message
    assert "`offline: true`" in message and "--trainer.logger.init_args.offline true" in message
    assert f"wandb sync {tmp_path / 'run'}/wandb/offline-run-*" in message
    assert "WANDB_MODE=offline" in message


@pytest.mark.parametrize("how", ["offline: true", "WANDB_MODE=disabled"])
def test_offline_or_disabled_w_and_b_builds_without_a_key_or_a_connection(no_credentials, tmp_path, monkeypatch, how):
    def never(*args, **kwargs):
        raise AssertionError("an offline logger must not be checked")

    monkeypatch.setattr(wandb_check, "has_credentials", never)
    monkeypatch.setattr(wandb_check, "connection_problem", never)
    if how == "WANDB_MODE=disabled":
        extra = ("--trainer.logger.init_args.offline", "false")  # the fixture's WANDB_MODE=disabled decides
    else:
        monkeypatch.setenv("WANDB_MODE", "online")  # so only smoke.yaml's `offline: true` keeps it offline
        extra = ()
    cli = run_cli(cli_args(tmp_path, *extra), run=False)
    assert type(cli.trainer.logger).__name__ == "WandbLogger"


@pytest.mark.parametrize(
    ("init_args", "mode", "online"),
    [
        ({"mode": None}, None, True),
        ({"mode": None}, "online", True),
        ({"mode": None}, "offline", False),
        ({"mode": None}, "dryrun", False),
        ({"mode": None}, "disabled", False),
        ({"mode": None, "offline": True}, "online", False),
        ({"mode": "offline"}, None, False),
        ({"mode": "online"}, "offline", True),  # wandb.init's mode wins over WANDB_MODE
    ],
)
def test_which_loggers_log_online(monkeypatch, init_args, mode, online):
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    assert wandb_check.logs_online(wandb_logger(**init_args)) is online


def test_a_key_without_a_connection_names_the_host_and_port(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    port = no_credentials.rsplit(":", 1)[1]
    with pytest.raises(WandbUnavailable, match=rf"no TCP connection to 127\.0\.0\.1:{port} within 5 s"):
        check_wandb_loggers([wandb_logger()])


def test_a_key_and_a_reachable_host_pass(no_credentials, monkeypatch, listening_port):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    with pytest.raises(WandbUnavailable, match="no W&B API key"):
        check_wandb_loggers([wandb_logger()])
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    check_wandb_loggers([True, None, Namespace(class_path="lightning.pytorch.loggers.CSVLogger"), wandb_logger()])


@pytest.mark.parametrize("wbauth", ["wandb's lookup", "fallback"])
def test_the_netrc_entry_of_wandb_login_counts_as_a_key(no_credentials, monkeypatch, tmp_path, listening_port, wbauth):
    if wbauth == "fallback":  # a wandb release without wandb.sdk.lib.wbauth
        monkeypatch.setitem(sys.modules, "wandb.sdk.lib.wbauth", None)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    with pytest.raises(WandbUnavailable, match="no W&B API key"):
        check_wandb_loggers([wandb_logger()])
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text(f"machine 127.0.0.1:{listening_port}\n  login user\n  password {KEY}\n")  # as `wandb login` writes
    netrc.chmod(0o600)
    check_wandb_loggers([wandb_logger()])


def test_a_proxy_from_the_environment_is_where_the_connection_goes(no_credentials, monkeypatch, listening_port):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listening_port}")
    check_wandb_loggers([wandb_logger()])  # the W&B host itself is closed; the proxy answers
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(WandbUnavailable, match="no TCP connection"):
        check_wandb_loggers([wandb_logger()])


def test_every_shipped_wandb_logger_is_offline_and_says_how_to_upload():
    import yaml

    checked = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text()
        trainer = yaml.safe_load(text).get("trainer") or {}
        logger = trainer.get("logger")
        if not isinstance(logger, dict) or not logger.get("class_path", "").endswith("WandbLogger"):
            continue
        assert logger["init_args"].get("offline") is True, f"{path.name}: its WandbLogger would log online"
        assert f"wandb sync {trainer['default_root_dir']}/wandb/offline-run-*" in text, path.name
        checked.append(path.name)
    assert {"llava15_7b.yaml", "llava15_7b_lora.yaml", "llava15_7b_qlora.yaml", "demo.yaml"} <= set(checked)
