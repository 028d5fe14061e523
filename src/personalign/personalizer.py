"""The facade chat apps use: enroll users, remember facts, chat with personalisation, forget.

    pz = Personalizer.load()                           # embedded models, store in ./.personalign
    pz.enroll("alice", [Comparison(prompt=..., chosen=..., rejected=...)])
    pz.remember("alice", "I am vegetarian and I cook for two.")
    pz.chat("alice", [{"role": "user", "content": "Plan my dinner."}])
    pz.forget("alice")
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from personalign.adapters.amplify import AmplifyConfig
from personalign.adapters.bank import LoraBank
from personalign.adapters.batched import gathered_lora, supports_gathered
from personalign.adapters.lora import LoraTrainConfig
from personalign.adapters.store import BASE, AdapterError, AdapterManager
from personalign.errors import ContextLengthError, ValidationError
from personalign.memory.chroma import MAX_MEMORY_CHARS
from personalign.memory.store import UserStore
from personalign.models import Encoder, Generator, load_encoder, load_generator
from personalign.persona.fspo import ADAPTER_NAME as FSPO_ADAPTER
from personalign.persona.fspo import (
    FSPO_CONFIG,
    Conditioning,
    Shot,
    count_prompt_tokens,
    describe_conversation,
    first_sentence,
    fit_to_context,
    fspo_adapter_meta,
    fspo_dir,
    query_of,
    rank_shots,
    with_description,
)
from personalign.persona.pplug import (
    CONFIG_FILE as PLUG_CONFIG,
)
from personalign.persona.pplug import (
    PersonaPlug,
    embed_user,
    input_embedding_dim,
    load_plug,
    plug_input_ids,
    plug_inputs,
    pplug_dir,
    read_plug_config,
)
from personalign.preferences import STATE_KEY, Preferences
from personalign.steering import rerank as rerank_method
from personalign.steering.decoding import (
    STEERABLE,
    RowControls,
    RowDecoder,
    TokenLogprob,
    compile_grammar,
    derived_seed,
    eos_token_ids,
)
from personalign.steering.methods import REGISTRY as STEERING_METHODS
from personalign.steering.objectives import infer_weights
from personalign.steering.runtime import Plan, SteeringRuntime
from personalign.steering.schema import Steering, parse_steering
from personalign.streaming import BatchStreamer, CancelledRows, TokenStream
from personalign.types import (
    ChatMessage,
    Comparison,
    UserProfile,
    convert_pydantic_error,
    parse_comparisons,
    parse_messages,
    validate_user_id,
)

DEFAULT_STORE = ".personalign"


class GenerationParams(BaseModel):
    """Decoding settings. ``temperature=0`` is greedy decoding (deterministic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=256, ge=1, le=8192)
    min_new_tokens: int = Field(default=0, ge=0, le=8192, description="suppress end-of-turn before this many tokens (benchmarks)")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=5.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="this request's own sampling seed (torch.Generator's range)")
    # OpenAI's per-row controls, applied by steering.decoding.RowDecoder
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(default=None, description="token id -> value added to its logit")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="record each token's log-probability and this many alternatives (None: none)")
    grammar: dict[str, Any] | None = Field(default=None, description='constrained decoding: {"json_object": true} or {"json_schema": {...}}')

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one ``generate`` call (each row samples on its own, see ``RowDecoder``)."""
        return ("decode", self.repetition_penalty, self.min_new_tokens)

    def row_controls(self, grammar: Any = None) -> RowControls:
        """This request's row in a :class:`~personalign.steering.decoding.RowDecoder` (``grammar``: the compiled one)."""
        return RowControls(
            self.temperature, self.top_p, self.seed, self.logit_bias, self.presence_penalty, self.frequency_penalty, self.top_logprobs, grammar
        )

    def generate_kwargs(self, pad_token_id: int | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad_token_id}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = min(self.min_new_tokens, self.max_new_tokens)
        return kwargs


class ConditioningParams(BaseModel):
    """Which conditioners apply to a request, and how much of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: bool = True
    shots: bool = True
    n_memories: int = Field(default=5, ge=0, le=100)
    n_shots: int = Field(default=4, ge=0, le=64)
    memory_threshold: float | None = Field(default=0.2, ge=-1.0, le=1.0)
    adapter: bool = True
    fspo: bool = Field(default=True, description="apply the FSPO meta-trained adapter to requests with shots (when one is installed and the user's own adapter is not used)")
    pplug: bool = Field(default=True, description="prepend the user's Persona-Plug soft token (when a projector is installed for this generator and the user has history)")
    describe: bool = Field(default=False, description="FSPO user-description step: a one-line description of the user, written by the generator from their comparisons, goes into the system prompt")
    rerank: int = Field(
        default=0,
        ge=0,
        le=16,
        description="personal reranking: sample this many candidates as rows of one batch and return the one the user's inferred reward scores highest (0 or 1: off; a user with no comparisons gets the plain answer)",
    )
    user_vas: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="user-conditioned value heads: guidance strength beta (0: off; None: on at the heads' default strength when heads are installed and the user has comparisons)",
    )
    rerank_temperature: float = Field(default=rerank_method.DEFAULT_TEMPERATURE, gt=0.0, le=5.0, description="sampling temperature of the rerank candidates when the request itself is greedy")


@dataclass(frozen=True)
class _Prepared:
    """A validated request: its conditioning, decoding settings, steering and prompt tokens."""

    user: str | None
    conditioning: Conditioning
    params: GenerationParams
    steer: dict[str, float]
    input_ids: list[int]
    adapter_user: str | None = None
    steer_method: str = "auto"
    fspo: bool = False  # the row runs the FSPO adapter
    description: str | None = None
    plug: Any = None  # the Persona-Plug soft token, (model_dim,)
    query: str = ""  # the user's last message: the prompt the reward scores candidates for
    rerank: int = 0  # candidates to sample and rerank by the user's reward (0: off)
    rerank_temperature: float = rerank_method.DEFAULT_TEMPERATURE
    personalization: dict[str, Any] | None = None  # what guidance runs, or why a requested one cannot
    guide: list[float] | None = None  # user-vas: per-head strengths beta * pi_u


@dataclass(frozen=True)
class ChatResult:
    """A reply and what conditioned it."""

    text: str
    user: str | None
    memories: list[str]
    shots: list[Shot]
    steer: dict[str, float]
    prompt_tokens: int
    completion_tokens: int
    description: str | None = None  # the user description, when the request asked for it
    personalization: dict[str, Any] | None = None  # decode-time guidance that ran (e.g. user-rerank: candidates, scores, pick)
    logprobs: list[TokenLogprob] | None = None  # per completion token, when the request asked for top_logprobs


def _consume(stream: TokenStream, worker: threading.Thread) -> Iterator[str]:
    """Iterate ``stream``; if the consumer stops early, cancel the generation behind it."""
    try:
        yield from stream
    finally:
        stream.cancel()
        worker.join()


def _with_logprobs(result: ChatResult, prepared: _Prepared, decoder: RowDecoder | None, row: int) -> ChatResult:
    """``result`` with its tokens' log-probabilities when the request asked for them (row ``row`` of ``decoder``)."""
    if decoder is None or prepared.params.top_logprobs is None:
        return result
    return dataclasses.replace(result, logprobs=decoder.logprobs[row][: result.completion_tokens])


def _default_steering(profile: UserProfile) -> Steering:
    """The user's stored steering (the old flat ``{objective: weight}`` or the nested form), else
    the inferred weights of the objectives decoding can steer."""
    settings = profile.settings
    if "steer" in settings:
        return parse_steering(settings["steer"], field="settings.steer")
    inferred = settings.get("inferred_steer", {})
    return Steering({k: float(v) for k, v in inferred.items() if k in STEERABLE and v != 0.0})


def _adapter_summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the profile records about the user's adapter (the full record sits beside the adapter)."""
    summary = {"trained_at": meta["trained_at"], "pairs": meta["pairs"], "data_hash": meta["data_hash"]}
    if "bank" in meta:
        return {**summary, "kind": "bank", "bases": meta["bank"]["bases"], "weights": meta["bank"]["weights"]}
    return {**summary, "kind": "lora", "holdout_accuracy": meta["report"]["holdout_accuracy"][-1:]}


def _params(model: type[BaseModel], values: Mapping[str, Any], field: str) -> Any:
    try:
        return model.model_validate(dict(values))
    except pydantic.ValidationError as err:
        raise convert_pydantic_error(field, err) from None


class Personalizer:
    """Per-user personalisation over one generator, one encoder and one store directory.

    A store is held by one open Personalizer at a time (a second opener gets
    ``StoreLockedError``); use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        generator: Generator,
        encoder: Encoder,
        store: str | Path = DEFAULT_STORE,
        memory_client: Any = None,
        max_resident: int = 8,
        embedder: Any = None,
        fspo: str | Path | None = None,
        pplug: str | Path | None = None,
        user_vas: str | Path | None = None,
    ) -> None:
        """``embedder``: the preference embedder behind ``reward``/``predict``/``next_question``: an
        object (e.g. a fitted ``PAL``), a folder written by ``personalign train pal|vpl``, or
        ``None`` for the shipped PAL (fitted on the project's synthetic population only, on templated
        candidates and the embedded generator's own answers).

        ``user_vas``: the folder of user-conditioned value heads (``personalign train user-vas``)
        for this generator and embedder; ``None`` uses the package's ``data/user_vas`` when they fit.

        ``fspo``: the folder of an FSPO adapter (``personalign train fspo``) that requests with
        shots run through; it must be trained for this generator (``AdapterError`` otherwise).
        ``None`` looks in ``$PERSONALIGN_FSPO_DIR``, else the package's ``data/fspo``, and uses
        an adapter there only when it was trained for this generator.

        ``pplug``: the folder of a Persona-Plug projector (``personalign train pplug``) whose soft
        token requests carry; it must match this generator and encoder (``PlugMismatchError``).
        ``None`` looks in ``$PERSONALIGN_PPLUG_DIR``, else the package's ``data/pplug``."""
        self.generator = generator
        self.encoder = encoder
        self.store = UserStore(store, encoder, memory_client)
        self.store_path = self.store.root
        self.profiles = self.store.profiles
        self.memory = self.store.memory
        self.adapters = AdapterManager(generator, self.profiles.users_dir, max_resident=max_resident)
        self.preferences = Preferences(self.profiles, encoder, generator, embedder)
        self.steering = SteeringRuntime(generator, self.adapters)
        self.fspo_folder = self._fspo_folder(fspo)
        self.plug = self._load_plug(pplug)
        self._user_vas_spec = user_vas
        self._user_heads: Any = None  # loaded on first use (they need the embedder)
        self._descriptions: dict[str, tuple[tuple[int, int], str]] = {}
        self._generate_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        encoder: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        store: str | Path = DEFAULT_STORE,
        memory_client: Any = None,
        embedder: Any = None,
        fspo: str | Path | None = None,
        pplug: str | Path | None = None,
        user_vas: str | Path | None = None,
        *,
        torch_dtype: Any = None,
        device_map: str | dict[str, Any] | None = None,
        quantization_config: Any = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool = True,
    ) -> Personalizer:
        """Load models (embedded defaults unless given an HF id or local path) and open ``store``.

        The keyword options go to :func:`~personalign.models.load_generator` as they are
        (``revision`` is the generator's); ``trust_remote_code`` and ``local_files_only`` go to
        :func:`~personalign.models.load_encoder` too. ``local_files_only=False`` lets hub ids
        download; by default only local folders and the Hugging Face cache are used.
        """
        hub = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
        generator = load_generator(
            model, device=device, dtype=dtype, torch_dtype=torch_dtype, device_map=device_map, quantization_config=quantization_config,
            attn_implementation=attn_implementation, revision=revision, **hub,
        )  # fmt: skip
        enc = load_encoder(encoder, device=device, **hub)
        return cls(generator, enc, store, memory_client, embedder=embedder, fspo=fspo, pplug=pplug, user_vas=user_vas)

    def user_heads(self) -> Any:
        """The user-conditioned value heads (``user-vas``) for this generator and embedder, or ``None``.

        From the ``user_vas`` folder given at construction (an error if they do not fit), else the
        package's ``data/user_vas`` when they were trained for this generator and embedder.
        """
        from personalign.steering.uservas import UserHeads, UserHeadsError, default_heads_dir

        if self._user_heads is None:
            embedder, _ = self.preferences.usable_embedder()
            if self._user_vas_spec is not None:
                self._user_heads = UserHeads.load(self._user_vas_spec, self.generator, embedder)
            elif embedder is not None and getattr(embedder, "name", None) == "pal" and default_heads_dir().is_dir():
                try:
                    self._user_heads = UserHeads.load(default_heads_dir(), self.generator, embedder)
                except UserHeadsError:
                    self._user_heads = False  # shipped for another generator or embedder: not used
            else:
                self._user_heads = False
        return self._user_heads or None

    def _load_plug(self, folder: str | Path | None) -> PersonaPlug | None:
        """The Persona-Plug projector to use, or ``None`` when there is none for this generator."""
        dims = (self.generator.model_id, self.encoder.name, input_embedding_dim(self.generator), self.encoder.dim)
        if folder is None:
            default = pplug_dir()
            if not (default / PLUG_CONFIG).is_file() or read_plug_config(default).get("config", {}).get("base_model") != self.generator.model_id:
                return None
            folder = default
        return load_plug(folder, *dims, device=self.generator.device)

    def history_items(self, user: str, profile: UserProfile | None = None) -> list[str]:
        """What Persona-Plug pools for ``user``, oldest first: the preferred responses of their
        comparisons, then their memories."""
        profile = profile if profile is not None else self.profiles.get(user)
        memories = [r["memory"] for r in self.memory.get_all(user)["results"]]
        return [c.chosen for c in profile.comparisons] + memories

    def _fspo_folder(self, folder: str | Path | None) -> Path | None:
        """The FSPO adapter folder to use, or ``None`` when there is none for this generator."""
        if folder is None:
            default = fspo_dir()
            return default if fspo_adapter_meta(default, self.generator.model_id) is not None else None
        folder = Path(folder)
        if not (folder / FSPO_CONFIG).is_file():
            raise AdapterError(f"fspo: {folder} has no {FSPO_CONFIG}. Fix: pass the --out folder of `personalign train fspo`")
        if fspo_adapter_meta(folder, self.generator.model_id) is None:
            trained = json.loads((folder / FSPO_CONFIG).read_text()).get("base_model")
            raise AdapterError(
                f"fspo: the adapter in {folder} was trained for base model {trained!r}, this generator is {self.generator.model_id!r}. "
                f"Fix: train one for it with `personalign train fspo --model {self.generator.model_id}`"
            )
        self.adapters.validate_folder(folder, label="fspo adapter")
        return folder

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store so another process or Personalizer can open it."""
        self.store.close()

    def __enter__(self) -> Personalizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- users -----------------------------------------------------------------------------

    def enroll(
        self,
        user: str,
        comparisons: Sequence[Comparison | dict[str, Any]],
        adapter: bool | LoraBank = False,
        adapter_config: LoraTrainConfig | Mapping[str, Any] | None = None,
    ) -> UserProfile:
        """Add comparisons to ``user`` (created if new). All are validated first; all or nothing is stored.

        With ``adapter=True`` the user's LoRA adapter is then trained (or, if one exists,
        trained further) on all their comparisons; ``chat`` uses it from then on. With
        ``adapter=<LoraBank>`` only the user's weights over the bank's bases are fitted (no
        gradient step on the generator) and the exact weighted sum of the basis deltas becomes
        the user's adapter.
        """
        config = adapter_config if isinstance(adapter_config, LoraTrainConfig) else _params(LoraTrainConfig, adapter_config or {}, "adapter_config")
        validate_user_id(user)
        if isinstance(comparisons, Comparison | dict):
            comparisons = [comparisons]
        parsed = parse_comparisons(comparisons)
        now = time.time()
        stamped = [c.stamped(now) for c in parsed]

        summary: dict[str, Any] | None = None
        if adapter:
            # Train before storing anything: a failed training leaves the profile and the previous adapter as they were.
            existing = self.profiles.get(user).comparisons if self.profiles.exists(user) else []
            with self._generate_lock:
                if isinstance(adapter, LoraBank):
                    meta = self.adapters.install_bank(user, adapter, [*existing, *stamped])
                else:
                    meta = self.adapters.train(user, [*existing, *stamped], config)
            summary = _adapter_summary(meta)

        embedder, embedder_id = self.preferences.usable_embedder()
        # The state is inferred outside the store lock (it runs the encoder), from the profile as
        # read now; if another write to this user lands in between, it is inferred again inside.
        base, state = (-1, -1), None
        if embedder is not None:
            current = self.profiles.get(user) if self.profiles.exists(user) else None
            before = current.comparisons if current is not None else []
            base = (current.version if current is not None else 0, len(before))
            state = self.preferences.infer(embedder, [*before, *stamped])

        def add(profile: UserProfile) -> UserProfile:
            profile.comparisons.extend(stamped)
            # Derived, recomputable from the comparisons: the user's inferred objective weights and preference state.
            profile.settings["inferred_steer"] = infer_weights(profile.comparisons)
            if embedder is not None:
                unchanged = (profile.version, len(profile.comparisons) - len(stamped)) == base
                fresh = state if unchanged and state is not None else self.preferences.infer(embedder, profile.comparisons)
                profile.settings[STATE_KEY] = {"embedder": embedder_id, **fresh.to_dict()}
            if summary is not None:
                profile.settings["adapter"] = summary
            return profile

        return self.profiles.update(user, add)

    def edit_comparisons(self, user: str, remove: Sequence[int] = (), replace: Mapping[int, Comparison | dict[str, Any]] | None = None) -> UserProfile:
        """Remove and/or replace some of ``user``'s stored comparisons (by index, as in
        ``profile(user).comparisons``); the inferred steering and preference state are recomputed
        in the same atomic write, so they never describe comparisons the user has taken back.

        Every index and replacement is validated first; on any error nothing is changed. A user's
        adapter is not retrained (call :meth:`train_adapter`).
        """
        replace = dict(replace or {})
        fresh = dict(zip(replace, parse_comparisons(list(replace.values()), "replace"), strict=True)) if replace else {}
        removed = set(remove)
        if not removed and not fresh:
            raise ValidationError("remove", "and replace are both empty", "name at least one comparison index")
        if removed & set(fresh):
            raise ValidationError("replace", f"indices {sorted(removed & set(fresh))} are also removed", "remove or replace an index, not both")
        embedder, embedder_id = self.preferences.usable_embedder()
        now = time.time()

        def edit(profile: UserProfile) -> UserProfile:
            n = len(profile.comparisons)
            for index in sorted(removed | set(fresh)):
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                    field = "remove" if index in removed else "replace"
                    raise ValidationError(field, f"index {index!r} is not a comparison of {user!r}", f"use indices 0..{n - 1}", index)
            kept = [fresh[i].stamped(now) if i in fresh else c for i, c in enumerate(profile.comparisons) if i not in removed]
            profile.comparisons = kept
            profile.settings["inferred_steer"] = infer_weights(kept)
            if embedder is not None:
                if kept:
                    profile.settings[STATE_KEY] = {"embedder": embedder_id, **self.preferences.infer(embedder, kept).to_dict()}
                else:
                    profile.settings.pop(STATE_KEY, None)
            return profile

        return self.profiles.update(user, edit, create=False)

    def train_adapter(
        self, user: str, adapter_config: LoraTrainConfig | Mapping[str, Any] | None = None, bank: LoraBank | None = None, extra: Sequence[Comparison] = ()
    ) -> UserProfile:
        """(Re)train ``user``'s LoRA adapter on all their stored comparisons (with ``bank``: refit their weights over its bases).

        ``extra``: more comparisons to train on that are not stored in the profile, e.g.
        :meth:`amplified_comparisons` (the user's inferred reward labelling the generator's answers).
        """
        config = adapter_config if isinstance(adapter_config, LoraTrainConfig) else _params(LoraTrainConfig, adapter_config or {}, "adapter_config")
        comparisons = [*self.profiles.get(user).comparisons, *(parse_comparisons(extra, "extra") if extra else [])]
        if not comparisons:
            raise ValidationError("comparisons", f"user {user!r} has none", "enroll comparisons before training an adapter")
        with self._generate_lock:
            meta = self.adapters.install_bank(user, bank, comparisons) if bank is not None else self.adapters.train(user, comparisons, config)

        def note(profile: UserProfile) -> UserProfile:
            profile.settings["adapter"] = _adapter_summary(meta)
            return profile

        return self.profiles.update(user, note, create=False)

    def adapter_folder(self, user: str) -> Path:
        """The PEFT folder of ``user``'s LoRA adapter (loadable by ``AutoPeftModelForCausalLM``, importable
        by :meth:`import_adapter` for another user); ``ValidationError`` when they have none."""
        if not self.adapters.has_adapter(user):
            raise ValidationError("user", f"{user!r} has no adapter", "train one: train_adapter(user) or enroll(..., adapter=True)", user)
        return self.adapters.path(user)

    def adapter_metadata(self, user: str) -> dict[str, Any]:
        """The full record of ``user``'s adapter (``personalign_adapter.json``: pairs, data hash,
        base model, the training report or the bank weights); ``ValidationError`` when they have none."""
        self.adapter_folder(user)  # the typed error when there is none
        return self.adapters.metadata(user)

    def amplified_comparisons(self, user: str, answers: Mapping[str, Sequence[str]], config: AmplifyConfig | Mapping[str, Any] | None = None) -> list[Comparison]:
        """Pairs of the generator's own ``answers`` (per prompt) labelled by ``user``'s inferred reward,
        the clearest first (:func:`~personalign.adapters.amplify.amplify`): training data for
        ``train_adapter(user, extra=...)``. Nothing is stored."""
        from personalign.adapters.amplify import amplify

        config = config if isinstance(config, AmplifyConfig) else _params(AmplifyConfig, config or {}, "config")
        rewards = {prompt: self.reward(user, prompt, list(texts)) for prompt, texts in answers.items()}
        return amplify(answers, rewards, config)

    def import_adapter(self, user: str, folder: str | Path) -> UserProfile:
        """Use a LoRA trained elsewhere (a PEFT folder for this base model) as ``user``'s adapter.

        It is validated first (files, base model, rank, target modules, a trial load); on any
        problem ``AdapterError`` is raised and the user's previous adapter stays in use.
        """
        profile = self.profiles.get(user)
        with self._generate_lock:
            meta = self.adapters.install(user, folder, profile.comparisons)

        def note(p: UserProfile) -> UserProfile:
            p.settings["adapter"] = {"trained_at": meta["trained_at"], "pairs": meta["pairs"], "data_hash": meta["data_hash"], "kind": "imported"}
            return p

        return self.profiles.update(user, note, create=False)

    def profile(self, user: str) -> UserProfile:
        """The stored profile (``UnknownUserError`` if the user was never enrolled)."""
        return self.profiles.get(user)

    def set_steering(self, user: str, steer: Mapping[str, Any] | Steering | None) -> UserProfile:
        """Store ``user``'s default steering, in any form ``parse_steering`` reads (``None`` clears
        it, falling back to the inferred weights). It is saved as ``Steering.to_json()``."""
        clean = parse_steering(steer).to_json() if steer is not None else None

        def apply(profile: UserProfile) -> UserProfile:
            if clean is None:
                profile.settings.pop("steer", None)
            else:
                profile.settings["steer"] = clean
            return profile

        return self.profiles.update(user, apply, create=False)

    def default_steer(self, user: str | None) -> dict[str, float]:
        """The steering applied when a request gives none: the user's stored setting, else the
        weights inferred from their comparisons (steerable objectives only), else nothing."""
        return {} if user is None else _default_steering(self.profiles.get(user)).weights

    def users(self) -> list[str]:
        return self.profiles.list_users()

    def forget(self, user: str) -> dict[str, int | bool]:
        """Remove every trace of ``user``: memories (collection dropped, database vacuumed) and files."""
        with self._generate_lock:
            self.adapters.unload(user)
        self._descriptions.pop(user, None)
        return self.store.forget(user)

    # --- preferences: reward, predict, next question (see personalign/preferences.py) -----------

    @property
    def embedder(self) -> Any:
        """The preference embedder behind :meth:`reward`, :meth:`predict` and :meth:`next_question`."""
        return self.preferences.embedder

    def state(self, user: str) -> Any:
        """``user``'s :class:`~personalign.persona.base.UserState` under the current embedder.

        The state stored at enrollment is used when it was made by this embedder; otherwise it
        is inferred from the stored comparisons (not written back). A user without comparisons
        has the embedder's prior. A stored state that is corrupt (NaN, wrong shape) raises
        ``ValidationError`` naming ``settings.state``; call :meth:`refresh_state` to rebuild it.
        """
        return self.preferences.state(user)

    def refresh_state(self, user: str) -> Any:
        """Re-infer ``user``'s state from their stored comparisons and store it (replacing a corrupt one)."""
        return self.preferences.refresh_state(user)

    def reward(self, user: str, prompt: str, responses: Sequence[str]) -> list[float]:
        """The user's reward of each response to ``prompt`` (higher = more to their taste; comparable within a user)."""
        return self.preferences.reward(user, prompt, responses)

    def predict(self, user: str, prompt: str, a: str, b: str) -> float:
        """Probability that ``user`` prefers response ``a`` over ``b`` for ``prompt``."""
        return self.preferences.predict(user, prompt, a, b)

    def next_question(self, user: str, candidates: Sequence[Any], top_k: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """Rank candidate comparisons by how much ``user``'s answer would teach about them.

        ``candidates``: ``{"prompt", "a", "b"}`` mappings or ``(prompt, a, b)`` tuples. Returns
        them best first, each with ``gain`` (expected information gain in nats about the user's
        state, at most ln 2), ``p_a`` (the current probability they pick ``a``) and ``index``. A
        user not enrolled yet is ranked under the embedder's prior (cold start); nothing is stored.
        """
        return self.preferences.next_question(user, candidates, top_k=top_k, seed=seed)

    # --- memory ----------------------------------------------------------------------------

    def remember(
        self,
        user: str,
        text: str | list[str],
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        on_conflict: str = "keep",
        source: str = "python",
    ) -> dict[str, Any]:
        """Store fact(s) about ``user`` (creating the user if new); returns mem0-shaped results.

        A re-stated fact is not stored twice (``event: "NONE"``). With ``key`` (a short identifier
        such as ``"home_city"``) the new memory supersedes the user's active memory with that key
        (reported as ``event: "DELETE"``, ``status: "superseded"``; it stays in :meth:`memory_history`).
        Without a key, close active memories are listed in ``conflicts``; ``on_conflict="supersede"``
        supersedes them. See :mod:`personalign.memory.lifecycle` and ``docs/memory.md``.
        """
        return self.store.remember(user, text, metadata, key=key, on_conflict=on_conflict, source=source)

    def memories(self, user: str, filters: Mapping[str, Any] | None = None, status: str = "active", limit: int | None = None) -> dict[str, Any]:
        """The user's memories, oldest first: active ones (``status="superseded"`` or ``"all"`` for
        the others), narrowed by metadata ``filters`` (see :mod:`personalign.memory.filters`)."""
        return self.store.memories.list(user, filters=filters, status=status, limit=limit)

    def search_memories(
        self, user: str, query: str, top_k: int = 5, threshold: float | None = None, filters: Mapping[str, Any] | None = None, status: str = "active"
    ) -> dict[str, Any]:
        """The user's memories closest in meaning to ``query``, best first (active ones by default)."""
        return self.store.memories.search(user, query, top_k=top_k, threshold=threshold, filters=filters, status=status)

    def get_memory(self, user: str, memory_id: str) -> dict[str, Any]:
        """One memory of ``user`` by id, any status (``UnknownMemoryError``, a ``KeyError``, if they have none)."""
        return self.store.memories.get(user, memory_id)

    def update_memory(self, user: str, memory_id: str, text: str, metadata: Mapping[str, Any] | None = None, source: str = "python") -> dict[str, Any]:
        """Replace a memory's text (and metadata, when given), keeping its id and key; the previous
        text stays in :meth:`memory_history`. ``UnknownMemoryError`` for an id ``user`` does not have."""
        return self.store.memories.update(user, memory_id, text, metadata=metadata, source=source)

    def memory_history(self, user: str, memory_id: str) -> dict[str, Any]:
        """Every version of a memory, oldest first, with its time (``valid_from``/``valid_to``) and source."""
        return self.store.memories.history(user, memory_id)

    def delete_memory(self, user: str, memory_id: str) -> bool:
        """Delete a memory and its earlier versions. False if ``user`` has no memory with that id."""
        return self.memory.delete(user, memory_id)

    def export(self, user: str) -> dict[str, Any]:
        """Everything stored about ``user`` as one JSON-ready document: comparisons, memories with
        their history, the inferred state and steering, adapter metadata and the files on disk
        (see :mod:`personalign.memory.export`). ``UnknownUserError`` if nothing is stored."""
        from personalign.memory.export import export_user

        def adapter_meta(u: str) -> dict[str, Any] | None:
            return self.adapters.metadata(u) if self.adapters.has_adapter(u) else None

        return export_user(user, self.profiles, self.store.memories, adapter_meta, self.default_steer)

    # --- generation ------------------------------------------------------------------------

    def condition(
        self,
        user: str | None,
        messages: Sequence[ChatMessage | dict[str, Any]],
        max_new_tokens: int,
        conditioning: ConditioningParams,
        profile: UserProfile | None = None,
    ) -> Conditioning:
        """The prompt for ``user``: retrieved memories and FSPO shots around ``messages``, fitted to context.

        ``profile`` is the user's profile when the caller has already read it.
        """
        parsed = parse_messages(messages)
        memories: list[str] = []
        shots: list[Shot] = []
        if user is not None:
            if profile is None:
                profile = self.profiles.get(user)  # validates the id; UnknownUserError if absent
            query = query_of(parsed)
            # The search reads at most a memory's length of the message; an empty message retrieves nothing.
            search = query[:MAX_MEMORY_CHARS]
            if conditioning.memory and conditioning.n_memories and search.strip():
                found = self.memory.search(user, search, top_k=conditioning.n_memories, threshold=conditioning.memory_threshold)
                memories = [r["memory"] for r in found["results"]]
            if conditioning.shots and conditioning.n_shots:
                shots = rank_shots(profile.comparisons, query, self.encoder, conditioning.n_shots)
        tokenizer = self.generator.tokenizer
        return fit_to_context(tokenizer, parsed, shots, memories, self.generator.context_length, max_new_tokens)

    def describe(self, user: str, n_shots: int = 4, profile: UserProfile | None = None, max_new_tokens: int = 48) -> str:
        """A one-line description of what ``user`` prefers, written by the generator from their
        ``n_shots`` most recent comparisons (FSPO's user-description step; greedy).

        Cached per user until their comparisons change.
        """
        profile = profile if profile is not None else self.profiles.get(user)
        key = (profile.version, len(profile.comparisons))
        cached = self._descriptions.get(user)
        if cached is not None and cached[0] == key:
            return cached[1]
        shots = [Shot(c, 1.0) for c in profile.comparisons[-n_shots:]]
        conversation = describe_conversation(shots)
        tokens = count_prompt_tokens(self.generator.tokenizer, conversation)
        while len(shots) > 1 and tokens + max_new_tokens > self.generator.context_length:
            shots = shots[1:]
            conversation = describe_conversation(shots)
            tokens = count_prompt_tokens(self.generator.tokenizer, conversation)
        text = first_sentence(self.respond(None, conversation, max_new_tokens=max_new_tokens, temperature=0.0).text)
        self._descriptions[user] = (key, text)
        return text

    def _prepare(self, user: str | None, messages: Any, steer: Mapping[str, Any] | Steering | None, options: Mapping[str, Any]) -> _Prepared:
        gen_fields = set(GenerationParams.model_fields)
        cond_fields = set(ConditioningParams.model_fields)
        unknown = set(options) - gen_fields - cond_fields
        if unknown:
            name = sorted(unknown)[0]
            raise ValidationError(name, "is not a chat option", f"use one of {sorted(gen_fields | cond_fields)}")
        params = _params(GenerationParams, {k: v for k, v in options.items() if k in gen_fields}, "generation")
        self._check_decoding(params)
        conditioning = _params(ConditioningParams, {k: v for k, v in options.items() if k in cond_fields}, "conditioning")
        profile = self.profiles.get(user) if user is not None else None  # read once per request
        cond = self.condition(user, messages, params.max_new_tokens, conditioning, profile)
        if steer is not None:
            applied = parse_steering(steer)
        else:
            applied = Steering({}) if profile is None else _default_steering(profile)
        method = self.steering.method(applied.method, applied.weights)
        conversation = cond.conversation
        description = None
        if conditioning.describe and profile is not None and profile.comparisons:
            description = self.describe(user, conditioning.n_shots or 4, profile)  # type: ignore[arg-type]
            conversation = with_description(conversation, description)
        if method is not None:  # prompt-level methods (prompt, dpa) write the steering into the conversation
            conversation = STEERING_METHODS[method].conversation(conversation, applied.weights, self.generator.model_id)
        encoded = self.generator.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        use_adapter = user is not None and conditioning.adapter and self.adapters.has_adapter(user)
        adapter_user = user if use_adapter else None
        query = query_of(parse_messages(messages))
        plug = None
        if conditioning.pplug and self.plug is not None and profile is not None:
            items = self.history_items(user, profile)  # type: ignore[arg-type]
            if items:
                plug = embed_user(self.plug, self.encoder, items, query)
        fspo = bool(cond.shots) and conditioning.fspo and adapter_user is None and self.fspo_folder is not None and not (method is not None and STEERING_METHODS[method].runs_adapter)
        rerank, guidance = conditioning.rerank if conditioning.rerank >= 2 else 0, None
        if rerank and profile is None:
            rerank, guidance = 0, rerank_method.skipped("no user: the generic answer")
        elif rerank and not profile.comparisons:  # type: ignore[union-attr]
            rerank, guidance = 0, rerank_method.skipped("the user has no comparisons, so no inferred reward: the plain answer")
        elif rerank:
            self.preferences.state_of(profile, *self.preferences.embedder_and_id())  # type: ignore[arg-type]  # a corrupt state fails here, before any decoding
        guide, vas_report = self._user_guide(profile, conditioning.user_vas)
        if vas_report is not None:
            guidance = vas_report if guidance is None else {**guidance, "user_vas": vas_report}
        return _Prepared(
            user,
            cond,
            params,
            applied.weights,
            list(encoded["input_ids"]),
            adapter_user,
            steer_method=method or applied.method,
            fspo=fspo,
            description=description,
            plug=plug,
            query=query,
            rerank=rerank,
            rerank_temperature=conditioning.rerank_temperature,
            personalization=guidance,
            guide=guide,
        )

    def _user_guide(self, profile: UserProfile | None, strength: float | None) -> tuple[list[float] | None, dict[str, Any] | None]:
        """``user-vas`` for one request: per-head strengths and the report, or ``(None, why not)``."""
        from personalign.steering.uservas import METHOD, mixture

        if strength == 0.0:
            return None, None
        heads = self.user_heads() if profile is not None or strength is not None else None
        if heads is None:
            if strength is not None:
                raise ValidationError(
                    "user_vas", "needs user-vas heads for this generator and embedder", "train them: personalign train user-vas --out DIR, then Personalizer(user_vas=DIR)", strength
                )
            return None, None
        if profile is None or not profile.comparisons:
            if not strength:
                return None, None
            reason = "no user: the generic answer" if profile is None else "the user has no comparisons: the plain answer"
            return None, rerank_method.skipped(reason, requested=METHOD)
        state = self.preferences.state_of(profile, *self.preferences.embedder_and_id())
        betas = heads.betas(state, strength)
        report = {"method": METHOD, "strength": heads.default_beta if strength is None else strength, "weights": [round(float(w), 4) for w in mixture(state)], "heads": heads.fingerprint}
        return betas, report

    def _vocab_size(self) -> int:
        """The width of the generator's logits (may exceed the tokenizer's length)."""
        return int(getattr(self.generator.model.config, "vocab_size", None) or len(self.generator.tokenizer))

    def _grammar(self, spec: Mapping[str, Any] | None) -> Any:
        """The compiled grammar for a request's ``grammar`` (cached by its JSON text), or ``None``."""
        if spec is None:
            return None
        key = json.dumps(spec, sort_keys=True)
        cache = self.__dict__.setdefault("_grammars", {})
        if key not in cache:
            if len(cache) >= 64:
                cache.pop(next(iter(cache)))
            cache[key] = compile_grammar(self.generator.tokenizer, self._vocab_size(), spec, "grammar")
        return cache[key]

    def _check_decoding(self, params: GenerationParams) -> None:
        """Token ids in ``logit_bias`` exist and the ``grammar`` compiles (before anything is generated)."""
        vocab = self._vocab_size()
        for token in params.logit_bias or {}:
            if not 0 <= token < vocab:
                raise ValidationError(f"logit_bias.{token}", f"is not a token id of this model (0 to {vocab - 1})", "use ids from the model's tokenizer", token)
        self._grammar(params.grammar)

    def _row_decoder(self, batch: Sequence[_Prepared], plan: Plan, prompt_width: int) -> RowDecoder | None:
        """Per-row sampling and OpenAI's controls for a batch that needs them (``None``: every row is plain greedy)."""
        controls = [p.params.row_controls(self._grammar(p.params.grammar)) for p in batch]
        if all(c.plain for c in controls):
            return None
        if plan.greedy:  # logit mixing: SteeringProcessor picks each group's token, with the global RNG
            for c, p in zip(controls, batch, strict=True):
                extra = c.logit_bias or c.presence_penalty or c.frequency_penalty or c.top_logprobs is not None or c.grammar is not None
                if extra:
                    fix = "steer with another method, or leave out logit_bias, penalties, logprobs and response_format"
                    raise ValidationError("steer", f"logit-mixing steering ({p.steer_method}) cannot be combined with OpenAI's decoding controls", fix)
            return None
        return RowDecoder(controls, prompt_width, eos_token_ids(self.generator.tokenizer, self.generator.model.generation_config))

    def _generate_kwargs(self, batch: Sequence[_Prepared], plan: Plan) -> dict[str, Any]:
        """The planned rows, the batch's decoding settings and the steering processors."""
        first = batch[0].params.model_copy(update={"max_new_tokens": max(p.params.max_new_tokens for p in batch)})
        kwargs: dict[str, Any] = {"input_ids": plan.input_ids.to(self.generator.device), "attention_mask": plan.attention_mask.to(self.generator.device)}
        kwargs.update(first.generate_kwargs(self.generator.tokenizer.pad_token_id))
        if plan.greedy:
            # The steering processor picks each group's token (sampling included) and forces it.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if plan.processors:
            kwargs["logits_processor"] = plan.processors
        if any(p.plug is not None for p in batch):
            # Each row's soft token before its first prompt token; rows without one get a masked
            # column instead and decode exactly as without it. ``input_ids`` keeps the same layout
            # so logits processors see the prompt and the output slicing is unchanged.
            softs = [batch[i].plug for i in plan.owner]
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            kwargs["inputs_embeds"], kwargs["attention_mask"] = plug_inputs(self.generator.model, ids, mask, softs)
            kwargs["input_ids"] = plug_input_ids(ids, mask, softs)
        # after the plug column, so the decoder's prompt width is what logits processors see
        decoder = self._row_decoder(batch, plan, kwargs["input_ids"].shape[1])
        if decoder is not None:  # it chooses every row's token; generate takes it greedily
            from transformers import LogitsProcessorList

            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            kwargs["logits_processor"] = LogitsProcessorList([*plan.processors, decoder])
        return kwargs

    def _plan(self, batch: Sequence[_Prepared]) -> Plan:
        """Rows, adapter names and steering for one ``generate`` call (caller holds the generate lock)."""
        names = self.adapters.adapter_names([p.adapter_user for p in batch])
        if any(p.fspo for p in batch):
            fspo = self.steering._adapter(FSPO_ADAPTER, self.fspo_folder, "fspo")  # type: ignore[arg-type]  # loaded once
            names = [fspo if p.fspo else (names[i] if names is not None else BASE) for i, p in enumerate(batch)]
        guides = [p.guide for p in batch]
        heads = self.user_heads() if any(g is not None for g in guides) else None
        return self.steering.plan(
            [p.input_ids for p in batch],
            names,
            [(p.steer, p.steer_method) for p in batch],
            [p.params.temperature for p in batch],
            [p.params.top_p for p in batch],
            self.generator.tokenizer.pad_token_id,
            guides=guides if heads is not None else None,
            guide_models=heads.heads if heads is not None else (),
        )

    def _generate(self, names: list[str] | None, kwargs: dict[str, Any], streamer: Any = None) -> Any:
        """``generate`` with each row's adapter (caller holds the generate lock).

        With no adapter resident the model is the plain base model. Otherwise rows without an
        adapter run with adapters disabled, which computes exactly the base layers.
        """
        extra = {"streamer": streamer} if streamer is not None else {}
        if names is None:
            return self.generator.model.generate(**kwargs, **extra)
        peft = self.adapters.peft
        if all(n == BASE for n in names):
            with peft.disable_adapter():
                return peft.generate(**kwargs, **extra)
        if supports_gathered(peft, names):
            # One gathered matmul pair per LoRA layer for all rows, whatever the mix of users.
            with peft.disable_adapter(), gathered_lora(peft, names):
                return peft.generate(**kwargs, **extra)
        return peft.generate(**kwargs, adapter_names=names, **extra)

    def _result(self, prepared: _Prepared, new_tokens: list[int], stops: set[int]) -> ChatResult:
        """A row's reply from its generated tokens (cut at its own limit and first end-of-sequence)."""
        new_tokens = new_tokens[: prepared.params.max_new_tokens]
        end = next((i + 1 for i, t in enumerate(new_tokens) if t in stops), len(new_tokens))
        new_tokens = new_tokens[:end]
        text = self.generator.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        cond = prepared.conditioning
        return ChatResult(text, prepared.user, cond.memories, cond.shots, prepared.steer, cond.prompt_tokens, len(new_tokens), prepared.description, prepared.personalization)

    def _run(self, batch: Sequence[_Prepared], streams: Sequence[TokenStream | None] | None = None) -> list[ChatResult]:
        import torch
        from transformers import StoppingCriteriaList

        stops = set(eos_token_ids(self.generator.tokenizer, self.generator.model.generation_config))
        seed = next((p.params.seed for p in batch if p.params.seed is not None), None)  # only logit mixing samples with the global RNG
        try:
            with self._generate_lock, torch.inference_mode():
                plan = self._plan(batch)
                kwargs = self._generate_kwargs(batch, plan)
                decoder = next((p for p in kwargs.get("logits_processor", []) if isinstance(p, RowDecoder)), None)
                streamer = None
                if streams is not None and any(s is not None for s in streams):
                    primary = set(plan.primary)
                    row_streams = [streams[i] if r in primary else None for r, i in enumerate(plan.owner)]
                    limits = [batch[i].params.max_new_tokens for i in plan.owner]

                    def finalize(r: int, tokens: list[int]) -> ChatResult:
                        return _with_logprobs(self._result(batch[plan.owner[r]], tokens, stops), batch[plan.owner[r]], decoder, r)

                    streamer = BatchStreamer(self.generator.tokenizer, row_streams, limits, stops, finalize)
                    # a cancelled request stops all of its rows
                    kwargs["stopping_criteria"] = StoppingCriteriaList([CancelledRows([streams[i] for i in plan.owner])])
                if seed is not None and decoder is None:
                    torch.manual_seed(seed)
                try:
                    output = self._generate(plan.names, kwargs, streamer)
                finally:
                    for hook in (plan.capture, plan.mixer):
                        if hook is not None:
                            hook.close()
        except BaseException as err:
            for stream in streams or []:
                if stream is not None:
                    stream.fail(err)
            raise
        width = kwargs["input_ids"].shape[1]
        results = [self._result(prepared, output[row, width:].tolist(), stops) for row, prepared in zip(plan.primary, batch, strict=True)]
        results = [_with_logprobs(r, p, decoder, i) for i, (r, p) in enumerate(zip(results, batch, strict=True))]
        for stream, result in zip(streams or [], results, strict=False):
            if stream is not None:
                stream.finish(result)  # rows the streamer has not closed (a no-op for the others)
        return results

    def respond(
        self, user: str | None, messages: Sequence[ChatMessage | dict[str, Any]], steer: Mapping[str, Any] | Steering | None = None, **options: Any
    ) -> ChatResult:
        """Generate a reply for ``user`` (``None``: generic) with what conditioned it.

        ``steer``: this request's steering, ``{objective: weight}`` or a nested form
        (``{"weights"|"direction": {...}, "method": ...}``, ``{"angle": deg, "objectives": [a, b]}``,
        see :func:`personalign.steering.schema.parse_steering`); ``None`` uses the user's default
        (see :meth:`default_steer`), ``{}`` turns steering off. Options: generation
        (``max_new_tokens``, ``temperature``, ``top_p``, ``repetition_penalty``, ``seed``) and
        conditioning (``memory``, ``shots``, ``n_memories``, ``n_shots``, ``memory_threshold``).
        """
        prepared = self._prepare(user, messages, steer, options)
        return self._run_prepared([prepared], [None])[0]

    def respond_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[ChatResult]:
        """Replies for several requests, generated together: one ``generate`` call per group of
        requests with the same sampling settings (greedy requests always share one).

        Each request is a mapping with ``user``, ``messages`` and optionally ``steer`` and any
        option of :meth:`respond`. Every request is validated before anything is generated.
        Under greedy decoding each reply equals what :meth:`respond` gives for that request alone
        (up to floating-point ties from padding). Results come back in request order.
        """
        if not requests:
            raise ValidationError("requests", "is empty", "pass at least one request")
        prepared, streams = [], []
        for index, request in enumerate(requests):
            if not isinstance(request, Mapping) or "messages" not in request:
                raise ValidationError(f"requests[{index}]", "must be a mapping with 'messages'", "pass {'user': ..., 'messages': [...]}", request)
            stream = request.get("stream")
            if stream is not None and not isinstance(stream, TokenStream):
                raise ValidationError(f"requests[{index}].stream", "is not a TokenStream", "pass personalign.streaming.TokenStream() or leave it out")
            options = {k: v for k, v in request.items() if k not in ("user", "messages", "steer", "stream")}
            prepared.append(self._prepare(request.get("user"), request["messages"], request.get("steer"), options))
            streams.append(stream)
        return self._run_prepared(prepared, streams)

    def _run_prepared(self, prepared: Sequence[_Prepared], streams: Sequence[TokenStream | None]) -> list[ChatResult]:
        """Generate validated requests: one ``generate`` call per group of equal sampling settings.

        A request with ``rerank=N`` becomes N sampled rows (at ``rerank_temperature`` when it is
        greedy); the user's reward picks one (:mod:`personalign.steering.rerank`), and its stream,
        if any, gets the picked reply whole.
        """
        rows: list[_Prepared] = []
        owner: list[int] = []
        for index, item in enumerate(prepared):
            if item.rerank:
                params = item.params if item.params.temperature > 0 else item.params.model_copy(update={"temperature": item.rerank_temperature})
                seeds = [None if params.seed is None else derived_seed(params.seed, j) for j in range(item.rerank)]  # distinct candidates
                rows += [dataclasses.replace(item, params=params.model_copy(update={"seed": seed})) for seed in seeds]
                owner += [index] * item.rerank
            else:
                rows.append(item)
                owner.append(index)
        row_streams = [None if prepared[i].rerank else streams[i] for i in owner]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for row, item in enumerate(rows):
            groups.setdefault(item.params.batch_key(), []).append(row)
        outputs: list[ChatResult | None] = [None] * len(rows)
        for group in groups.values():
            for row, result in zip(group, self._run([rows[r] for r in group], [row_streams[r] for r in group]), strict=True):
                outputs[row] = result
        mine: dict[int, list[ChatResult]] = {}
        for row, index in enumerate(owner):
            mine.setdefault(index, []).append(outputs[row])  # type: ignore[arg-type]
        return [self._rerank(item, mine[i], streams[i]) if item.rerank else mine[i][0] for i, item in enumerate(prepared)]

    def _rerank(self, item: _Prepared, candidates: Sequence[ChatResult], stream: TokenStream | None) -> ChatResult:
        """The candidate the user's reward scores highest, with the scores in ``personalization``."""
        texts = [c.text for c in candidates]
        _, embedder_id = self.preferences.embedder_and_id()
        scored = [i for i, t in enumerate(texts) if t.strip()]  # an empty reply (the model ended at once) is never picked over a real one
        scores = [-math.inf] * len(texts)
        if scored:
            for i, s in zip(scored, self.preferences.reward(item.user, item.query or "?", [texts[i] for i in scored]), strict=True):  # type: ignore[arg-type]
                scores[i] = s
        best = rerank_method.pick(scores)
        temperature = item.params.temperature if item.params.temperature > 0 else item.rerank_temperature
        chosen = dataclasses.replace(candidates[best], personalization=rerank_method.report(len(texts), scores, best, embedder_id, temperature))
        if stream is not None:
            if chosen.text:
                stream.put(chosen.text)
            stream.finish(chosen)
        return chosen

    def complete_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[ChatResult]:
        """Raw-text continuations (OpenAI's legacy completions): no chat template, user, memories or steering.

        Each request is ``{"prompt": str, **generation options}`` (see :meth:`respond`), optionally
        with a ``stream`` (:class:`TokenStream`); all are validated before anything is generated
        (:meth:`check_completions` does only that), and rows share ``generate`` calls as in :meth:`respond_batch`.
        """
        prepared, streams = self._prepare_completions(requests)
        return self._run_prepared(prepared, streams)

    def check_completions(self, requests: Sequence[Mapping[str, Any]]) -> None:
        """Raise what :meth:`complete_batch` would reject these requests with, generating nothing."""
        self._prepare_completions(requests)

    def _prepare_completions(self, requests: Sequence[Mapping[str, Any]]) -> tuple[list[_Prepared], list[TokenStream | None]]:
        if not requests:
            raise ValidationError("requests", "is empty", "pass at least one request")
        gen_fields = set(GenerationParams.model_fields)
        prepared, streams = [], []
        for index, request in enumerate(requests):
            prompt = request.get("prompt") if isinstance(request, Mapping) else None
            if not isinstance(prompt, str) or not prompt:
                raise ValidationError(f"prompt[{index}]", "must be non-empty text", "send the text to continue", prompt)
            unknown = set(request) - gen_fields - {"prompt", "stream"}
            if unknown:
                raise ValidationError(sorted(unknown)[0], "is not a completion option", f"use one of {sorted(gen_fields)}")
            stream = request.get("stream")
            if stream is not None and not isinstance(stream, TokenStream):
                raise ValidationError(f"requests[{index}].stream", "is not a TokenStream", "pass personalign.streaming.TokenStream() or leave it out")
            params = _params(GenerationParams, {k: v for k, v in request.items() if k not in ("prompt", "stream")}, "generation")
            self._check_decoding(params)
            ids = self.generator.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) + params.max_new_tokens > self.generator.context_length:
                raise ContextLengthError(
                    f"prompt[{index}] has {len(ids)} tokens and asks for {params.max_new_tokens} more, over the model's context of "
                    f"{self.generator.context_length}. Fix: shorten the prompt or lower max_tokens"
                )
            prepared.append(_Prepared(None, Conditioning([], [], [], len(ids)), params, {}, list(ids)))
            streams.append(stream)
        return prepared, streams

    def chat_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[str]:
        """The reply texts for several requests generated together (see :meth:`respond_batch`)."""
        return [result.text for result in self.respond_batch(requests)]

    def chat(
        self,
        user: str | None,
        messages: Sequence[ChatMessage | dict[str, Any]],
        steer: Mapping[str, Any] | Steering | None = None,
        stream: bool = False,
        **options: Any,
    ) -> Any:
        """The reply text for ``user``; with ``stream=True`` an iterator of text pieces instead."""
        if stream:
            return self.stream(user, messages, steer=steer, **options)
        return self.respond(user, messages, steer=steer, **options).text

    def stream(
        self, user: str | None, messages: Sequence[ChatMessage | dict[str, Any]], steer: Mapping[str, Any] | Steering | None = None, **options: Any
    ) -> Iterator[str]:
        """An iterator over the reply as it is generated (same tokens as :meth:`respond`).

        Input is validated here, before the iterator is returned. Closing the iterator early
        stops the generation.
        """
        prepared = self._prepare(user, messages, steer, options)
        stream = TokenStream()
        worker = threading.Thread(target=self._run_quietly, args=([prepared], [stream]), daemon=True)
        worker.start()
        return _consume(stream, worker)

    def _run_quietly(self, batch: Sequence[_Prepared], streams: Sequence[TokenStream | None]) -> None:
        try:
            self._run_prepared(batch, streams)
        except BaseException as err:  # the error reaches the consumer through its stream
            for stream in streams:
                if stream is not None:
                    stream.fail(err)  # a no-op for streams already finished
