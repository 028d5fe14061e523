"""The facade chat apps use: enroll users, remember facts, chat with personalisation, forget.

pz = Personalizer.load()                           # embedded models, store in ./.personalign
pz.enroll("alice", [Comparison(prompt=..., chosen=..., rejected=...)])
pz.remember("alice", "I am vegetarian and I cook for two.")
pz.chat("alice", [{"role": "user", "content": "Plan my dinner."}])
pz.forget("alice")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from personalign import profile_edits, user_conditioning
from personalign.adapters.amplify import AmplifyConfig
from personalign.adapters.bank import LoraBank
from personalign.adapters.lora import LoraTrainConfig
from personalign.adapters.store import AdapterManager
from personalign.backends import LocalBackend
from personalign.chat import ChatResult, ConditioningParams, GenerationParams, Prepared, validated  # noqa: F401 (re-exported)
from personalign.conditioning.fspo import Conditioning
from personalign.engine import GenerationEngine, _consume, _default_steering
from personalign.errors import ValidationError
from personalign.memory.store import UserStore
from personalign.models import Encoder, Generator, load_encoder, load_generator
from personalign.preference.service import Preferences
from personalign.profile_edits import _adapter_summary  # noqa: F401 (re-exported)
from personalign.steering.runtime import SteeringRuntime
from personalign.steering.schema import Steering, parse_steering
from personalign.streaming import TokenStream
from personalign.types import ChatMessage, Comparison, UserProfile

DEFAULT_STORE = ".personalign"


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
        profiles_url: str | None = None,
        backend: Any = None,
    ) -> None:
        """``backend``: where prompts decode (:mod:`personalign.backends`): ``None`` for Hugging Face
        ``generate`` in this process, or a :class:`~personalign.backends.remote.RemoteEngine`
        (llama.cpp server, vLLM); personalisation (memories, shots, the user's state, prompt-level
        steering, reranking) stays here either way.

        ``profiles_url``: keep profiles in this database (``sqlite:///path.db`` or
        ``postgresql://...``) instead of JSON files; with ``memory_client`` too, the store is
        shared and several processes may open it (docs/scaling.md).

        ``embedder``: the preference embedder behind ``reward``/``predict``/``next_question``: an
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
        self.store = UserStore(store, encoder, memory_client, profiles_url)
        self.store_path = self.store.root
        self.profiles = self.store.profiles
        self.memory = self.store.memory
        self.adapters = AdapterManager(generator, self.profiles.users_dir, max_resident=max_resident)
        self.preferences = Preferences(self.profiles, encoder, generator, embedder)
        self.steering = SteeringRuntime(generator, self.adapters)
        self.fspo_folder = user_conditioning.installed_fspo(self, fspo)
        self.plug = user_conditioning.installed_plug(self, pplug)
        self._user_vas_spec = user_vas
        self._user_heads: Any = None  # loaded on first use (they need the embedder)
        self._descriptions: dict[str, tuple[tuple[float, int, int], str]] = {}
        self._adapter_seen: dict[str, Any] = {}  # user -> profile's adapter note when last read here
        self._generate_lock = threading.Lock()
        self.backend = backend if backend is not None else LocalBackend()
        self.engine = GenerationEngine(self)  # prepares, batches and decodes requests (personalign.engine)

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
        profiles_url: str | None = None,
        backend: Any = None,
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
        return cls(
            generator, enc, store, memory_client, embedder=embedder, fspo=fspo, pplug=pplug, user_vas=user_vas,
            profiles_url=profiles_url, backend=backend,
        )  # fmt: skip

    def user_heads(self) -> Any:
        """The user-conditioned value heads (``user-vas``) for this generator and embedder, or ``None``.

        From the ``user_vas`` folder given at construction (an error if they do not fit), else the
        package's ``data/user_vas`` when they were trained for this generator and embedder.
        """
        return user_conditioning.user_heads(self)

    def history_items(self, user: str, profile: UserProfile | None = None) -> list[str]:
        """What Persona-Plug pools for ``user``, oldest first: the preferred responses of their
        comparisons, then their memories."""
        return user_conditioning.history_items(self, user, profile)

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store so another process or Personalizer can open it (and the backend's engine)."""
        self.backend.close()
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
        return profile_edits.enroll(self, user, comparisons, adapter, adapter_config)

    def edit_comparisons(
        self,
        user: str,
        remove: Sequence[int] = (),
        replace: Mapping[int, Comparison | dict[str, Any]] | None = None,
    ) -> UserProfile:
        """Remove and/or replace some of ``user``'s stored comparisons (by index, as in
        ``profile(user).comparisons``); the inferred steering and preference state are recomputed
        in the same atomic write, so they never describe comparisons the user has taken back.

        Every index and replacement is validated first; on any error nothing is changed. A user's
        adapter is not retrained (call :meth:`train_adapter`).
        """
        return profile_edits.edit_comparisons(self, user, remove, replace)

    def train_adapter(
        self,
        user: str,
        adapter_config: LoraTrainConfig | Mapping[str, Any] | None = None,
        bank: LoraBank | None = None,
        extra: Sequence[Comparison] = (),
    ) -> UserProfile:
        """(Re)train ``user``'s LoRA adapter on all their stored comparisons (with ``bank``: refit their weights over its bases).

        ``extra``: more comparisons to train on that are not stored in the profile, e.g.
        :meth:`amplified_comparisons` (the user's inferred reward labelling the generator's answers).
        """
        return profile_edits.train_adapter(self, user, adapter_config, bank, extra)

    def adapter_folder(self, user: str) -> Path:
        """The PEFT folder of ``user``'s LoRA adapter (loadable by ``AutoPeftModelForCausalLM``, importable
        by :meth:`import_adapter` for another user); ``ValidationError`` when they have none."""
        if not self.adapters.has_adapter(user):
            raise ValidationError(
                "user",
                f"{user!r} has no adapter",
                "train one: train_adapter(user) or enroll(..., adapter=True)",
                user,
            )
        return self.adapters.path(user)

    def adapter_metadata(self, user: str) -> dict[str, Any]:
        """The full record of ``user``'s adapter (``personalign_adapter.json``: pairs, data hash,
        base model, the training report or the bank weights); ``ValidationError`` when they have none."""
        self.adapter_folder(user)  # the typed error when there is none
        return self.adapters.metadata(user)

    def amplified_comparisons(
        self,
        user: str,
        answers: Mapping[str, Sequence[str]],
        config: AmplifyConfig | Mapping[str, Any] | None = None,
    ) -> list[Comparison]:
        """Pairs of the generator's own ``answers`` (per prompt) labelled by ``user``'s inferred reward,
        the clearest first (:func:`~personalign.adapters.amplify.amplify`): training data for
        ``train_adapter(user, extra=...)``. Nothing is stored."""
        from personalign.adapters.amplify import amplify

        config = (
            config if isinstance(config, AmplifyConfig) else validated(AmplifyConfig, config or {}, "config")
        )
        rewards = {prompt: self.reward(user, prompt, list(texts)) for prompt, texts in answers.items()}
        return amplify(answers, rewards, config)

    def import_adapter(self, user: str, folder: str | Path) -> UserProfile:
        """Use a LoRA trained elsewhere (a PEFT folder for this base model) as ``user``'s adapter.

        It is validated first (files, base model, rank, target modules, a trial load); on any
        problem ``AdapterError`` is raised and the user's previous adapter stays in use.
        """
        return profile_edits.import_adapter(self, user, folder)

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

    def is_enrolled(self, user: str) -> bool:
        """Whether ``user`` has a profile (comparisons or settings) in this store."""
        return self.profiles.exists(user)

    def memory_count(self, user: str) -> int:
        """How many memories ``user`` has (each counted once, whatever its versions or status)."""
        return self.memory.count(user)

    def forget_memories(self, user: str) -> int:
        """Delete every memory of ``user`` (the profile stays); returns how many there were."""
        return self.memory.delete_all(user)

    def forget(self, user: str) -> dict[str, int | bool]:
        """Remove every trace of ``user``: memories (collection dropped, database vacuumed) and files."""
        with self._generate_lock:
            self.adapters.unload(user)
            getattr(self.backend, "forget", lambda _: None)(user)  # the prompt cache's keys and values
        self._descriptions.pop(user, None)
        self._adapter_seen.pop(user, None)
        return self.store.forget(user)

    # --- preferences: reward, predict, next question (see personalign/preference/service.py) -----------

    @property
    def embedder(self) -> Any:
        """The preference embedder behind :meth:`reward`, :meth:`predict` and :meth:`next_question`."""
        return self.preferences.embedder

    def state(self, user: str) -> Any:
        """``user``'s :class:`~personalign.preference.base.UserState` under the current embedder.

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

    def next_question(
        self, user: str, candidates: Sequence[Any], top_k: int | None = None, seed: int = 0
    ) -> list[dict[str, Any]]:
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

    def memories(
        self,
        user: str,
        filters: Mapping[str, Any] | None = None,
        status: str = "active",
        limit: int | None = None,
    ) -> dict[str, Any]:
        """The user's memories, oldest first: active ones (``status="superseded"`` or ``"all"`` for
        the others), narrowed by metadata ``filters`` (see :mod:`personalign.memory.filters`)."""
        return self.store.memories.list(user, filters=filters, status=status, limit=limit)

    def search_memories(
        self,
        user: str,
        query: str,
        top_k: int = 5,
        threshold: float | None = None,
        filters: Mapping[str, Any] | None = None,
        status: str = "active",
    ) -> dict[str, Any]:
        """The user's memories closest in meaning to ``query``, best first (active ones by default)."""
        return self.store.memories.search(
            user, query, top_k=top_k, threshold=threshold, filters=filters, status=status
        )

    def get_memory(self, user: str, memory_id: str) -> dict[str, Any]:
        """One memory of ``user`` by id, any status (``UnknownMemoryError``, a ``KeyError``, if they have none)."""
        return self.store.memories.get(user, memory_id)

    def update_memory(
        self,
        user: str,
        memory_id: str,
        text: str,
        metadata: Mapping[str, Any] | None = None,
        source: str = "python",
    ) -> dict[str, Any]:
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
        return user_conditioning.condition(self, user, messages, max_new_tokens, conditioning, profile)

    def describe(
        self, user: str, n_shots: int = 4, profile: UserProfile | None = None, max_new_tokens: int = 48
    ) -> str:
        """A one-line description of what ``user`` prefers, written by the generator from their
        ``n_shots`` most recent comparisons (FSPO's user-description step; greedy).

        Cached per user until their profile changes (here or in another worker process).
        """
        return user_conditioning.describe(self, user, n_shots, profile, max_new_tokens)

    def respond(
        self,
        user: str | None,
        messages: Sequence[ChatMessage | dict[str, Any]],
        steer: Mapping[str, Any] | Steering | None = None,
        **options: Any,
    ) -> ChatResult:
        """Generate a reply for ``user`` (``None``: generic) with what conditioned it.

        ``steer``: this request's steering, ``{objective: weight}`` or a nested form
        (``{"weights"|"direction": {...}, "method": ...}``, ``{"angle": deg, "objectives": [a, b]}``,
        see :func:`personalign.steering.schema.parse_steering`); ``None`` uses the user's default
        (see :meth:`default_steer`), ``{}`` turns steering off. Options: generation
        (``max_new_tokens``, ``temperature``, ``top_p``, ``repetition_penalty``, ``seed``) and
        conditioning (``memory``, ``shots``, ``n_memories``, ``n_shots``, ``memory_threshold``).
        """
        prepared = self.engine.prepare(user, messages, steer, options)
        return self.engine.run([prepared], [None])[0]

    def respond_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[ChatResult]:
        """Replies for several requests, generated together: one ``generate`` call per group of
        requests with the same sampling settings (greedy requests always share one).

        Each request is a mapping with ``user``, ``messages`` and optionally ``steer`` and any
        option of :meth:`respond`. Every request is validated before anything is generated.
        Under greedy decoding each reply equals what :meth:`respond` gives for that request alone
        (up to floating-point ties from padding). Results come back in request order.
        """
        prepared, streams = self.engine.prepare_batch(requests)
        return self.engine.run(prepared, streams)

    def complete_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[ChatResult]:
        """Raw-text continuations (OpenAI's legacy completions): no chat template, user, memories or steering.

        Each request is ``{"prompt": str, **generation options}`` (see :meth:`respond`), optionally
        with a ``stream`` (:class:`TokenStream`); all are validated before anything is generated
        (:meth:`check_completions` does only that), and rows share ``generate`` calls as in :meth:`respond_batch`.
        """
        prepared, streams = self.engine.prepare_completions(requests)
        return self.engine.run(prepared, streams)

    def check_completions(self, requests: Sequence[Mapping[str, Any]]) -> None:
        """Raise what :meth:`complete_batch` would reject these requests with, generating nothing."""
        self.engine.prepare_completions(requests)

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
        self,
        user: str | None,
        messages: Sequence[ChatMessage | dict[str, Any]],
        steer: Mapping[str, Any] | Steering | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """An iterator over the reply as it is generated (same tokens as :meth:`respond`).

        Input is validated here, before the iterator is returned. Closing the iterator early
        stops the generation.
        """
        prepared = self.engine.prepare(user, messages, steer, options)
        stream = TokenStream()
        worker = threading.Thread(target=self.engine.run_quietly, args=([prepared], [stream]), daemon=True)
        worker.start()
        return _consume(stream, worker)
