"""The LightningCLI for lightning_tive: `fit`, `validate`, `test` (`export`, `experiment`, `fetch-smollm2`: see __main__)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_tive.callback import TIVESelectionCallback
from lightning_tive.checkpoints import FinalModel
from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.files import atomic_write
from lightning_tive.model import LlavaModule
from lightning_tive.tive_config import TIVEConfig
from lightning_tive.wandb_check import check_wandb_loggers

FINISHED = "finished.json"  # written into the run folder when a fit completes
# Notices a user must see go through logging, which `PYTHONWARNINGS=ignore` does not silence.
log = logging.getLogger("lightning_tive")
# Logger classes whose `save_dir` defaults to the working directory: the run folder instead.
UNSET_SAVE_DIRS = (None, ".", "")


class TiveCLI(LightningCLI):
    """LightningCLI over LlavaModule and LlavaDataModule, with the `tive:` section and one run folder.

    The module owns its optimizers. Every output of a run (checkpoints, the W&B run, skipped.jsonl,
    tive/, config.yaml) lands under `trainer.default_root_dir` unless that path is set explicitly; the
    model as trained when the fit ends is `checkpoints/final.ckpt` (FinalModel).
    """

    def add_arguments_to_parser(self, parser) -> None:
        """The top-level `tive:` section (TIVEConfig), always present, and `overwrite`."""
        parser.add_class_arguments(TIVEConfig, "tive", instantiate=True, sub_configs=True)
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="fit into a run folder that already holds a finished run, replacing it",
        )
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="torch's intra-op CPU threads (null: torch's default, one per core); on a CPU shared with "
            "other processes, 1 avoids oversubscription, which can slow a run down 10x or more",
        )

    def before_instantiate_classes(self) -> None:
        """Apply `torch_threads`; point every unset output path at `trainer.default_root_dir`; check online W&B."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.torch_threads is not None:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        root = Path(cfg.trainer.default_root_dir or Path.cwd())
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for logger in loggers:
            args = getattr(logger, "init_args", None)
            if args is not None and "save_dir" in args and args.save_dir in UNSET_SAVE_DIRS:
                args.save_dir = str(root)
        # Every process, before anything is built: an online W&B logger that cannot log stops them all now.
        check_wandb_loggers(loggers)
        for callback in cfg.trainer.callbacks or []:
            args = getattr(callback, "init_args", None)
            if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and getattr(args, "dirpath", None) is None:
                args.dirpath = str(root / "checkpoints")
        if cfg.data.output_dir is None:
            cfg.data.output_dir = str(root)
        if cfg.tive.output_dir is None:
            cfg.tive.output_dir = str(root / "tive")

    def _root(self) -> Path:
        cfg = self.config[self.subcommand]
        return Path(cfg.trainer.default_root_dir or Path.cwd())

    def before_fit(self) -> None:
        """Refuse to fit over a finished run in the same folder unless resuming it or told to."""
        cfg, root = self.config[self.subcommand], self._root()
        finished = root / FINISHED
        if cfg.ckpt_path is not None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, (TIVESelectionCallback, FinalModel)):
                    callback.resume_from = str(cfg.ckpt_path)
            return
        if finished.exists() and not cfg.overwrite:
            raise RuntimeError(
                f"{root} already holds a finished run ({FINISHED}, config.yaml, tive/, checkpoints/). Write this one "
                f"elsewhere with --trainer.default_root_dir <folder>, continue that run from a checkpoint with "
                f"--ckpt_path {root / 'checkpoints' / 'last.ckpt'}, or replace it with --overwrite true."
            )
        if not self.trainer.is_global_zero:
            return
        if finished.exists():
            log.warning(f"replacing the finished run in {root} (--overwrite true)")
            finished.unlink()
        elif (root / "checkpoints" / "last.ckpt").exists():
            log.warning(
                f"{root} holds an unfinished run: this one starts training over (its stored TIVE features are reused "
                f"when they match). To continue it instead, pass --ckpt_path {root / 'checkpoints' / 'last.ckpt'}."
            )

    def after_fit(self) -> None:
        """Mark the run folder as holding a finished run, naming its final model."""
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            root = self._root()
            root.mkdir(parents=True, exist_ok=True)
            final = next(c for c in self.trainer.callbacks if isinstance(c, FinalModel)).path(self.trainer)
            record = {
                "global_step": self.trainer.global_step, "final_model": str(final) if final.exists() else None,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            atomic_write(root / FINISHED, json.dumps(record) + "\n")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with TIVESelectionCallback (the `tive:` section) and FinalModel (checkpoints/final.ckpt)."""
        tive = TIVESelectionCallback(self._get(self.config_init, "tive"))
        defaults = self.trainer_defaults.get("callbacks", [])
        defaults = defaults if isinstance(defaults, list) else [defaults]
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": [tive, FinalModel(), *defaults]}
        return super().instantiate_trainer(**kwargs)


def run_cli(args: list[str] | dict | None = None, run: bool = True) -> TiveCLI:
    """Run `fit` / `validate` / `test` from the command line or a list of arguments.

    With `run=False` the arguments hold no subcommand, and the trainer, module and datamodule are
    only built (as scripts that drive them do).
    """
    return TiveCLI(
        LlavaModule,
        LlavaDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
