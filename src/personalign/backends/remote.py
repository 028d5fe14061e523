"""A remote OpenAI-compatible engine as personalign's generation backend (llama.cpp server or vLLM).

personalign renders the personalised prompt (memories, shots, description, prompt-level
steering) with the generator's chat template, as it does in process, and sends its token ids to
the engine's ``/v1/completions`` (both engines accept a list of token ids as ``prompt``), so the
engine decodes exactly the prompt the local backend would. Each row is one HTTP request; the
engine batches concurrent requests itself (continuous batching), so a batch's rows go out
together on a thread pool.

Adapters:
- llama.cpp: the user's PEFT adapter is converted to a GGUF LoRA once per version (next to it,
  as ``adapter-<version>.gguf``; a retrained adapter is a new file, which the managed server loads) and loaded into the server that personalign manages
  (:class:`~personalign.backends.llamacpp.LlamaServer`); a request names it in its ``lora`` list
  with scale 1. ``mix`` steering becomes a per-request weight-space mix: the objective adapters at
  scales ``w_k`` beside the user's at 1 (the first-order counterpart of the in-process logit mix
  ``log pi_own + sum_k w_k (log pi_k - log pi_base)``, not the same distribution). On a server
  personalign does not manage, only the adapters it was started with (``--lora``) are used, and
  ``mix`` is not offered (``auto`` steers with ``logit`` or ``prompt`` there).
- vLLM: ``model=<adapter name>-<version>``; an adapter version the server has not seen is loaded through its
  ``/v1/load_lora_adapter`` endpoint (the server must run with ``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, and see the store's folder at the same path).

Steering: ``prompt`` (and every prompt-level conditioner) is exact; ``logit`` (an end-of-sequence
shift) becomes ``logit_bias`` on the end tokens, exact; ``mix`` as above on llama.cpp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from personalign.backends import DECODING, BackendCapabilityError, Capabilities
from personalign.errors import EngineError, ValidationError

logger = logging.getLogger(__name__)

KINDS = ("llama.cpp", "vllm")
GGUF_PREFIX = (
    "adapter-"  # adapter-<version>.gguf beside the user's PEFT folder: forgetting the user removes it
)


def adapter_version(peft_folder: Path) -> str:
    """A short tag that changes whenever the adapter's weights are replaced (retraining, import):
    engines load adapters by name or path, so a new version must get a new one."""
    stat = (peft_folder / "adapter_model.safetensors").stat()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _capabilities(kind: str) -> Capabilities:
    no_local = {
        "top_logprobs",
        "min_new_tokens",
    }  # neither engine reports or forces them as transformers does
    if kind == "llama.cpp":
        return Capabilities(
            steering=frozenset({"prompt", "logit", "mix"}),
            conditioning=frozenset({"memory", "shots", "describe", "adapter", "rerank"}),
            decoding=frozenset(DECODING) - no_local,
            notes={
                "mix": "weight-space: objective LoRAs at scales w_k on the engine, not the logit mix",
                "grammar": "llama.cpp's json_schema sampler (whitespace allowed, unlike the local one)",
            },
        )
    return Capabilities(
        steering=frozenset({"prompt", "logit"}),
        conditioning=frozenset({"memory", "shots", "describe", "adapter", "rerank"}),
        decoding=frozenset(DECODING) - {"top_logprobs"},
        notes={"grammar": "vLLM's guided decoding (guided_json)"},
    )


class _Gate:
    """Many requests in flight (``shared``) or one server restart (``exclusive``), never both."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._inflight += 1
        try:
            yield
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._closed = True
            while self._inflight:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


def _config_folder(generator: Any, root: Path) -> Path:
    """A folder with the generator's ``config.json`` (all the adapter converter reads of the base)."""
    config = generator.model.config
    key = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:12]
    folder = root / f"base-config-{key}"
    if not (folder / "config.json").is_file():
        config.save_pretrained(folder)
    return folder


class RemoteEngine:
    """Decode on an OpenAI-compatible engine at ``url`` (``kind``: ``llama.cpp`` or ``vllm``).

    ``server``: the :class:`~personalign.backends.llamacpp.LlamaServer` personalign manages (for
    llama.cpp adapters; without it, only adapters the server was started with are used, matched by
    file path). ``model``: the base model's name on the engine (vLLM's served model name).
    """

    remote = True

    def __init__(
        self,
        url: str,
        kind: str = "llama.cpp",
        server: Any = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_concurrency: int = 64,
        cache_prompt: bool = True,
    ) -> None:
        if kind not in KINDS:
            raise ValidationError(
                "engine_kind", f"is not one of {list(KINDS)}", "pass llama.cpp or vllm", kind
            )
        self.url = url.rstrip("/")
        self.kind = kind
        self.cache_prompt = cache_prompt  # llama.cpp: reuse a slot's cached prompt prefix
        self.name = kind
        self.server = server
        self.model = model
        self.capabilities = _capabilities(kind)
        if kind == "llama.cpp" and server is None:
            # the objective adapters of ``mix`` load only into a server personalign manages
            self.capabilities = dataclasses.replace(
                self.capabilities, steering=self.capabilities.steering - {"mix"}
            )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="personalign-remote")
        self._lock = threading.Lock()
        self._vllm_loaded: set[str] = set()
        self._gate = _Gate()
        self._converted: dict[Path, Path] = {}
        self.requests = 0  # sent to the engine (tests and benchmarks read it)

    # -- what a request may ask --------------------------------------------------------------
    def check(self, prepared: Any) -> None:
        """Refuse what this engine cannot do (``BackendCapabilityError`` naming the field)."""
        params, caps = prepared.params, self.capabilities
        if prepared.steer_method and prepared.steer and prepared.steer_method not in caps.steering:
            raise BackendCapabilityError("steer.method", self.name, caps, prepared.steer_method)
        if params.top_logprobs is not None and "top_logprobs" not in caps.decoding:
            raise BackendCapabilityError("top_logprobs", self.name, caps, params.top_logprobs)
        if params.min_new_tokens and "min_new_tokens" not in caps.decoding:
            raise BackendCapabilityError("min_new_tokens", self.name, caps, params.min_new_tokens)
        for name, present in (
            ("fspo", prepared.fspo),
            ("pplug", prepared.plug is not None),
            ("user_vas", prepared.guide is not None),
        ):
            if present and name not in caps.conditioning:
                raise BackendCapabilityError(name, self.name, caps, True)

    # -- adapters --------------------------------------------------------------------------------
    def _gguf(self, peft_folder: Path, out: Path, generator: Any) -> Path:
        from personalign.backends.llamacpp import cache_dir, convert_adapter

        config = _config_folder(generator, cache_dir() / "configs")
        return convert_adapter(peft_folder, config, out)

    def _loras(self, engine: Any, prepared: Any) -> list[tuple[str, Path, float]]:
        """``(name, GGUF file, scale)`` for a request's adapters on llama.cpp."""
        from personalign.backends.llamacpp import cache_dir
        from personalign.steering.methods import MIX_DIR

        out: list[tuple[str, Path, float]] = []
        if prepared.adapter_user is not None:
            folder = engine.adapters.path(prepared.adapter_user)
            gguf = folder.parent / f"{GGUF_PREFIX}{adapter_version(folder)}.gguf"
            if not gguf.is_file():
                self._gguf(folder, gguf, engine.generator)
                for old in folder.parent.glob(f"{GGUF_PREFIX}*.gguf"):  # earlier versions of this adapter
                    if old != gguf:
                        old.unlink(missing_ok=True)
            out.append((folder.parent.name, gguf, 1.0))
        if prepared.steer_method == "mix":
            root = engine.steering.root() / MIX_DIR
            for objective, weight in sorted(prepared.steer.items()):
                if weight == 0.0:
                    continue
                folder = root / objective
                digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
                gguf = self._gguf(
                    folder, cache_dir() / "converted" / f"mix-{objective}-{digest}.gguf", engine.generator
                )
                out.append((f"mix:{objective}", gguf, float(weight)))
        return out

    def _lora_field(self, loras: list[tuple[str, Path, float]]) -> list[dict[str, Any]]:
        if not loras:
            return []
        if self.server is not None:  # loaded by run() before any row was sent
            ids = self.server.adapter_ids()
            return [{"id": ids[str(path)], "scale": scale} for _, path, scale in loras]
        loaded = {str(Path(a["path"]).resolve()): a["id"] for a in self._http.get("/lora-adapters").json()}
        missing = [str(p) for _, p, _ in loras if str(p.resolve()) not in loaded]
        if missing:
            raise EngineError(
                f"the llama.cpp server at {self.url} has not loaded {missing}. Fix: start it with "
                "--lora <file> for each, or let personalign manage it (RemoteEngine(server=LlamaServer(...)))"
            )
        return [{"id": loaded[str(p.resolve())], "scale": s} for _, p, s in loras]

    def _vllm_model(self, engine: Any, prepared: Any) -> str:
        from personalign.adapters.store import adapter_name

        if prepared.adapter_user is None:
            return self.model or engine.generator.base_model_name_or_path
        folder = engine.adapters.path(prepared.adapter_user)
        name = f"{adapter_name(prepared.adapter_user)}-{adapter_version(folder)}"  # a retrained adapter is a new one
        with self._lock:
            if name not in self._vllm_loaded:
                path = str(folder)
                reply = self._http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
                if reply.status_code >= 400 and "already" not in reply.text:
                    raise EngineError(
                        f"vLLM at {self.url} did not load the adapter {path}: {reply.text[:300]}"
                    )
                self._vllm_loaded.add(name)
        return name

    # -- one request ---------------------------------------------------------------------------
    def load_adapters(self, engine: Any, batch: Sequence[Any]) -> None:
        """Convert and load the batch's adapters into the managed llama.cpp server before any row is
        sent: a server that must restart to load one waits for the requests in flight to finish."""
        if self.kind != "llama.cpp" or self.server is None:
            return
        wanted = {str(path): path for p in batch for _, path, _ in self._loras(engine, p)}
        if set(wanted) <= set(self.server.adapters):
            return
        with self._gate.exclusive():
            self.server.ensure_adapters(wanted)

    def body(self, engine: Any, prepared: Any, stream: bool) -> dict[str, Any]:
        """The ``/v1/completions`` body for one prepared row."""
        from personalign.steering.decoding import eos_token_ids
        from personalign.steering.methods import REGISTRY

        params = prepared.params
        body: dict[str, Any] = {
            "prompt": list(prepared.input_ids),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": stream,
        }
        if params.seed is not None:
            body["seed"] = params.seed % 2**32 if self.kind == "llama.cpp" else params.seed % 2**63
        bias = {int(k): float(v) for k, v in (params.logit_bias or {}).items()}
        if prepared.steer_method and prepared.steer:
            shift = REGISTRY[prepared.steer_method].eos_shift(prepared.steer)
            if shift:
                for token in eos_token_ids(
                    engine.generator.tokenizer, engine.generator.model.generation_config
                ):
                    bias[token] = bias.get(token, 0.0) + shift
        if bias:
            body["logit_bias"] = {str(k): v for k, v in bias.items()}
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.grammar is not None:
            schema = (
                {"type": "object"} if params.grammar.get("json_object") else params.grammar.get("json_schema")
            )
            body["json_schema" if self.kind == "llama.cpp" else "guided_json"] = schema
        if self.kind == "llama.cpp":
            if params.repetition_penalty != 1.0:
                body["repeat_penalty"] = params.repetition_penalty
            # the user's stable prefix (system prompt, memories, shots, earlier turns) stays in the
            # slot's KV cache: a returning user's next turn only processes what is new
            body["cache_prompt"] = self.cache_prompt
            body["lora"] = self._lora_field(self._loras(engine, prepared))
            body["model"] = self.model or "personalign"
        else:
            if params.repetition_penalty != 1.0:
                body["repetition_penalty"] = params.repetition_penalty
            if params.min_new_tokens:
                body["min_tokens"] = params.min_new_tokens
            body["model"] = self._vllm_model(engine, prepared)
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = self._http.post("/v1/completions", json=body)
        except httpx.HTTPError as err:
            raise EngineError(f"the {self.kind} engine at {self.url} is unreachable: {err}") from None
        if reply.status_code >= 400:
            raise EngineError(
                f"the {self.kind} engine at {self.url} answered {reply.status_code}: {reply.text[:500]}"
            )
        return reply.json()

    def _events(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self._http.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code >= 400:
                    reply.read()
                    raise EngineError(
                        f"the {self.kind} engine at {self.url} answered {reply.status_code}: {reply.text[:500]}"
                    )
                for line in reply.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.HTTPError as err:
            raise EngineError(f"the {self.kind} engine at {self.url} is unreachable: {err}") from None

    def _one(self, engine: Any, prepared: Any, stream: Any) -> Any:
        with self._gate.shared():
            return self._send(engine, prepared, stream)

    def _send(self, engine: Any, prepared: Any, stream: Any) -> Any:
        from personalign.chat import ChatResult
        from personalign.streaming import strip_stream

        body = self.body(engine, prepared, stream is not None)
        self.requests += 1
        if stream is None:
            reply = self._post(body)
            text = reply["choices"][0].get("text", "")
            usage = reply.get("usage") or {}
            tokens = int(usage.get("completion_tokens", 0))
        else:
            pieces: list[str] = []
            tokens, usage = 0, {}

            def chunks() -> Iterator[str]:
                nonlocal tokens
                for event in self._events(body):
                    if stream.cancelled:
                        return
                    choices = event.get("choices") or []
                    piece = choices[0].get("text", "") if choices else ""
                    if piece:
                        tokens += 1
                        pieces.append(piece)
                        yield piece
                    if event.get("usage"):
                        usage.update(event["usage"])
                        tokens = int(usage.get("completion_tokens") or tokens)

            for piece in strip_stream(chunks()):
                stream.put(piece)
            text = "".join(pieces)
        cond = prepared.conditioning
        result = ChatResult(
            text.strip(),
            prepared.user,
            cond.memories,
            cond.shots,
            prepared.steer,
            int(usage.get("prompt_tokens") or cond.prompt_tokens),  # the engine's count when it gives one
            tokens,
            prepared.description,
            prepared.personalization,
        )
        if stream is not None:
            stream.finish(result)
        return result

    def run(self, engine: Any, batch: Sequence[Any], streams: Sequence[Any]) -> list[Any]:
        """Decode every row of ``batch`` on the engine, concurrently; a failure fails each row's stream."""
        for prepared in batch:
            self.check(prepared)
        self.load_adapters(engine, batch)
        streams = list(streams) if streams else [None] * len(batch)
        futures = [self._pool.submit(self._one, engine, p, s) for p, s in zip(batch, streams, strict=True)]
        results, error = [], None
        for future, stream in zip(futures, streams, strict=True):
            try:
                results.append(future.result())
            except BaseException as err:  # noqa: BLE001 (re-raised below, after every row settled)
                error = error or err
                if stream is not None:
                    stream.fail(err)
        if error is not None:
            raise error
        return results

    def health(self) -> dict[str, Any]:
        """The engine's ``/health`` answer (``EngineError`` when it does not answer)."""
        try:
            reply = self._http.get("/health", timeout=5.0)
        except httpx.HTTPError as err:
            raise EngineError(f"the {self.kind} engine at {self.url} is unreachable: {err}") from None
        return {"status": reply.status_code, "engine": self.kind, "url": self.url}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()
        if self.server is not None:
            self.server.stop()


def managed_llama_cpp(
    model: str | Path | None = None, parallel: int = 4, ctx_size: int = 2048, threads: int | None = None
) -> RemoteEngine:
    """A llama.cpp server started here for ``model`` (default: the embedded GGUF) and its backend."""
    from personalign.backends.llamacpp import LlamaServer
    from personalign.models import embedded_gguf_path

    server = LlamaServer(model or embedded_gguf_path(), parallel=parallel, ctx_size=ctx_size, threads=threads)
    server.start()
    return RemoteEngine(server.url, kind="llama.cpp", server=server)
