"""What conditions one :class:`~personalign.personalizer.Personalizer`'s prompts: the installed
conditioners for its generator (the FSPO adapter folder, the Persona-Plug projector, the user-vas
heads), and per request the retrieved memories and shots, the user's description and what
Persona-Plug pools. The facade's verbs call these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.adapters.store import AdapterError
from personalign.chat import ConditioningParams
from personalign.conditioning.fspo import (
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
)
from personalign.conditioning.pplug import CONFIG_FILE as PLUG_CONFIG
from personalign.conditioning.pplug import (
    PersonaPlug,
    input_embedding_dim,
    load_plug,
    pplug_dir,
    read_plug_config,
)
from personalign.memory.chroma import MAX_MEMORY_CHARS
from personalign.types import ChatMessage, UserProfile, parse_messages

if TYPE_CHECKING:
    from personalign.personalizer import Personalizer


def user_heads(pz: Personalizer) -> Any:
    """The body of :meth:`Personalizer.user_heads <personalign.personalizer.Personalizer.user_heads>`."""
    from personalign.steering.uservas import UserHeads, UserHeadsError, default_heads_dir

    if pz._user_heads is None:
        embedder, _ = pz.preferences.usable_embedder()
        if pz._user_vas_spec is not None:
            pz._user_heads = UserHeads.load(pz._user_vas_spec, pz.generator, embedder)
        elif (
            embedder is not None and getattr(embedder, "name", None) == "pal" and default_heads_dir().is_dir()
        ):
            try:
                pz._user_heads = UserHeads.load(default_heads_dir(), pz.generator, embedder)
            except UserHeadsError:
                pz._user_heads = False  # shipped for another generator or embedder: not used
        else:
            pz._user_heads = False
    return pz._user_heads or None


def installed_plug(pz: Personalizer, folder: str | Path | None) -> PersonaPlug | None:
    """The Persona-Plug projector to use, or ``None`` when there is none for this generator."""
    dims = (
        pz.generator.model_id,
        pz.encoder.name,
        input_embedding_dim(pz.generator),
        pz.encoder.dim,
    )
    if folder is None:
        default = pplug_dir()
        if (
            not (default / PLUG_CONFIG).is_file()
            or read_plug_config(default).get("config", {}).get("base_model") != pz.generator.model_id
        ):
            return None
        folder = default
    return load_plug(folder, *dims, device=pz.generator.device)


def history_items(pz: Personalizer, user: str, profile: UserProfile | None = None) -> list[str]:
    """The body of :meth:`Personalizer.history_items <personalign.personalizer.Personalizer.history_items>`."""
    profile = profile if profile is not None else pz.profiles.get(user)
    memories = [r["memory"] for r in pz.memory.get_all(user)["results"]]
    return [c.chosen for c in profile.comparisons] + memories


def installed_fspo(pz: Personalizer, folder: str | Path | None) -> Path | None:
    """The FSPO adapter folder to use, or ``None`` when there is none for this generator."""
    if folder is None:
        default = fspo_dir()
        return default if fspo_adapter_meta(default, pz.generator.model_id) is not None else None
    folder = Path(folder)
    if not (folder / FSPO_CONFIG).is_file():
        raise AdapterError(
            f"fspo: {folder} has no {FSPO_CONFIG}. Fix: pass the --out folder of `personalign train fspo`"
        )
    if fspo_adapter_meta(folder, pz.generator.model_id) is None:
        trained = json.loads((folder / FSPO_CONFIG).read_text()).get("base_model")
        raise AdapterError(
            f"fspo: the adapter in {folder} was trained for base model {trained!r}, this generator is {pz.generator.model_id!r}. "
            f"Fix: train one for it with `personalign train fspo --model {pz.generator.model_id}`"
        )
    pz.adapters.validate_folder(folder, label="fspo adapter")
    return folder


def condition(
    pz: Personalizer,
    user: str | None,
    messages: Sequence[ChatMessage | dict[str, Any]],
    max_new_tokens: int,
    conditioning: ConditioningParams,
    profile: UserProfile | None = None,
) -> Conditioning:
    """The body of :meth:`Personalizer.condition <personalign.personalizer.Personalizer.condition>`."""
    parsed = parse_messages(messages)
    memories: list[str] = []
    shots: list[Shot] = []
    if user is not None:
        if profile is None:
            profile = pz.profiles.get(user)  # validates the id; UnknownUserError if absent
        drop_stale_adapter(pz, user, profile)
        query = query_of(parsed, conditioning.context_turn)
        # The search reads at most a memory's length of the message; an empty message retrieves nothing.
        search = query[:MAX_MEMORY_CHARS]
        if conditioning.memory and conditioning.n_memories and search.strip():
            found = pz.memory.search(
                user, search, top_k=conditioning.n_memories, threshold=conditioning.memory_threshold
            )
            memories = [r["memory"] for r in found["results"]]
        if conditioning.shots and conditioning.n_shots:
            shots = rank_shots(profile.comparisons, query, pz.encoder, conditioning.n_shots)
    tokenizer = pz.generator.tokenizer
    return fit_to_context(
        tokenizer,
        parsed,
        shots,
        memories,
        pz.generator.context_length,
        max_new_tokens,
        conditioning.context_turn,
    )


def drop_stale_adapter(pz: Personalizer, user: str, profile: UserProfile) -> None:
    """Unload ``user``'s resident adapter when their profile notes another one than when it was
    last read here: another worker process (or this one) trained or imported a new adapter."""
    note = profile.settings.get("adapter")
    if pz._adapter_seen.get(user) == note:
        return
    if user in pz.adapters.resident:
        with pz._generate_lock:  # never while a batch generates with it
            pz.adapters.unload(user)  # the next batch loads the adapter on disk now
    pz._adapter_seen[user] = note


def describe(
    pz: Personalizer,
    user: str,
    n_shots: int = 4,
    profile: UserProfile | None = None,
    max_new_tokens: int = 48,
) -> str:
    """The body of :meth:`Personalizer.describe <personalign.personalizer.Personalizer.describe>`."""
    profile = profile if profile is not None else pz.profiles.get(user)
    key = (profile.created_at, profile.version, len(profile.comparisons))
    cached = pz._descriptions.get(user)
    if cached is not None and cached[0] == key:
        return cached[1]
    shots = [Shot(c, 1.0) for c in profile.comparisons[-n_shots:]]
    conversation = describe_conversation(shots)
    tokens = count_prompt_tokens(pz.generator.tokenizer, conversation)
    while len(shots) > 1 and tokens + max_new_tokens > pz.generator.context_length:
        shots = shots[1:]
        conversation = describe_conversation(shots)
        tokens = count_prompt_tokens(pz.generator.tokenizer, conversation)
    text = first_sentence(pz.respond(None, conversation, max_new_tokens=max_new_tokens, temperature=0.0).text)
    pz._descriptions[user] = (key, text)
    return text
