"""An offline byte-level BPE tokenizer for the tiny demo model.

Trained deterministically on a fixed corpus (the demo's templates and words, the vicuna v1
system prompt and role tags, and common English words), so no download is ever needed.
Byte-level: any UTF-8 text encodes and decodes back exactly. Like Llama, `tokenizer(text)`
prepends `<s>` and appends nothing; `</s>` inside text is the eos token, `<image>` one special id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_tive.files import build_cache_folder
from lightning_tive.paths import default_cache_root

# Bump when the corpus or settings change: it names the cache folder.
TOKENIZER_VERSION = 2
VOCAB_SIZE = 1024

BOS, EOS, UNK, PAD, IMAGE = "<s>", "</s>", "<unk>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)  # ids 0..4 in this order

# LLaVA-1.5's conv_vicuna_v1 system prompt (a frozen copy, like the words below).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# A frozen copy of the demo's words, not an import: a tokenizer must not change under a cache
# folder that keeps its name. Words added to the demo later still encode, just in more pieces.
_COLORS = "red green blue yellow orange purple pink brown black white gray"
_SHAPES = "circle square triangle diamond star shape shapes"
_POSITIONS = (
    "in the top left corner|at the top|in the top right corner|on the left|in the center|"
    "on the right|in the bottom left corner|at the bottom|in the bottom right corner"
)
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten"
_OPPOSITES = "hot cold big small up down left right fast slow day night open closed light dark old new wet dry high low full empty early late happy sad top bottom"
_TEMPLATES = (
    "What color is the shape?",
    "What shape is in the image?",
    "How many shapes are in the image?",
    "Is the {c} {s} to the left of the {c2} {s2}?",
    "Is the {c} {s} to the right of the {c2} {s2}?",
    "Is the {c} {s} above the {c2} {s2}?",
    "Is the {c} {s} below the {c2} {s2}?",
    "What color is the {s}?",
    "Describe the image in detail.",
    "What do you see in this image?",
    "Give a detailed description of the image.",
    "The image shows {n} shapes on a white background: a {c} {s} {p}, a {c2} {s2} {p2} and a {c} {s2} {p}.",
    "What is written in the image?",
    "What shapes can you see in the image?",
    "I can see a {c} {s} {p} and a {c2} {s2} {p2}.",
    "How many shapes are there?",
    "There is one shape in the image.",
    "There are {n} shapes in the image.",
    "The {s} is {c}.",
    "Where is the {c} {s}?",
    "The {c} {s} is {p} of the image.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Yes No yes no A. B. C. D. A B C D",
)
_COMMON_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know water "
    "than call first who may down side been now find any new work part take get place made live where after "
    "back little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large spell add even land "
    "here must big high such follow act why ask men change went light kind off need house picture try us "
    "again animal point mother world near build self earth father head stand own page should country found "
    "answer school grow study still learn plant cover food sun four between state keep eye never last let "
    "thought city tree cross farm hard start might story saw far sea draw left late run don't while press "
    "close night real life few north open seem together next begin got walk example ease paper group always "
    "music those both mark often letter until mile river car feet care second book carry took science eat room "
    "friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough "
    "plain girl usual young ready above ever red list though feel talk bird soon body dog family direct pose "
    "leave song measure door product black short numeral class wind question happen complete ship area half "
    "rock order fire south problem piece told knew pass since whole king space heard best hour better true "
    "during hundred five remember step early hold west ground interest reach fast verb sing listen six table "
    "travel less morning ten simple several vowel toward war lay against pattern slow center love person money "
    "serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead "
    "cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
    "contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
    "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide "
    "surface deep moon island foot system busy test record boat common gold possible plane instead dry wonder "
    "laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill east "
    "paint language among image describe detail assistant human user question answer helpful polite"
)


def _corpus() -> Iterator[str]:
    """The fixed training corpus, in a fixed order."""
    colors, shapes, positions = _COLORS.split(), _SHAPES.split()[:5], _POSITIONS.split("|")
    numbers = _NUMBER_WORDS.split()
    for i, template in enumerate(_TEMPLATES):
        for j in range(len(colors)):
            yield template.format(
                c=colors[j],
                c2=colors[(j + i + 1) % len(colors)],
                s=shapes[(i + j) % len(shapes)],
                s2=shapes[(i + j + 2) % len(shapes)],
                p=positions[(i + j) % len(positions)],
                p2=positions[(i + 2 * j + 1) % len(positions)],
                n=numbers[2 + j % 4],
            )
    for k in range(0, 41):
        yield f"What is {k} plus {40 - k}? {k + 1} minus {k // 2}? Which number is larger, {k} or {k // 3}? {k}"
    words = _OPPOSITES.split()
    for a, b in zip(words[::2], words[1::2], strict=True):
        yield f"What is the opposite of {a}? {b} What is the opposite of {b}? {a}"
    yield " ".join(_POSITIONS.split("|")) + " " + _NUMBER_WORDS
    yield _COMMON_WORDS
    yield "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()[]{}<>-+*/=%&#@$_"
    for turn in range(4):
        yield (
            f"{VICUNA_SYSTEM} USER: <image>\nWhat color is the shape? ASSISTANT: {colors[turn]}</s>"
            f"USER: What shape is in the image? ASSISTANT: {shapes[turn]}</s>"
        )


def _train_backend() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=False, byte_fallback=False))
    # Single digits, as in Llama: arithmetic answers stay compositional.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_demo_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train the demo tokenizer offline (deterministic), and save it to `save_dir` if given."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_backend(),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=2048,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def demo_tokenizer_path(cache_dir: str | Path | None = None) -> Path:
    """Build the demo tokenizer once into the cache (race-safe) and return its folder."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_cache_folder(root / f"tokenizer-v{TOKENIZER_VERSION}", build_demo_tokenizer, "tokenizer.json")

