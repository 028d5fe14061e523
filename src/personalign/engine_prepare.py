"""Request preparation for the generation engine (:mod:`personalign.engine`): a chat request
validated and conditioned (memories, shots, description, Persona-Plug, steering, the user's
guidance) into a :class:`~personalign.chat.Prepared`, and raw-text completion requests likewise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from personalign.chat import ConditioningParams, GenerationParams, Prepared, validated
from personalign.conditioning.fspo import Conditioning, query_of, with_description
from personalign.conditioning.pplug import embed_user
from personalign.errors import ContextLengthError, ValidationError
from personalign.steering import rerank as rerank_method
from personalign.steering.decoding import STEERABLE
from personalign.steering.methods import REGISTRY as STEERING_METHODS
from personalign.steering.schema import Steering, parse_steering
from personalign.streaming import TokenStream
from personalign.types import UserProfile, parse_messages

if TYPE_CHECKING:
    from personalign.engine import GenerationEngine


def _default_steering(profile: UserProfile) -> Steering:
    """The user's stored steering (the old flat ``{objective: weight}`` or the nested form), else
    the inferred weights of the objectives decoding can steer."""
    settings = profile.settings
    if "steer" in settings:
        return parse_steering(settings["steer"], field="settings.steer")
    inferred = settings.get("inferred_steer", {})
    return Steering({k: float(v) for k, v in inferred.items() if k in STEERABLE and v != 0.0})


def prepare(
    engine: GenerationEngine,
    user: str | None,
    messages: Any,
    steer: Mapping[str, Any] | Steering | None,
    options: Mapping[str, Any],
) -> Prepared:
    gen_fields = set(GenerationParams.model_fields)
    cond_fields = set(ConditioningParams.model_fields)
    unknown = set(options) - gen_fields - cond_fields
    if unknown:
        name = sorted(unknown)[0]
        raise ValidationError(name, "is not a chat option", f"use one of {sorted(gen_fields | cond_fields)}")
    params = validated(GenerationParams, {k: v for k, v in options.items() if k in gen_fields}, "generation")
    engine._check_decoding(params)
    conditioning = validated(
        ConditioningParams, {k: v for k, v in options.items() if k in cond_fields}, "conditioning"
    )
    profile = engine.pz.profiles.get(user) if user is not None else None  # read once per request
    cond = engine.pz.condition(user, messages, params.max_new_tokens, conditioning, profile)
    if steer is not None:
        applied = parse_steering(steer)
    else:
        applied = Steering({}) if profile is None else _default_steering(profile)
    caps = engine.backend.capabilities
    method = engine.steering.method(applied.method, applied.weights, caps.steering)
    conversation = cond.conversation
    description = None
    if conditioning.describe and profile is not None and profile.comparisons:
        description = engine.pz.describe(user, conditioning.n_shots or 4, profile)  # type: ignore[arg-type]
        conversation = with_description(conversation, description)
    if method is not None:  # prompt-level methods (prompt, dpa) write the steering into the conversation
        conversation = STEERING_METHODS[method].conversation(
            conversation, applied.weights, engine.generator.model_id
        )
    encoded = engine.generator.tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    use_adapter = user is not None and conditioning.adapter and engine.adapters.has_adapter(user)
    adapter_user = user if use_adapter else None
    query = query_of(parse_messages(messages))
    skipped: dict[str, str] = {}
    conditioning = _backend_defaults(engine, conditioning, skipped)
    plug = None
    if conditioning.pplug and engine.pz.plug is not None and profile is not None:
        items = engine.pz.history_items(user, profile)  # type: ignore[arg-type]
        if items:
            plug = embed_user(engine.pz.plug, engine.pz.encoder, items, query)
    fspo = (
        bool(cond.shots)
        and conditioning.fspo
        and adapter_user is None
        and engine.pz.fspo_folder is not None
        and not (method is not None and STEERING_METHODS[method].runs_adapter)
    )
    rerank, guidance = conditioning.rerank if conditioning.rerank >= 2 else 0, None
    if rerank and profile is None:
        rerank, guidance = 0, rerank_method.skipped("no user: the generic answer")
    elif rerank and not profile.comparisons:  # type: ignore[union-attr]
        rerank, guidance = (
            0,
            rerank_method.skipped("the user has no comparisons, so no inferred reward: the plain answer"),
        )
    elif rerank:
        engine.pz.preferences.state_of(profile, *engine.pz.preferences.embedder_and_id())  # type: ignore[arg-type]  # a corrupt state fails here, before any decoding
    guide, vas_report = _user_guide(engine, profile, conditioning.user_vas)
    if vas_report is not None:
        guidance = vas_report if guidance is None else {**guidance, "user_vas": vas_report}
    if skipped:
        guidance = {**(guidance or {}), "skipped": skipped}
    prepared = Prepared(
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
    engine.backend.check(prepared)
    return prepared


def _backend_defaults(
    engine: GenerationEngine, conditioning: ConditioningParams, skipped: dict[str, str]
) -> ConditioningParams:
    """``conditioning`` without the default-on conditioners the backend cannot run (noted in
    ``skipped`` when one is installed, so it would have run here); one the request set
    explicitly stays, and the backend refuses it."""
    caps = engine.backend.capabilities
    if caps.conditioning >= {"fspo", "pplug", "user_vas"}:
        return conditioning
    installed = {
        "fspo": lambda: engine.pz.fspo_folder is not None,
        "pplug": lambda: engine.pz.plug is not None,
        "user_vas": lambda: engine.pz.user_heads() is not None,
    }
    off: dict[str, Any] = {}
    for name, value in (("fspo", False), ("pplug", False), ("user_vas", 0.0)):
        if name not in caps.conditioning and name not in conditioning.model_fields_set:
            off[name] = value
            if installed[name]():
                skipped[name] = f"not available on the {engine.backend.name} backend"
    return conditioning.model_copy(update=off) if off else conditioning


def _user_guide(
    engine: GenerationEngine, profile: UserProfile | None, strength: float | None
) -> tuple[list[float] | None, dict[str, Any] | None]:
    """``user-vas`` for one request: per-head strengths and the report, or ``(None, why not)``."""
    from personalign.steering.uservas import METHOD, mixture

    if strength == 0.0:
        return None, None
    heads = engine.pz.user_heads() if profile is not None or strength is not None else None
    if heads is None:
        if strength is not None:
            raise ValidationError(
                "user_vas",
                "needs user-vas heads for this generator and embedder",
                "train them: personalign train user-vas --out DIR, then Personalizer(user_vas=DIR)",
                strength,
            )
        return None, None
    if profile is None or not profile.comparisons:
        if not strength:
            return None, None
        reason = (
            "no user: the generic answer"
            if profile is None
            else "the user has no comparisons: the plain answer"
        )
        return None, rerank_method.skipped(reason, requested=METHOD)
    state = engine.pz.preferences.state_of(profile, *engine.pz.preferences.embedder_and_id())
    betas = heads.betas(state, strength)
    report = {
        "method": METHOD,
        "strength": heads.default_beta if strength is None else strength,
        "weights": [round(float(w), 4) for w in mixture(state)],
        "heads": heads.fingerprint,
    }
    return betas, report


def _stream_of(request: Mapping[str, Any], index: int) -> TokenStream | None:
    """Request ``index``'s ``stream``: a :class:`TokenStream` or ``None`` (anything else is refused)."""
    stream = request.get("stream")
    if stream is not None and not isinstance(stream, TokenStream):
        raise ValidationError(
            f"requests[{index}].stream",
            "is not a TokenStream",
            "pass personalign.streaming.TokenStream() or leave it out",
        )
    return stream


def prepare_completions(
    engine: GenerationEngine, requests: Sequence[Mapping[str, Any]]
) -> tuple[list[Prepared], list[TokenStream | None]]:
    if not requests:
        raise ValidationError("requests", "is empty", "pass at least one request")
    gen_fields = set(GenerationParams.model_fields)
    prepared, streams = [], []
    for index, request in enumerate(requests):
        prompt = request.get("prompt") if isinstance(request, Mapping) else None
        if not isinstance(prompt, str) or not prompt:
            raise ValidationError(
                f"prompt[{index}]", "must be non-empty text", "send the text to continue", prompt
            )
        unknown = set(request) - gen_fields - {"prompt", "stream"}
        if unknown:
            raise ValidationError(
                sorted(unknown)[0], "is not a completion option", f"use one of {sorted(gen_fields)}"
            )
        stream = _stream_of(request, index)
        params = validated(
            GenerationParams,
            {k: v for k, v in request.items() if k not in ("prompt", "stream")},
            "generation",
        )
        engine._check_decoding(params)
        ids = engine.generator.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) + params.max_new_tokens > engine.generator.context_length:
            raise ContextLengthError(
                f"prompt[{index}] has {len(ids)} tokens and asks for {params.max_new_tokens} more, over the model's context of "
                f"{engine.generator.context_length}. Fix: shorten the prompt or lower max_tokens"
            )
        prepared.append(Prepared(None, Conditioning([], [], [], len(ids)), params, {}, list(ids)))
        streams.append(stream)
    return prepared, streams


def prepare_batch(
    engine: GenerationEngine, requests: Sequence[Mapping[str, Any]]
) -> tuple[list[Prepared], list[TokenStream | None]]:
    """The body of :meth:`Personalizer.respond_batch <personalign.personalizer.Personalizer.respond_batch>` before it runs the requests."""
    if not requests:
        raise ValidationError("requests", "is empty", "pass at least one request")
    prepared, streams = [], []
    for index, request in enumerate(requests):
        if not isinstance(request, Mapping) or "messages" not in request:
            raise ValidationError(
                f"requests[{index}]",
                "must be a mapping with 'messages'",
                "pass {'user': ..., 'messages': [...]}",
                request,
            )
        stream = _stream_of(request, index)
        options = {k: v for k, v in request.items() if k not in ("user", "messages", "steer", "stream")}
        prepared.append(
            engine.prepare(request.get("user"), request["messages"], request.get("steer"), options)
        )
        streams.append(stream)
    return prepared, streams
