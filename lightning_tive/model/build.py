"""Building LLaVA and its processor from one source (`build_llava`), before any fine-tuning mode applies.

Sources, exactly one: `pretrained` (a HF LLaVA id or folder); parts, as LLaVA-1.5 stage 2 starts
(`language_model` or its `gguf_file`, plus `vision_tower` or a random `vision_config` tower, plus an
optional stage-1 `projector_path`); or `tiny` (random weights from a small config). Random weights
come from `init_seed` alone, so a rebuild (checkpoint load, export) gives the same frozen weights;
`init_from` then loads an earlier run's trained weights (init_from.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_tive.model.init_from import BUILD_SOURCE_KEYS, load_init_weights
from lightning_tive.model.settings import TinyLlavaConfig, VisionTowerConfig, clip_vision_config

TorchDtype = Literal["bfloat16", "float16", "float32"]


@dataclass
class LlavaSource:
    """Where LLaVA's weights come from and how they load; `LlavaModule`'s build arguments, checked when made.

    `tiny` and `vision_config` may arrive as dicts (LightningCLI, `load_from_checkpoint`).
    """

    pretrained: str | None = None
    language_model: str | None = None
    vision_tower: str | None = None
    projector_path: str | None = None
    gguf_file: str | None = None
    vision_config: VisionTowerConfig | None = None
    tiny: TinyLlavaConfig | None = None
    tokenizer: str | None = None
    torch_dtype: TorchDtype | None = None
    init_seed: int = 0
    init_from: str | None = None
    #: Keep only the first N decoder layers of the language model once built and `init_from` is loaded.
    language_model_layers: int | None = None

    def __post_init__(self) -> None:
        composed = self.composed
        if sum([self.pretrained is not None, composed, self.tiny is not None]) != 1:
            raise ValueError(
                "model: give exactly one of `pretrained`, (`language_model` + `vision_tower` or "
                "`vision_config`), or `tiny`"
            )
        if composed and self.language_model is None:
            raise ValueError("model: `vision_tower` / `vision_config` need a `language_model` to compose with")
        if composed and (self.vision_tower is None) == (self.vision_config is None):
            raise ValueError(
                "model: `language_model` takes exactly one vision source: `vision_tower` (pretrained CLIP) "
                "or `vision_config` (random CLIP tower)"
            )
        if self.gguf_file is not None and self.language_model is None:
            raise ValueError("model: `gguf_file` names a file inside the `language_model` folder; give both")
        if self.projector_path is not None and not composed:
            raise ValueError("model: `projector_path` is for the composed path (`language_model` + vision tower)")
        if self.tokenizer is not None and self.tiny is None:
            raise ValueError(
                "model: `tokenizer` is for the `tiny` path; `pretrained` and `language_model` bring their own"
            )
        if self.torch_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"model.torch_dtype must be bfloat16|float16|float32, got {self.torch_dtype!r}")
        if self.language_model_layers is not None and (
            isinstance(self.language_model_layers, bool) or not isinstance(self.language_model_layers, int)
            or self.language_model_layers < 1
        ):
            raise ValueError(f"model.language_model_layers must be a positive integer, got {self.language_model_layers!r}")
        if isinstance(self.tiny, dict):
            self.tiny = TinyLlavaConfig(**self.tiny)
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionTowerConfig(**self.vision_config)

    @property
    def composed(self) -> bool:
        """Whether LLaVA is composed from parts (a language model plus a vision tower)."""
        return self.language_model is not None or self.vision_tower is not None or self.vision_config is not None

    def load_dtype(self) -> torch.dtype | None:
        """The dtype pretrained weights load in (None: as stored)."""
        return getattr(torch, self.torch_dtype) if self.torch_dtype else None

    def settings(self) -> dict:
        """The settings that decide the built (pre-fine-tuning) weights, as a checkpoint's hyper-parameters hold them."""
        settings = {}
        for key in BUILD_SOURCE_KEYS:
            value = getattr(self, key)
            settings[key] = asdict(value) if is_dataclass(value) else value
        return settings


@dataclass
class BuiltLlava:
    """A built `LlavaForConditionalGeneration`, its `LlavaProcessor`, and the language model's load timings."""

    model: Any
    processor: Any
    load_seconds: dict[str, float | bool] = field(default_factory=dict)


def build_llava(source: LlavaSource, quantize_4bit: bool = False) -> BuiltLlava:
    """Build the processor, then the model (with `init_from`'s weights; 4-bit NF4 for QLoRA)."""
    builder = LlavaBuilder(source)
    processor = builder.processor()
    model = builder.model(processor, quantize_4bit)
    return BuiltLlava(model, processor, builder.load_seconds)


class LlavaBuilder:
    """One build from one source; remembers where the language model loads from and how long it took.

    `processor()` first (the DataModule needs it before any weight exists), `model()` or `skeleton()`
    later: in a multi-process fit only process 0 reads the weights, the others build the skeleton.
    """

    def __init__(self, source: LlavaSource) -> None:
        self.source = source
        self.load_seconds: dict[str, float | bool] = {}  # language-model load timings (GGUF path)
        self._lm_dir: str | None = None

    def language_model_dir(self) -> str:
        """Where the composed path loads the LM and its tokenizer: `language_model`, or the float cache
        of `gguf_file` (dequantised the first time)."""
        if self._lm_dir is None:
            src = self.source
            if src.gguf_file is None:
                self._lm_dir = src.language_model
            else:
                from lightning_tive.weights import gguf_language_model_dir

                folder, timings = gguf_language_model_dir(Path(src.language_model) / src.gguf_file)
                self._lm_dir = str(folder)
                self.load_seconds.update(timings)
        return self._lm_dir

    def processor(self) -> Any:
        """The `LlavaProcessor`: the source's tokenizer (with `<image>` and a pad token) and image processor."""
        from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor
        from transformers.models.clip import CLIPImageProcessorPil

        src = self.source
        if src.pretrained is not None:
            return AutoProcessor.from_pretrained(src.pretrained)
        if src.tiny is not None:
            tok_path = src.tokenizer
            if tok_path is None or tok_path == "demo":
                from lightning_tive.data.tokenizer import demo_tokenizer_path

                tok_path = str(demo_tokenizer_path())
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
            image_processor, patch = offline_image_processor(src.tiny.image_size), src.tiny.patch_size
        else:
            from transformers import CLIPVisionConfig

            tokenizer = AutoTokenizer.from_pretrained(self.language_model_dir(), use_fast=True)
            if src.vision_config is not None:
                image_processor = offline_image_processor(src.vision_config.image_size)
                patch = src.vision_config.patch_size
            else:
                image_processor = CLIPImageProcessorPil.from_pretrained(src.vision_tower)
                patch = CLIPVisionConfig.from_pretrained(src.vision_tower).patch_size
        _ensure_special_tokens(tokenizer)
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )

    def _quantization_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        compute = self.source.load_dtype() or torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # patterns match from the start of the module name (or as a suffix): anchor with .*
            llm_int8_skip_modules=[r".*vision_tower", r".*multi_modal_projector", "lm_head"],
        )

    def model(self, processor: Any, quantize_4bit: bool) -> Any:
        """The `LlavaForConditionalGeneration` of the source, with `init_from`'s weights loaded."""
        from transformers import LlavaForConditionalGeneration

        src = self.source
        quant = self._quantization_config() if quantize_4bit else None
        if src.pretrained is not None:
            if quant is not None and src.init_from is not None:
                raise ValueError(
                    "model.init_from cannot be applied to a 4-bit `pretrained` load; export the init_from run "
                    "(`python -m lightning_tive export`) and pass that folder as model.pretrained"
                )
            model = LlavaForConditionalGeneration.from_pretrained(
                src.pretrained, dtype=src.load_dtype(), quantization_config=quant
            )
        elif src.tiny is not None:
            model = self._tiny(processor)
        else:
            model = self._compose_from_parts(processor)
        if src.init_from is not None:
            load_init_weights(model, src.init_from, src.settings())
        keep_first_layers(model, src.language_model_layers)
        if quant is None or src.pretrained is not None:
            return model
        # 4-bit loading goes through from_pretrained; a temporary folder makes it one code path.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return LlavaForConditionalGeneration.from_pretrained(tmp, dtype=src.load_dtype(), quantization_config=quant)

    def skeleton(self, processor: Any) -> Any:
        """The model's structure on the meta device, without reading or drawing any weight.

        Same modules, names and shapes as `model()`; dtypes may differ where a checkpoint's stored dtype
        decides them (the caller aligns them with a real build's).
        """
        return keep_first_layers(self._whole_skeleton(processor), self.source.language_model_layers)

    def _whole_skeleton(self, processor: Any) -> Any:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            CLIPVisionConfig,
            CLIPVisionModel,
            LlavaForConditionalGeneration,
        )

        src = self.source
        dtype = src.load_dtype() or torch.float32
        with torch.device("meta"):
            if src.pretrained is not None:
                return LlavaForConditionalGeneration._from_config(AutoConfig.from_pretrained(src.pretrained), dtype=dtype)
            if src.tiny is not None:
                return self._tiny(processor)
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.language_model_dir()), dtype=dtype)
            resize_embeddings(lm, len(processor.tokenizer))
            if src.vision_config is not None:
                vision_config = src.vision_config.clip_config()
            else:
                vision_config = CLIPVisionConfig.from_pretrained(src.vision_tower)
            model = LlavaForConditionalGeneration(llava_config(processor, vision_config, lm.config))
            model.model.vision_tower = CLIPVisionModel(vision_config).to(dtype)
            model.model.language_model = lm.model
            model.lm_head = lm.lm_head
            model.model.multi_modal_projector.to(dtype)
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        return model

    def _tiny(self, processor: Any) -> Any:
        from transformers import LlamaConfig, LlavaForConditionalGeneration

        t: TinyLlavaConfig = self.source.tiny
        tokenizer = processor.tokenizer
        if t.vocab_size is not None and t.vocab_size < len(tokenizer):
            raise ValueError(f"tiny.vocab_size={t.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        vision = clip_vision_config(
            t.vision_hidden_size, t.vision_intermediate_size, t.vision_layers, t.vision_heads, t.image_size, t.patch_size
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer) if t.vocab_size is None else t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_attention_heads,
            max_position_embeddings=t.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.source.init_seed)
            model = LlavaForConditionalGeneration(llava_config(processor, vision, text))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model

    def _compose_from_parts(self, processor: Any) -> Any:
        from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaForConditionalGeneration

        src = self.source
        dtype = src.load_dtype() or torch.float32
        start = time.perf_counter()
        lm = AutoModelForCausalLM.from_pretrained(self.language_model_dir(), dtype=src.load_dtype())
        self.load_seconds["language_model_s"] = time.perf_counter() - start
        tokenizer = processor.tokenizer
        resize_embeddings(lm, len(tokenizer))
        if src.vision_config is not None:
            vision_config = src.vision_config.clip_config()
            vision = None
        else:
            vision = CLIPVisionModel.from_pretrained(src.vision_tower, dtype=src.load_dtype())
            vision_config = vision.config
        config = llava_config(processor, vision_config, lm.config)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        # Random parts come from `init_seed` alone, so a rebuild (checkpoint load, export) matches.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(src.init_seed)
            if vision is None:
                vision = CLIPVisionModel(vision_config).to(dtype)
            projector = type(model.model.multi_modal_projector)(config)  # fresh, on CPU
        model.model.vision_tower = vision
        model.model.language_model = lm.model
        model.lm_head = lm.lm_head
        if src.projector_path is not None:
            projector.load_state_dict(load_llava_projector(src.projector_path))
        model.model.multi_modal_projector = projector.to(dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        eos = lm.generation_config.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id if eos is None else eos
        return model


def keep_first_layers(model: Any, layers: int | None) -> Any:
    """Cut LLaVA's language model to its first `layers` decoder layers (None: keep all); returns the model.

    A shallower copy of the same LM shares its tokenizer, embeddings and kept weights, so it can value
    the pool for the full model (`tive.reference_model`) at a fraction of the cost.
    """
    if layers is None:
        return model
    decoder = model.model.language_model
    total = len(decoder.layers)
    if layers > total:
        raise ValueError(f"model.language_model_layers={layers} exceeds the language model's {total} decoder layers")
    decoder.layers = decoder.layers[:layers]
    for config in {id(c): c for c in (decoder.config, model.config.text_config)}.values():
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types[:layers])
    return model


def llava_config(processor: Any, vision_config: Any, text_config: Any) -> Any:
    """LLaVA-1.5's `LlavaConfig` over a vision and a text config, with the processor's image token."""
    from transformers import LlavaConfig

    from lightning_tive.data.images import image_token_count

    tokenizer = processor.tokenizer
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token),
        image_seq_length=image_token_count(processor),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def load_llava_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an original LLaVA `mm_projector.bin` and map its keys onto transformers' projector."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapping = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}
    out = {}
    for key, value in state.items():
        suffix = key.split("mm_projector.")[-1]
        if suffix not in mapping:
            raise KeyError(f"{path}: unexpected projector key {key!r} (expected model.mm_projector.{{0,2}}.{{weight,bias}})")
        out[mapping[suffix]] = value
    if len(out) != 4:
        raise KeyError(f"{path}: expected 4 projector tensors, found {sorted(state)}")
    return out


def resize_embeddings(lm: Any, size: int) -> None:
    """Grow the LM's token embeddings (and an untied `lm_head`) to `size` rows, deterministically.

    Existing rows are kept bit for bit; each new row is the mean of the old ones (no random draw, so a
    rebuild from a checkpoint gives the same frozen weights). Tied embeddings stay tied.
    """
    old = lm.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    lm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        embed = lm.get_input_embeddings().weight
        embed[old:] = embed[:old].mean(dim=0, keepdim=True)
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not embed:
            head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)


def offline_image_processor(size: int) -> Any:
    """A CLIP-style image processor for `size`-pixel images, built without any download."""
    from transformers.models.clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _ensure_special_tokens(tokenizer: Any) -> None:
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads vicuna with <unk>; no new embedding row is needed.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
