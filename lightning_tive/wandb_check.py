"""Fail at start, on every process, when a WandbLogger is set to log online but cannot.

W&B is first used by process 0 when it logs, after TIVE's warm-up and valuation (half an hour into
a 7B run). Without an API key or a route to the W&B host it fails there, and the other processes
wait for it until the collective timeout. The CLI runs this check on every process before anything
is built (no process group exists yet), so all of them stop together, within seconds.
"""

from __future__ import annotations

import netrc
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

OFFLINE_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE / `mode` values that never reach the host
CONNECT_TIMEOUT_S = 5.0


class WandbUnavailable(RuntimeError):
    """A WandbLogger set to log online has no API key or no connection to the W&B host."""


def is_wandb_logger(logger: Any) -> bool:
    """Whether a parsed `trainer.logger` entry (class_path + init_args) is Lightning's WandbLogger."""
    return str(getattr(logger, "class_path", "")).endswith("WandbLogger")


def logs_online(logger: Any) -> bool:
    """Whether a parsed WandbLogger entry logs online: not `offline: true`, and its `mode` (else WANDB_MODE)
    is not offline, disabled or dryrun; wandb.init gives the same precedence."""
    args = getattr(logger, "init_args", None) or {}
    if args.get("offline"):
        return False
    mode = args.get("mode") or (getattr(logger, "dict_kwargs", None) or {}).get("mode") or os.environ.get("WANDB_MODE")
    return str(mode or "online").strip().lower() not in OFFLINE_MODES


def wandb_base_url() -> str:
    """The W&B host a run would log to: WANDB_BASE_URL, else wandb's own setting (`wandb login --host`, default)."""
    url = os.environ.get("WANDB_BASE_URL", "").strip()
    if url:
        return url.rstrip("/")
    import wandb

    try:
        from wandb.sdk import wandb_setup

        # The process's settings as wandb.init reads them (environment and settings files); starts nothing.
        return wandb_setup.singleton().settings.base_url.rstrip("/")
    except (ImportError, AttributeError):  # a wandb without this internal: its default host
        return wandb.Settings().base_url.rstrip("/")


def has_credentials(base_url: str) -> bool:
    """Whether wandb finds credentials for `base_url` where wandb.init would look, without any network call.

    That is WANDB_API_KEY, an identity token file, the netrc entry `wandb login` writes, or a settings
    file's api_key: wandb's own lookup where available (not a public API in wandb 0.31), else the
    first two that every wandb release reads.
    """
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:
        return bool(os.environ.get("WANDB_API_KEY")) or netrc_entry(urllib.parse.urlsplit(base_url).netloc)
    found = wbauth.authenticate_session(
        host=base_url, source="lightning_tive", prompt=False, verify=False, update_session=False
    )
    return found is not None


def netrc_entry(machine: str) -> bool:
    """Whether the netrc file (NETRC, else ~/.netrc) holds a password for `machine` (the URL's host[:port])."""
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(machine)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def connection_problem(base_url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the host (or to the proxy the environment names for it) opens in time."""
    url = urllib.parse.urlsplit(base_url)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname, via.port or (443 if via.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as error:
        return f"no TCP connection to {host}:{port} within {timeout_s:g} s ({error})"


def check_wandb_loggers(loggers: Iterable[Any]) -> None:
    """Raise WandbUnavailable for a WandbLogger set to log online without an API key or a connection."""
    for logger in loggers:
        if not is_wandb_logger(logger) or not logs_online(logger):
            continue
        try:
            import wandb  # noqa: F401
        except ImportError:
            return  # the WandbLogger itself names the missing package when it is built
        url = wandb_base_url()
        if not has_credentials(url):
            problem = (f"no W&B API key for {url} is configured (WANDB_API_KEY, `wandb login`, or an identity "
                       "token file)")
        else:
            problem = connection_problem(url)
        if problem is not None:
            raise WandbUnavailable(_message(logger, url, problem))


def _message(logger: Any, url: str, problem: str) -> str:
    args = getattr(logger, "init_args", None) or {}
    name = ", ".join(f"{k}={args.get(k)}" for k in ("project", "name") if args.get(k))
    save_dir = args.get("save_dir") or args.get("dir") or "<trainer.default_root_dir>"
    return (
        f"trainer.logger {logger.class_path}({name}) is set to log online to {url}, but {problem}. W&B is first "
        "used after TIVE's warm-up and valuation, where process 0 would fail and the others wait for it until "
        "the collective timeout, so the run stops now. Either\n"
        "  - log offline and upload later: set `offline: true` in the logger's init_args (on the command line "
        "--trainer.logger.init_args.offline true), or export WANDB_MODE=offline; when the run is done, upload it "
        f"from a machine with internet: wandb sync {save_dir}/wandb/offline-run-*\n"
        "  - or make online logging work on every process: an API key (WANDB_API_KEY or `wandb login`) and a "
        f"route to {url} (WANDB_BASE_URL for another host, HTTPS_PROXY for a proxy).\n"
        "WANDB_MODE=disabled turns W&B off altogether."
    )
