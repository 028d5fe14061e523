"""The generation engine behind ``Personalizer.respond``: it turns validated requests into rows
of ``generate`` calls and the rows back into replies.

``prepare`` validates a request and conditions it (memories, shots, description, Persona-Plug,
steering, the user's guidance); ``run`` groups prepared requests by decoding settings, expands
reranked ones into candidate rows, plans each batch (steering rows, adapters, processors), decodes,
streams, and picks reranked candidates. Preparation lives in :mod:`personalign.engine_prepare`. The facade (:class:`~personalign.personalizer.Personalizer`)
owns the users, their store and the models; the engine reads them through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

from personalign.adapters.batched import gathered_lora, supports_gathered
from personalign.adapters.store import BASE
from personalign.chat import ChatResult, GenerationParams, Prepared
from personalign.conditioning.fspo import ADAPTER_NAME as FSPO_ADAPTER
from personalign.conditioning.pplug import (
    plug_input_ids,
    plug_inputs,
)
from personalign.engine_prepare import (  # noqa: F401 (_default_steering re-exported)
    _default_steering,
    prepare,
    prepare_batch,
    prepare_completions,
)
from personalign.errors import ValidationError
from personalign.prefix_cache import PrefixCache, cacheable, prefix_of, rows_agree
from personalign.steering import rerank as rerank_method
from personalign.steering.decoding import (
    RowDecoder,
    compile_grammar,
    derived_seed,
    eos_token_ids,
)
from personalign.steering.runtime import Plan
from personalign.steering.schema import Steering
from personalign.streaming import BatchStreamer, CancelledRows, TokenStream

__all__ = [
    "GenerationEngine",
    "_consume",
    "_default_steering",
]  # _default_steering: re-exported from engine_prepare


def _consume(stream: TokenStream, worker: threading.Thread) -> Iterator[str]:
    """Iterate ``stream``; if the consumer stops early, cancel the generation behind it."""
    try:
        yield from stream
    finally:
        stream.cancel()
        worker.join()


def _with_logprobs(
    result: ChatResult, prepared: Prepared, decoder: RowDecoder | None, row: int
) -> ChatResult:
    """``result`` with its tokens' log-probabilities when the request asked for them (row ``row`` of ``decoder``)."""
    if decoder is None or prepared.params.top_logprobs is None:
        return result
    return dataclasses.replace(result, logprobs=decoder.logprobs[row][: result.completion_tokens])


class GenerationEngine:
    """Generation for one :class:`~personalign.personalizer.Personalizer` (see the module docstring)."""

    def __init__(self, personalizer: Any) -> None:
        self.pz = (
            personalizer  # conditioning (memories, shots, description, Persona-Plug), users and their states
        )
        self.generator = personalizer.generator
        self.steering = personalizer.steering
        self.adapters = personalizer.adapters
        self.lock = (
            personalizer._generate_lock
        )  # one generate call at a time (adapters are swapped per batch)
        self._grammars: dict[str, Any] = {}
        self.backend = personalizer.backend  # where rows decode (personalign.backends)
        self._cacheable: bool | None = None  # the model's cache can be cut at a prefix (known on first use)

    def prepare(
        self,
        user: str | None,
        messages: Any,
        steer: Mapping[str, Any] | Steering | None,
        options: Mapping[str, Any],
    ) -> Prepared:
        """One chat request validated and conditioned (:func:`personalign.engine_prepare.prepare`)."""
        return prepare(self, user, messages, steer, options)

    def prepare_batch(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> tuple[list[Prepared], list[TokenStream | None]]:
        """Chat requests validated and conditioned (:func:`personalign.engine_prepare.prepare_batch`)."""
        return prepare_batch(self, requests)

    def prepare_completions(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> tuple[list[Prepared], list[TokenStream | None]]:
        """Raw-text requests validated (:func:`personalign.engine_prepare.prepare_completions`)."""
        return prepare_completions(self, requests)

    def _vocab_size(self) -> int:
        """The width of the generator's logits (may exceed the tokenizer's length)."""
        return int(getattr(self.generator.model.config, "vocab_size", None) or len(self.generator.tokenizer))

    def _grammar(self, spec: Mapping[str, Any] | None) -> Any:
        """The compiled grammar for a request's ``grammar`` (cached by its JSON text), or ``None``."""
        if spec is None:
            return None
        key = json.dumps(spec, sort_keys=True)
        cache = self._grammars
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
                raise ValidationError(
                    f"logit_bias.{token}",
                    f"is not a token id of this model (0 to {vocab - 1})",
                    "use ids from the model's tokenizer",
                    token,
                )
        self._grammar(params.grammar)

    def row_decoder(self, batch: Sequence[Prepared], plan: Plan, prompt_width: int) -> RowDecoder | None:
        """Per-row sampling and OpenAI's controls for a batch that needs them (``None``: every row is plain greedy)."""
        controls = [p.params.row_controls(self._grammar(p.params.grammar)) for p in batch]
        if all(c.plain for c in controls):
            return None
        if plan.greedy:  # logit mixing: SteeringProcessor picks each group's token, with the global RNG
            for c, p in zip(controls, batch, strict=True):
                extra = (
                    c.logit_bias
                    or c.presence_penalty
                    or c.frequency_penalty
                    or c.top_logprobs is not None
                    or c.grammar is not None
                )
                if extra:
                    fix = "steer with another method, or leave out logit_bias, penalties, logprobs and response_format"
                    raise ValidationError(
                        "steer",
                        f"logit-mixing steering ({p.steer_method}) cannot be combined with OpenAI's decoding controls",
                        fix,
                    )
            return None
        return RowDecoder(
            controls,
            prompt_width,
            eos_token_ids(self.generator.tokenizer, self.generator.model.generation_config),
        )

    def _generate_kwargs(self, batch: Sequence[Prepared], plan: Plan) -> dict[str, Any]:
        """The planned rows, the batch's decoding settings and the steering processors."""
        first = batch[0].params.model_copy(
            update={"max_new_tokens": max(p.params.max_new_tokens for p in batch)}
        )
        kwargs: dict[str, Any] = {
            "input_ids": plan.input_ids.to(self.generator.device),
            "attention_mask": plan.attention_mask.to(self.generator.device),
        }
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
            kwargs["inputs_embeds"], kwargs["attention_mask"] = plug_inputs(
                self.generator.model, ids, mask, softs
            )
            kwargs["input_ids"] = plug_input_ids(ids, mask, softs)
        # after the plug column, so the decoder's prompt width is what logits processors see
        decoder = self.row_decoder(batch, plan, kwargs["input_ids"].shape[1])
        if decoder is not None:  # it chooses every row's token; generate takes it greedily
            from transformers import LogitsProcessorList

            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            kwargs["logits_processor"] = LogitsProcessorList([*plan.processors, decoder])
        return kwargs

    def plan(self, batch: Sequence[Prepared]) -> Plan:
        """Rows, adapter names and steering for one ``generate`` call (caller holds the generate lock)."""
        names = self.adapters.adapter_names([p.adapter_user for p in batch])
        if any(p.fspo for p in batch):
            fspo = self.steering._adapter(FSPO_ADAPTER, self.pz.fspo_folder, "fspo")  # type: ignore[arg-type]  # loaded once
            names = [
                fspo if p.fspo else (names[i] if names is not None else BASE) for i, p in enumerate(batch)
            ]
        guides = [p.guide for p in batch]
        heads = self.pz.user_heads() if any(g is not None for g in guides) else None
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

    def _result(self, prepared: Prepared, new_tokens: list[int], stops: set[int]) -> ChatResult:
        """A row's reply from its generated tokens (cut at its own limit and first end-of-sequence)."""
        new_tokens = new_tokens[: prepared.params.max_new_tokens]
        end = next((i + 1 for i, t in enumerate(new_tokens) if t in stops), len(new_tokens))
        new_tokens = new_tokens[:end]
        text = self.generator.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        cond = prepared.conditioning
        return ChatResult(
            text,
            prepared.user,
            cond.memories,
            cond.shots,
            prepared.steer,
            cond.prompt_tokens,
            len(new_tokens),
            prepared.description,
            prepared.personalization,
        )

    def forward_state(self, name: str) -> tuple[Hashable, tuple[Any, ...]] | None:
        """What a row's keys and values depend on besides its tokens, for the prompt cache: the
        model and the row's adapter ``name`` with its weights' identities and versions (a refilled
        slot bumps them, a reloaded one has new tensors); and the objects to keep alive so those
        identities stay unique. ``None`` when that cannot be told."""
        model = self.adapters.base_model
        if name == BASE:
            return (self.generator.model_id, id(model), BASE), (model,)
        peft = self.adapters.peft
        if peft is None or name not in peft.peft_config:
            return None
        marker = f".{name}."
        params = tuple(p for n, p in peft.named_parameters() if marker in n)
        try:
            versions = tuple((id(p), p._version) for p in params)
        except RuntimeError:  # inference tensors keep no version
            return None
        return (self.generator.model_id, id(model), name, versions), (model, *params)

    def _prefix_state(
        self, prefix_cache: PrefixCache | None, plan: Plan, kwargs: Mapping[str, Any]
    ) -> tuple[Hashable, tuple[Any, ...]] | None:
        """The prompt cache's state for this batch (one per row), or ``None`` where the cache is
        bypassed: no cache, rows with different prompts (several requests: padding), Persona-Plug's
        soft token (``inputs_embeds``), or a model whose cache cannot be cut at a prefix
        (sliding-window or linear attention). One request's rows (steering's extra rows, each on
        its own adapter) share its prompt and are cached together."""
        ids = plan.input_ids  # (R, T)
        if prefix_cache is None or "inputs_embeds" in kwargs:
            return None
        if not bool(plan.attention_mask.all()) or not bool((ids == ids[:1]).all()):
            return None
        if self._cacheable is None:
            from transformers import DynamicCache

            self._cacheable = cacheable(DynamicCache(config=self.generator.model.config))
        if not self._cacheable:
            return None
        rows = [self.forward_state(n) for n in (plan.names or [BASE] * ids.shape[0])]
        if any(r is None for r in rows):
            return None
        return tuple(r[0] for r in rows), tuple(p for r in rows for p in r[1])  # type: ignore[index]

    def decode_local(
        self,
        batch: Sequence[Prepared],
        streams: Sequence[TokenStream | None] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> list[ChatResult]:
        """Decode ``batch`` with Hugging Face ``generate`` in this process (the local backend).

        With ``prefix_cache``, a batch of one request starts from the keys and values of its
        longest cached prompt prefix and leaves its own there (:mod:`personalign.prefix_cache`).
        """
        import torch
        from transformers import StoppingCriteriaList
        from transformers.generation.utils import ALL_CACHE_NAMES

        stops = set(eos_token_ids(self.generator.tokenizer, self.generator.model.generation_config))
        seed = next(
            (p.params.seed for p in batch if p.params.seed is not None), None
        )  # only logit mixing samples with the global RNG
        try:
            with self.lock, torch.inference_mode():
                plan = self.plan(batch)
                kwargs = self._generate_kwargs(batch, plan)
                decoder = next(
                    (p for p in kwargs.get("logits_processor", []) if isinstance(p, RowDecoder)), None
                )
                streamer = None
                if streams is not None and any(s is not None for s in streams):
                    primary = set(plan.primary)
                    row_streams = [streams[i] if r in primary else None for r, i in enumerate(plan.owner)]
                    limits = [batch[i].params.max_new_tokens for i in plan.owner]

                    def finalize(r: int, tokens: list[int]) -> ChatResult:
                        return _with_logprobs(
                            self._result(batch[plan.owner[r]], tokens, stops),
                            batch[plan.owner[r]],
                            decoder,
                            r,
                        )

                    streamer = BatchStreamer(self.generator.tokenizer, row_streams, limits, stops, finalize)
                    # a cancelled request stops all of its rows
                    kwargs["stopping_criteria"] = StoppingCriteriaList(
                        [CancelledRows([streams[i] for i in plan.owner])]
                    )
                if seed is not None and decoder is None:
                    torch.manual_seed(seed)
                state = self._prefix_state(prefix_cache, plan, kwargs)
                cache_name = ALL_CACHE_NAMES[0]  # "cache" (transformers 5), "past_key_values" (4.x)
                if state is not None:
                    kwargs[cache_name], _ = prefix_cache.take(  # type: ignore[union-attr]
                        state[0], plan.input_ids[0].tolist(), self.generator.model.config
                    )
                try:
                    output = self._generate(plan.names, kwargs, streamer)
                finally:
                    for hook in (plan.capture, plan.mixer):
                        if hook is not None:
                            hook.close()
                if state is not None:
                    cache = kwargs[cache_name]  # prompt and reply, but the last token
                    seqs = output[:, : cache.get_seq_length()]  # (R, L)
                    agree = rows_agree(seqs)  # where the rows' replies part, the rest is not shared
                    if agree < seqs.shape[1]:
                        cache = prefix_of(cache, agree, self.generator.model.config)
                    prefix_cache.put(  # type: ignore[union-attr]
                        state[0], seqs[0, :agree], cache, batch[0].user, state[1]
                    )
        except BaseException as err:
            for stream in streams or []:
                if stream is not None:
                    stream.fail(err)
            raise
        width = kwargs["input_ids"].shape[1]
        results = [
            self._result(prepared, output[row, width:].tolist(), stops)
            for row, prepared in zip(plan.primary, batch, strict=True)
        ]
        results = [
            _with_logprobs(r, p, decoder, i) for i, (r, p) in enumerate(zip(results, batch, strict=True))
        ]
        for stream, result in zip(streams or [], results, strict=False):
            if stream is not None:
                stream.finish(result)  # rows the streamer has not closed (a no-op for the others)
        return results

    def run(self, prepared: Sequence[Prepared], streams: Sequence[TokenStream | None]) -> list[ChatResult]:
        """Generate validated requests: one ``generate`` call per group of equal sampling settings.

        A request with ``rerank=N`` becomes N sampled rows (at ``rerank_temperature`` when it is
        greedy); the user's reward picks one (:mod:`personalign.steering.rerank`), and its stream,
        if any, gets the picked reply whole.
        """
        rows: list[Prepared] = []
        owner: list[int] = []
        for index, item in enumerate(prepared):
            if item.rerank:
                params = (
                    item.params
                    if item.params.temperature > 0
                    else item.params.model_copy(update={"temperature": item.rerank_temperature})
                )
                seeds = [
                    None if params.seed is None else derived_seed(params.seed, j) for j in range(item.rerank)
                ]  # distinct candidates
                rows += [
                    dataclasses.replace(item, params=params.model_copy(update={"seed": seed}))
                    for seed in seeds
                ]
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
            for row, result in zip(
                group,
                self.backend.run(self, [rows[r] for r in group], [row_streams[r] for r in group]),
                strict=True,
            ):
                outputs[row] = result
        mine: dict[int, list[ChatResult]] = {}
        for row, index in enumerate(owner):
            mine.setdefault(index, []).append(outputs[row])  # type: ignore[arg-type]
        return [
            self._rerank(item, mine[i], streams[i]) if item.rerank else mine[i][0]
            for i, item in enumerate(prepared)
        ]

    def _rerank(
        self, item: Prepared, candidates: Sequence[ChatResult], stream: TokenStream | None
    ) -> ChatResult:
        """The candidate the user's reward scores highest, with the scores in ``personalization``."""
        texts = [c.text for c in candidates]
        _, embedder_id = self.pz.preferences.embedder_and_id()
        scored = [
            i for i, t in enumerate(texts) if t.strip()
        ]  # an empty reply (the model ended at once) is never picked over a real one
        scores = [-math.inf] * len(texts)
        if scored:
            for i, s in zip(
                scored,
                self.pz.preferences.reward(item.user, item.query or "?", [texts[i] for i in scored]),
                strict=True,
            ):  # type: ignore[arg-type]
                scores[i] = s
        best = rerank_method.pick(scores)
        temperature = item.params.temperature if item.params.temperature > 0 else item.rerank_temperature
        chosen = dataclasses.replace(
            candidates[best],
            personalization=rerank_method.report(len(texts), scores, best, embedder_id, temperature),
        )
        if stream is not None:
            if chosen.text:
                stream.put(chosen.text)
            stream.finish(chosen)
        return chosen

    def run_quietly(self, batch: Sequence[Prepared], streams: Sequence[TokenStream | None]) -> None:
        try:
            self.run(batch, streams)
        except BaseException as err:  # the error reaches the consumer through its stream
            for stream in streams:
                if stream is not None:
                    stream.fail(err)  # a no-op for streams already finished
