"""Contract tests for the Personalizer facade on the tiny random Llama.

Note on the models: the session ``tiny_generator`` (initialiser std 0.02) decodes the same token
("\\n") greedily for every prompt, so a token-level comparison on it alone cannot tell two prompts
apart. The identity, streaming and conditioning contracts are therefore also run on ``lively``:
the same architecture and tokenizer with weights redrawn at std 0.5, whose greedy output depends
on the prompt. Both are checked against the exact prompt tokens handed to ``generate``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch

from personalign.conditioning.fspo import (
    MEMORY_HEADER,
    TASK_LINE,
    Shot,
    build_conversation,
    count_prompt_tokens,
    fit_to_context,
)
from personalign.errors import ContextLengthError, StoreLockedError, UnknownUserError, ValidationError
from personalign.models import Generator
from personalign.personalizer import Personalizer
from personalign.steering.objectives import infer_weights
from personalign.streaming import TokenStream
from personalign.types import Comparison, parse_messages

EGG = {
    "prompt": "How do I boil an egg?",
    "chosen": "Nine minutes.",
    "rejected": "It depends on many things about the egg.",
}
SKY = {
    "prompt": "Why is the sky blue?",
    "chosen": "Scattering.",
    "rejected": "Because of a long and detailed reason.",
}
DINNER = {
    "prompt": "Plan my dinner for tonight.",
    "chosen": "Lentil soup.",
    "rejected": "Whatever you like, really.",
}
ASK_EGG = [{"role": "user", "content": "How long should I boil an egg for?"}]
ASK_DINNER = [{"role": "user", "content": "Plan my dinner for tonight please."}]
VEGETARIAN = "I am vegetarian and I cook for two."


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture()
def lively_pz(lively, encoder, tmp_path):
    with Personalizer(lively, encoder, store=tmp_path / "lively-store") as personalizer:
        yield personalizer


@pytest.fixture()
def calls(monkeypatch):
    """Install a spy on a Personalizer's ``model.generate``; returns the list of (kwargs, output)."""
    recorded: list[tuple[dict, torch.Tensor]] = []

    def install(personalizer: Personalizer) -> list[tuple[dict, torch.Tensor]]:
        model = personalizer.generator.model
        real = model.generate

        def spy(*args, **kwargs):
            output = real(*args, **kwargs)
            recorded.append((kwargs, output))
            return output

        monkeypatch.setattr(model, "generate", spy)
        return recorded

    return install


def _reference(
    generator: Generator, messages: list[dict], max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain transformers: the chat template and greedy ``generate``; returns (prompt ids, new ids)."""
    encoded = generator.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = type(generator.model).generate(
            generator.model, **encoded, max_new_tokens=max_new_tokens, do_sample=False
        )
    prompt_len = encoded["input_ids"].shape[1]
    return encoded["input_ids"][0], output[0, prompt_len:]


def _prompt_text(personalizer: Personalizer, kwargs: dict) -> str:
    return personalizer.generator.tokenizer.decode(kwargs["input_ids"][0])


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _empty_user(pz: Personalizer, user: str) -> None:
    """A user who exists but has no memories and no comparisons (remember, then delete_memory)."""
    [row] = pz.remember(user, VEGETARIAN)["results"]
    assert pz.delete_memory(user, row["id"]) is True
    assert pz.memories(user)["results"] == [] and pz.profile(user).comparisons == []


# --- enroll ---------------------------------------------------------------------------------


def test_enroll_with_one_bad_comparison_stores_nothing_for_a_new_user(pz):
    bad = {**SKY, "rejected": "   "}
    with pytest.raises(ValidationError) as info:
        pz.enroll("alice", [EGG, DINNER, bad, EGG])
    assert info.value.field == "comparisons[2].rejected"
    assert str(info.value).startswith("comparisons[2].rejected: ") and "Fix: " in str(info.value)
    assert not pz.profiles.exists("alice")
    assert not (pz.store_path / "users" / "alice").exists()
    assert pz.users() == []
    with pytest.raises(UnknownUserError):
        pz.profile("alice")


def test_enroll_with_one_bad_comparison_leaves_existing_profile_unchanged(pz):
    pz.enroll("alice", [EGG])
    path = pz.store_path / "users" / "alice" / "profile.json"
    before = path.read_bytes()
    with pytest.raises(ValidationError) as info:
        pz.enroll("alice", [SKY, {**DINNER, "weight": math.nan}])
    assert info.value.field == "comparisons[1].weight"
    with pytest.raises(ValidationError) as info:
        pz.enroll("alice", [SKY, {**DINNER, "rejected": DINNER["chosen"]}])
    assert info.value.field == "comparisons[1]" and "must differ" in str(info.value)
    assert path.read_bytes() == before
    assert [c.prompt for c in pz.profile("alice").comparisons] == [EGG["prompt"]]


def test_enroll_rejects_bad_user_ids_and_empty_input(pz):
    with pytest.raises(ValidationError) as info:
        pz.enroll("../alice", [EGG])
    assert info.value.field == "user"
    with pytest.raises(ValidationError, match="^comparisons: is empty"):
        pz.enroll("alice", [])
    assert pz.users() == []


def test_enroll_appends_and_stamps_created_at(pz):
    started = time.time()
    first = pz.enroll("alice", [EGG, Comparison(**SKY)])
    ended = time.time()
    assert first.version == 1 and [c.prompt for c in first.comparisons] == [EGG["prompt"], SKY["prompt"]]
    assert all(started <= c.created_at <= ended for c in first.comparisons)
    second = pz.enroll("alice", {**DINNER, "created_at": 5.0})  # a single dict is accepted too
    assert second.version == 2
    assert [c.prompt for c in second.comparisons] == [EGG["prompt"], SKY["prompt"], DINNER["prompt"]]
    assert second.comparisons[:2] == first.comparisons  # earlier ones are kept as they were
    assert second.comparisons[2].created_at == 5.0  # a given time is kept
    stored = pz.profile("alice")
    assert stored == second
    assert stored.settings["inferred_steer"] == pytest.approx(infer_weights(stored.comparisons))


# --- forget and storage --------------------------------------------------------------------


def test_forget_leaves_nothing_in_chroma_nor_on_disk(pz):
    secret_fact = "My locker code is quokka-xylophone-7731."
    secret_pair = {
        "prompt": "What is my favourite animal?",
        "chosen": "The zebra-ornithopter.",
        "rejected": "A dog.",
    }
    pz.enroll("alice", [secret_pair, EGG])
    pz.remember("alice", [secret_fact, VEGETARIAN])
    pz.remember("bob", "Bob keeps a trombone-walrus in the attic.")
    store = pz.store_path
    assert _files_containing(store, b"quokka-xylophone-7731") and _files_containing(
        store, b"zebra-ornithopter"
    )

    assert pz.forget("alice") == {"memories_deleted": 2, "profile_deleted": True}
    assert pz.memories("alice")["results"] == []
    assert pz.search_memories("alice", "locker code", top_k=10, threshold=-1.0)["results"] == []
    assert not (store / "users" / "alice").exists()
    assert [p.name for p in (store / "users").iterdir()] == ["bob"]
    for needle in (b"quokka-xylophone-7731", b"zebra-ornithopter", VEGETARIAN.encode()):
        assert _files_containing(store, needle) == [], needle
    assert pz.users() == ["bob"]
    with pytest.raises(UnknownUserError):
        pz.chat("alice", ASK_EGG, max_new_tokens=2)
    # bob is untouched
    assert [r["memory"] for r in pz.memories("bob")["results"]] == [
        "Bob keeps a trombone-walrus in the attic."
    ]
    assert pz.forget("alice") == {"memories_deleted": 0, "profile_deleted": False}


def test_second_personalizer_on_same_store_is_locked_out(pz, tiny_generator, encoder):
    with pytest.raises(StoreLockedError) as info:
        Personalizer(tiny_generator, encoder, store=pz.store_path)
    assert isinstance(info.value, RuntimeError) and "Fix:" in str(info.value)
    pz.remember("alice", VEGETARIAN)
    pz.close()
    with Personalizer(tiny_generator, encoder, store=pz.store_path) as second:
        assert [r["memory"] for r in second.memories("alice")["results"]] == [VEGETARIAN]
        second.enroll("alice", [EGG])
    with Personalizer(
        tiny_generator, encoder, store=pz.store_path
    ) as third:  # released again by the with-block
        assert len(third.profile("alice").comparisons) == 1


def test_store_survives_restart(tiny_generator, encoder, tmp_path):
    store = tmp_path / "store"
    with Personalizer(tiny_generator, encoder, store=store) as first:
        first.enroll("alice", [EGG, SKY])
        first.remember("alice", [VEGETARIAN, "My car is a red hatchback."], metadata={"source": "test"})
        first.set_steering("alice", {"verbosity": -0.5})
        profile = first.profile("alice")
    with Personalizer(tiny_generator, encoder, store=store) as again:
        assert again.users() == ["alice"]
        assert again.profile("alice") == profile
        assert again.default_steer("alice") == {"verbosity": -0.5}
        memories = again.memories("alice")["results"]
        assert sorted(r["memory"] for r in memories) == sorted([VEGETARIAN, "My car is a red hatchback."])
        assert all(r["metadata"] == {"source": "test"} for r in memories)
        assert again.search_memories("alice", "dinner plans", top_k=1)["results"][0]["memory"] == VEGETARIAN
        result = again.respond("alice", ASK_DINNER, max_new_tokens=2)
        assert result.memories == [VEGETARIAN]


# --- chat -----------------------------------------------------------------------------------


def test_unknown_user_and_generic_chat(pz, calls):
    recorded = calls(pz)
    with pytest.raises(UnknownUserError) as info:
        pz.chat("ghost", ASK_EGG, max_new_tokens=2)
    assert isinstance(info.value, KeyError) and "ghost" in str(info.value)
    with pytest.raises(UnknownUserError):
        pz.stream("ghost", ASK_EGG, max_new_tokens=2)  # raised before an iterator is returned
    with pytest.raises(ValidationError):
        pz.chat("../ghost", ASK_EGG, max_new_tokens=2)
    assert recorded == []  # nothing was generated
    text = pz.chat(None, ASK_EGG, max_new_tokens=3)
    assert isinstance(text, str) and len(recorded) == 1
    result = pz.respond(None, ASK_EGG, max_new_tokens=3)
    assert result.user is None and result.memories == [] and result.shots == [] and result.steer == {}
    assert result.completion_tokens == 3


def test_bad_messages_and_options_are_validation_errors(pz, calls):
    recorded = calls(pz)
    with pytest.raises(ValidationError) as info:
        pz.respond(None, [{"role": "assistant", "content": "hi"}])
    assert info.value.field == "messages[0].role"
    with pytest.raises(ValidationError) as info:
        pz.respond(None, ASK_EGG, max_tokens=3)
    assert info.value.field == "max_tokens" and "max_new_tokens" in info.value.fix
    with pytest.raises(ValidationError) as info:
        pz.respond(None, ASK_EGG, max_new_tokens=0)
    assert info.value.field == "generation.max_new_tokens"
    assert recorded == []


# --- identity contract: no memories, no shots, no steering == plain generate ------------------


IDENTITY_WAYS = ["no-user", "emptied-user", "everything-off"]


@pytest.mark.parametrize("way", IDENTITY_WAYS)
@pytest.mark.parametrize("which", ["pz", "lively_pz"])
def test_identity_equals_plain_generate(request, calls, which, way):
    personalizer: Personalizer = request.getfixturevalue(which)
    n = 12
    messages = [{"role": "system", "content": "Be kind."}, *ASK_DINNER]
    if way == "no-user":
        user, options = None, {}
    elif way == "emptied-user":
        user, options = "bob", {}
        _empty_user(personalizer, user)
        assert personalizer.default_steer(user) == {}
    else:
        # a user with comparisons (that imply a verbosity preference) and a memory, all switched off
        user, options = "carol", {"shots": False, "memory": False, "steer": {}}
        personalizer.enroll(user, [EGG, SKY, DINNER])
        personalizer.remember(user, VEGETARIAN)
        assert personalizer.default_steer(user) != {}
    recorded = calls(personalizer)
    result = personalizer.respond(user, messages, max_new_tokens=n, **options)

    prompt_ids, new_ids = _reference(personalizer.generator, messages, n)
    [(kwargs, output)] = recorded
    torch.testing.assert_close(kwargs["input_ids"][0], prompt_ids, rtol=0, atol=0)
    torch.testing.assert_close(output[0, prompt_ids.shape[0] :], new_ids, rtol=0, atol=0)
    assert result.completion_tokens == new_ids.shape[0]
    assert result.prompt_tokens == prompt_ids.shape[0]
    assert result.text == personalizer.generator.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    assert result.memories == [] and result.shots == [] and result.steer == {}


def test_lively_model_depends_on_the_prompt(lively):
    # Guards the point of the ``lively`` fixture: different prompts give different greedy tokens.
    _, a = _reference(lively, ASK_EGG, 8)
    _, b = _reference(lively, ASK_DINNER, 8)
    assert a.tolist() != b.tolist()


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["pz", "lively_pz"])
def test_stream_yields_the_same_tokens_as_respond(request, calls, which):
    personalizer: Personalizer = request.getfixturevalue(which)
    personalizer.enroll("alice", [EGG, SKY])
    recorded = calls(personalizer)
    result = personalizer.respond("alice", ASK_EGG, max_new_tokens=10)
    pieces = list(personalizer.stream("alice", ASK_EGG, max_new_tokens=10))
    (_, responded), (_, streamed) = recorded
    torch.testing.assert_close(streamed, responded, rtol=0, atol=0)
    new_ids = responded[0, result.prompt_tokens :]
    assert "".join(pieces) == personalizer.generator.tokenizer.decode(new_ids, skip_special_tokens=True)
    assert "".join(personalizer.chat("alice", ASK_EGG, stream=True, max_new_tokens=10)) == "".join(pieces)


@pytest.mark.parametrize("which", ["pz", "lively_pz"])
def test_stream_concatenation_equals_respond_text(request, which):
    personalizer: Personalizer = request.getfixturevalue(which)
    text = personalizer.respond(None, ASK_EGG, max_new_tokens=10).text
    assert "".join(personalizer.stream(None, ASK_EGG, max_new_tokens=10)) == text


def test_streams_in_a_batch_equal_their_own_replies(lively_pz):
    lively_pz.enroll("alice", [EGG, SKY])
    streams = [TokenStream(), None, TokenStream()]
    requests = [
        {"user": "alice", "messages": ASK_EGG, "max_new_tokens": 10, "stream": streams[0]},
        {"user": None, "messages": ASK_DINNER, "max_new_tokens": 10},
        {"user": None, "messages": ASK_EGG, "max_new_tokens": 3, "stream": streams[2]},
    ]
    results = lively_pz.respond_batch(requests)
    for request, stream, result in zip(requests, streams, results, strict=True):
        options = {k: v for k, v in request.items() if k not in ("user", "messages", "stream")}
        assert result == lively_pz.respond(request["user"], request["messages"], **options)
        if stream is not None:
            assert stream.done and stream.result == result and "".join(stream) == result.text
    assert (
        results[2].completion_tokens == 3 and results[0].completion_tokens > 3
    )  # each row keeps its own limit
    with pytest.raises(ValidationError, match=r"requests\[0\]\.stream"):
        lively_pz.respond_batch([{"user": None, "messages": ASK_EGG, "stream": "yes"}])


def test_a_cancelled_stream_stops_its_generation(lively_pz):
    model = lively_pz.generator.model
    steps: list[int] = []
    hook = model.register_forward_hook(lambda *args: steps.append(1))
    try:
        assert (
            lively_pz.respond(None, ASK_EGG, max_new_tokens=40).completion_tokens == 40
        )  # the model does not stop by itself
        steps.clear()
        stream = TokenStream()
        stream.cancel()
        [result] = lively_pz.respond_batch(
            [{"user": None, "messages": ASK_EGG, "max_new_tokens": 40, "stream": stream}]
        )
        assert len(steps) <= 2 and result.completion_tokens <= 2
        steps.clear()
        pieces = lively_pz.stream(None, ASK_EGG, max_new_tokens=40)
        next(pieces)
        pieces.close()  # the consumer leaves after the first piece: generation stops soon after
        assert len(steps) < 40
    finally:
        hook.remove()


def test_stream_validates_before_returning(pz):
    with pytest.raises(ValidationError):
        pz.stream(None, ASK_EGG, steer={"verbosity": math.nan})
    with pytest.raises(ValidationError):
        pz.stream(None, [])


# --- steering -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steer", "field", "words"),
    [
        ({"humour": 1.0}, "steer.humour", "verbosity"),
        ({"verbosity": math.nan}, "steer.verbosity", "weight"),
        ({"verbosity": 100.0}, "steer.verbosity", "smaller"),
        ({"verbosity": "more"}, "steer.verbosity", "weight"),
    ],
)
def test_steering_validation(pz, calls, steer, field, words):
    recorded = calls(pz)
    pz.enroll("alice", [EGG])
    with pytest.raises(ValidationError) as info:
        pz.respond(None, ASK_EGG, steer=steer, max_new_tokens=2)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field and words in info.value.fix
    with pytest.raises(ValidationError):
        pz.set_steering("alice", steer)
    assert recorded == []
    assert "steer" not in pz.profile("alice").settings


def test_verbosity_steer_changes_generation(pz, calls):
    recorded = calls(pz)
    plain = pz.respond(None, ASK_EGG, max_new_tokens=12)
    shorter = pz.respond(None, ASK_EGG, steer={"verbosity": -5.0}, max_new_tokens=12)
    longer = pz.respond(None, ASK_EGG, steer={"verbosity": 5.0}, max_new_tokens=12)
    assert plain.completion_tokens == 12 and plain.steer == {}
    assert shorter.completion_tokens == 1 and shorter.text == ""  # EOS raised by 20: stops at once
    assert shorter.steer == {"verbosity": -5.0}
    assert longer.completion_tokens == 12
    eos = pz.generator.tokenizer.eos_token_id
    assert recorded[1][1][0, -1].item() == eos
    assert "logits_processor" not in recorded[0][0]  # no steering: no processor at all


def test_user_default_steering(pz):
    # Comparisons preferring short answers infer a negative verbosity weight, applied by default.
    short_pairs = [
        {
            "prompt": p,
            "chosen": "Yes.",
            "rejected": "Well, it is a long story with many details and caveats to consider.",
        }
        for p in ("Is water wet?", "Is fire hot?", "Is ice cold?")
    ]
    profile = pz.enroll("sam", short_pairs)
    inferred = profile.settings["inferred_steer"]["verbosity"]
    assert -1.0 <= inferred < -0.9
    assert pz.default_steer("sam") == {"verbosity": pytest.approx(inferred)}
    assert pz.respond("sam", ASK_EGG, max_new_tokens=4).steer == {"verbosity": pytest.approx(inferred)}
    pz.set_steering("sam", {"verbosity": 0.5})
    assert pz.respond("sam", ASK_EGG, max_new_tokens=4).steer == {"verbosity": 0.5}
    assert pz.respond("sam", ASK_EGG, steer={}, max_new_tokens=4).steer == {}
    pz.set_steering("sam", None)
    assert pz.default_steer("sam") == {"verbosity": pytest.approx(inferred)}
    with pytest.raises(UnknownUserError):
        pz.set_steering("nobody", {"verbosity": 0.5})


# --- shots and memories in the prompt ------------------------------------------------------


def test_shots_are_ranked_by_relevance_and_rendered(lively_pz, calls):
    lively_pz.enroll("alice", [SKY, DINNER, EGG])
    recorded = calls(lively_pz)
    result = lively_pz.respond("alice", ASK_EGG, max_new_tokens=4)
    assert [s.comparison.prompt for s in result.shots][0] == EGG["prompt"]
    assert len(result.shots) == 3
    relevances = [s.relevance for s in result.shots]
    assert relevances == sorted(relevances, reverse=True)
    prompt = _prompt_text(lively_pz, recorded[-1][0])
    assert prompt.count("## Preferred Response") == 3 and prompt.count("## Dispreferred Response") == 3
    assert TASK_LINE in prompt
    assert prompt.index("Nine minutes.") < prompt.index("Scattering.")  # most relevant shot first
    assert prompt.rstrip().endswith("How long should I boil an egg for?<|im_end|>\n<|im_start|>assistant")

    top = lively_pz.respond("alice", ASK_EGG, max_new_tokens=4, n_shots=1)
    assert [s.comparison.prompt for s in top.shots] == [EGG["prompt"]]
    assert _prompt_text(lively_pz, recorded[-1][0]).count("## Preferred Response") == 1
    bare = lively_pz.respond("alice", ASK_EGG, max_new_tokens=4, shots=False)
    assert bare.shots == [] and "## Preferred Response" not in _prompt_text(lively_pz, recorded[-1][0])
    assert bare.prompt_tokens < top.prompt_tokens < result.prompt_tokens


def test_memories_reach_the_prompt(lively_pz, calls):
    lively_pz.remember("alice", [VEGETARIAN, "My car is a red hatchback."])
    recorded = calls(lively_pz)
    result = lively_pz.respond("alice", ASK_DINNER, max_new_tokens=4)
    assert result.memories == [VEGETARIAN]  # the car fact is under the default threshold
    prompt = _prompt_text(lively_pz, recorded[-1][0])
    assert MEMORY_HEADER + f"- {VEGETARIAN}" in prompt and "hatchback" not in prompt
    off = lively_pz.respond("alice", ASK_DINNER, max_new_tokens=4, memory=False)
    assert off.memories == [] and MEMORY_HEADER not in _prompt_text(lively_pz, recorded[-1][0])


# --- fitting the context -------------------------------------------------------------------


def test_fit_to_context_drops_shots_then_memories(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    messages = parse_messages(ASK_EGG)
    s0, s1 = Shot(Comparison(**EGG), 0.9), Shot(Comparison(**SKY), 0.4)
    m0, m1 = VEGETARIAN, "My car is a red hatchback."

    def size(shots, memories):
        return count_prompt_tokens(tokenizer, build_conversation(messages, shots, memories))

    out = 10
    everything = fit_to_context(tokenizer, messages, [s0, s1], [m0, m1], size([s0, s1], [m0, m1]) + out, out)
    assert everything.shots == [s0, s1] and everything.memories == [m0, m1]

    one_shot = fit_to_context(tokenizer, messages, [s0, s1], [m0, m1], size([s0], [m0, m1]) + out, out)
    assert one_shot.shots == [s0] and one_shot.memories == [m0, m1]  # the least relevant shot goes first
    assert one_shot.prompt_tokens == size([s0], [m0, m1])

    one_memory = fit_to_context(tokenizer, messages, [s0, s1], [m0, m1], size([], [m0]) + out, out)
    assert one_memory.shots == [] and one_memory.memories == [m0]  # then the least relevant memory

    bare = fit_to_context(tokenizer, messages, [s0, s1], [m0, m1], size([], []) + out, out)
    assert bare.shots == [] and bare.memories == []
    assert bare.conversation == [m.model_dump() for m in messages]  # unchanged: the identity setting

    with pytest.raises(ContextLengthError) as info:
        fit_to_context(tokenizer, messages, [s0, s1], [m0, m1], size([], []) + out - 1, out)
    assert isinstance(info.value, ValueError)
    assert "max_new_tokens" in str(info.value) and "Fix:" in str(info.value)


def test_small_context_model_drops_shots_then_refuses(tiny_generator, encoder, tmp_path):
    tokenizer = tiny_generator.tokenizer
    messages = parse_messages(ASK_EGG)
    bare = count_prompt_tokens(tokenizer, build_conversation(messages, [], []))
    with_one_shot = count_prompt_tokens(
        tokenizer, build_conversation(messages, [Shot(Comparison(**EGG), 1.0)], [])
    )
    context = with_one_shot + 16  # room for one shot and up to 16 new tokens, not for two shots
    config = copy.deepcopy(tiny_generator.model.config)
    config.max_position_embeddings = context
    torch.manual_seed(0)
    small = Generator(type(tiny_generator.model)(config).eval(), tokenizer, "tiny-small-context")
    assert small.context_length == context
    with Personalizer(small, encoder, store=tmp_path / "small") as pz:
        pz.enroll("alice", [SKY, EGG, DINNER])
        roomy = pz.respond("alice", ASK_EGG, max_new_tokens=16, steer={})
        assert [s.comparison.prompt for s in roomy.shots] == [EGG["prompt"]]  # the most relevant one is kept
        assert roomy.prompt_tokens == with_one_shot
        tight = pz.respond("alice", ASK_EGG, max_new_tokens=context - bare, steer={})
        assert tight.shots == [] and tight.prompt_tokens == bare
        assert tight.prompt_tokens + tight.completion_tokens <= context
        with pytest.raises(ContextLengthError):
            pz.respond("alice", ASK_EGG, max_new_tokens=context - bare + 1)
        with pytest.raises(ContextLengthError):
            pz.respond(None, [{"role": "user", "content": "egg " * context}], max_new_tokens=1)


def test_results_serialise(pz):
    pz.enroll("alice", [EGG])
    pz.remember("alice", VEGETARIAN)
    assert json.dumps(pz.memories("alice"))
    assert json.loads(pz.profile("alice").model_dump_json())["user_id"] == "alice"
