"""The `tive:` section: one settings dataclass that the CLI parses and the callback runs on."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

try:
    from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type
except ModuleNotFoundError:  # the CLI needs jsonargparse; Python callers can do without it
    from lightning_tive.restricted_numbers import PositiveFloat, PositiveInt, restricted_number_type

# Types the CLI checks while parsing, so a bad `tive:` value fails before any model is loaded.
Fraction = restricted_number_type("Fraction", float, [(">", 0), ("<=", 1)], docstring="a number in (0, 1]")

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_MODULES = (*ATTENTION_MODULES, "gate_proj", "up_proj", "down_proj")
SelectionStrategy = Literal[
    "tive", "tive_uniform", "instance_only", "random", "gradnorm", "length", "perplexity", "size_aware",
    "length_normalised",
]
STRATEGIES: tuple[str, ...] = typing.get_args(SelectionStrategy)
NEEDS_GRADIENTS = tuple(s for s in STRATEGIES if s not in ("random", "length"))  # the rest read the feature store
# The settings that change a stored feature (the rest only change what is selected from it).
FEATURE_FIELDS = (
    "warmup_ratio", "warmup_epochs", "warmup_lr", "warmup_projector_lr", "warmup_grad_clip", "warmup_loss",
    "warmup_batch_size", "reference_lora", "gradient_modules", "projector", "proj_dim", "seed",
    "valuation_max_length", "gradient_layers", "reference_model",
)
# Feature settings that make valuation cheaper; `features_from` refuses a store valued with others.
COST_FIELDS = ("valuation_max_length", "gradient_layers")


@dataclass
class ReferenceLora:
    """The throw-away reference adapter (authors' finetune_lora.sh: r=128, alpha=256, every linear layer of the LM).

    Args:
        r: LoRA rank.
        alpha: LoRA alpha (scale alpha / r).
        dropout: LoRA dropout during the warm-up (valuation runs without dropout).
        target_modules: module names inside the LM's layers that get the adapter.
    """

    r: PositiveInt = 128
    alpha: PositiveInt = 256
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR_MODULES))


@dataclass
class TIVEConfig:
    """TIVE data selection, run at the start of `fit` (the `tive:` section of a config).

    Args:
        enabled: run TIVE; off, the fit trains on the whole pool.
        strategy: `tive`; its ablations `tive_uniform` (task values, uniform inside tasks) and
            `instance_only` (task shares by size, instance values inside); baselines `random`
            (proportional to task size), `gradnorm` (largest gradient norms, GraNd-like), `length`
            (longest responses) and `perplexity` (highest loss under the reference model); beyond the
            paper, `size_aware` (task budget ∝ v(T)·|T|^size_alpha) and `length_normalised` (task value
            from ‖g_s‖·sqrt(tokens_s), so long answers are not "easy" by averaging alone). `random`
            and `length` need no warm-up or valuation.
        size_alpha: the exponent of `size_aware`.
        ratio: budget as a fraction of the pool, B = round(ratio * |D|), in (0, 1].
        warmup_ratio: size of the task-balanced warm-up set as a fraction of the pool.
        warmup_epochs: epochs of reference-adapter training.
        warmup_lr: AdamW learning rate of the reference adapter (cosine schedule, 3% warm-up).
        warmup_projector_lr: learning rate of the multi-modal projector during the warm-up (the
            authors train it too, at 2e-5); null keeps it frozen. It is restored bit for bit afterwards.
        warmup_grad_clip: gradient-norm clipping of the warm-up (HF Trainer's default 1.0); null: none.
        warmup_loss: `token_mean` (LLaVA's: mean over the global batch's supervised tokens) or
            `example_mean` (each example's mean, averaged).
        warmup_batch_size: global warm-up batch size, split over the processes (default: the
            DataModule's batch size times the number of processes).
        reference_lora: the reference adapter's LoRA settings.
        reference_model: a proxy model that is warmed up and values the pool instead of the main model,
            given as the `model:` section's arguments (e.g. a smaller LLaVA with the same tokenizer);
            valuation then costs about one proxy training step per example; null: the main model.
        gradient_modules: the reference adapter's modules whose LoRA weights the features are taken
            over (authors: the attention ones, `'self_attn' in name`); a subset of its target modules.
        projector: `kronecker` (structured, never forms the full gradient), `rademacher` (dense ±1,
            as the authors) or `identity`.
        proj_dim: feature dimension (8192 in the paper); ignored by `identity` (the adapter's size).
        max_projection_s_per_example: refuse to start a valuation whose projection alone is estimated
            (by timing a piece of it on the run's device) above this many seconds per example; null: no limit.
        sampling: `softmax` (∝ exp(u/temperature)), `topk` or `uniform` inside each task.
        temperature: softmax temperature; → 0 is top-k, large is uniform (authors' code: 1000).
        exclude_tasks: tasks that get no budget (authors' code: TextCaps).
        seed: seed of the warm-up draw, the adapter init, the projection and the sampling.
        output_dir: where the files go (default: `<default_root_dir>/tive`).
        stop_after_selection: write the files and stop; train nothing.
        features_from: a features folder of an earlier run: skip warm-up and valuation, select from it.
        valuation_batch_size: per-example gradient batch size (default: the DataModule's).
        valuation_max_length: cut each example to its first this-many tokens for valuation only (the
            prompt, image tokens included, then the start of the answer; warm-up and training see whole
            examples); valuation time falls with the tokens cut; a cut that empties an answer is refused; null: none.
        gradient_layers: take the features over the `gradient_modules` of the last k decoder layers only;
            the backward stops below the lowest of them and fewer weights are projected. The warm-up still
            trains the adapter on every layer, so every k values the same reference model; null: every layer.
        feature_dtype: storage of the features, unit vectors (lengths kept apart): `float16` (default,
            ~3 significant digits of every direction whatever the gradient's size) or `float32`.
        chunk_size: pool examples per feature-store chunk (the unit of resume).
    """

    enabled: bool = True
    strategy: SelectionStrategy = "tive"
    size_alpha: float = 0.5
    ratio: Fraction = 0.15
    warmup_ratio: Fraction = 0.08
    warmup_epochs: PositiveInt = 1
    warmup_lr: PositiveFloat = 2e-5
    warmup_projector_lr: PositiveFloat | None = 2e-5
    warmup_grad_clip: PositiveFloat | None = 1.0
    warmup_loss: Literal["token_mean", "example_mean"] = "token_mean"
    warmup_batch_size: PositiveInt | None = None
    reference_lora: ReferenceLora = field(default_factory=ReferenceLora)
    reference_model: dict[str, Any] | None = None
    gradient_modules: list[str] = field(default_factory=lambda: list(ATTENTION_MODULES))
    projector: Literal["kronecker", "rademacher", "identity"] = "kronecker"
    proj_dim: PositiveInt = 8192
    max_projection_s_per_example: PositiveFloat | None = 10.0
    sampling: Literal["softmax", "topk", "uniform"] = "softmax"
    temperature: PositiveFloat = 1.0
    exclude_tasks: list[str] = field(default_factory=list)
    seed: int = 0
    output_dir: str | None = None
    stop_after_selection: bool = False
    features_from: str | None = None
    valuation_batch_size: PositiveInt | None = None
    valuation_max_length: PositiveInt | None = None
    gradient_layers: PositiveInt | None = None
    feature_dtype: Literal["float16", "float32"] = "float16"
    chunk_size: PositiveInt = 1024

    def __post_init__(self) -> None:
        if isinstance(self.reference_lora, dict):
            self.reference_lora = ReferenceLora(**self.reference_lora)
        _check_types(self, "tive")
        _check_types(self.reference_lora, "tive.reference_lora")
        self.gradient_modules, self.exclude_tasks = list(self.gradient_modules), list(self.exclude_tasks)
        if self.reference_model is not None:  # a bad key fails here, before any model is built
            from lightning_tive.proxy import check_reference_model

            self.reference_model = _plain(self.reference_model)
            check_reference_model(self.reference_model)
        outside = sorted(set(self.gradient_modules) - set(self.reference_lora.target_modules))
        if not self.gradient_modules or outside:
            raise ValueError(
                f"tive.gradient_modules must be a non-empty subset of tive.reference_lora.target_modules "
                f"{self.reference_lora.target_modules}; {outside or 'it is empty'}"
            )

    @property
    def needs_gradients(self) -> bool:
        """Whether the strategy needs the warm-up and the valuation."""
        return self.strategy in NEEDS_GRADIENTS

    def as_dict(self) -> dict:
        """Every setting as plain JSON values (summary.json)."""
        return asdict(self)

    def feature_settings(self) -> dict:
        """The settings that change a stored feature (part of the feature store's fingerprint)."""
        return {name: value for name, value in asdict(self).items() if name in FEATURE_FIELDS}


def _check_types(settings: Any, prefix: str) -> None:
    """Validate by the annotated types (the CLI checks them at parse time; Python callers here)."""
    hints = typing.get_type_hints(type(settings))
    for item in fields(settings):
        value = getattr(settings, item.name)
        checked = _coerce(hints[item.name], value)
        if checked is _INVALID:
            raise ValueError(f"{prefix}.{item.name}: {value!r} is not a valid {_describe(hints[item.name])}")
        setattr(settings, item.name, checked)


_INVALID = object()


def _plain(value: Any) -> Any:
    """Nested mappings and lists as plain dicts and lists (jsonargparse may hand over Namespaces)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(kind: Any, value: Any) -> Any:
    """The value as a plain builtin if it fits `kind`, else _INVALID (restricted types are not pickled)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return value if value in args else _INVALID
    if args and type(None) in args:  # Optional[...]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value)
    if kind is bool:
        return value if isinstance(value, bool) else _INVALID
    if isinstance(kind, type) and issubclass(kind, (int, float)) and kind not in (int, float):  # restricted
        try:
            checked = kind(value)
        except (TypeError, ValueError):
            return _INVALID
        return float(checked) if issubclass(kind, float) else int(checked)
    if kind is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID
    if kind is int:
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    return value


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "choice of " + ", ".join(map(repr, typing.get_args(kind)))
    return getattr(kind, "__name__", str(kind))
