"""Conditioners compose per request: memory, FSPO shots, the FSPO adapter, the Persona-Plug token."""

from __future__ import annotations

import pytest

from personalign.personalizer import Personalizer
from personalign.types import Comparison

SHOTS = [
    Comparison(prompt=f"Question {i} about eggs?", chosen=f"Boil it {i} minutes.", rejected="No.")
    for i in range(3)
]
MSGS = [{"role": "user", "content": "Question 9 about eggs?"}]
ALL_OFF = {"memory": False, "shots": False, "fspo": False, "pplug": False, "adapter": False, "steer": {}}


def _fresh(tiny_model_dir):
    from personalign.models import load_generator

    return load_generator(str(tiny_model_dir), device="cpu")


@pytest.fixture()
def both(tiny_model_dir, encoder, fspo_folder, pplug_folder, tmp_path):
    """A Personalizer with the FSPO adapter and the projector, and a plain one; ann enrolled in both."""
    with (
        Personalizer(
            _fresh(tiny_model_dir), encoder, tmp_path / "a", fspo=fspo_folder, pplug=pplug_folder
        ) as pz,
        Personalizer(_fresh(tiny_model_dir), encoder, tmp_path / "b") as plain,
    ):
        for p in (pz, plain):
            p.enroll("ann", SHOTS)
            p.remember("ann", "I boil my eggs for nine minutes, about eggs.")
        yield pz, plain


def test_all_off_reproduces_plain_generate(both):
    pz, plain = both
    reference = plain.chat(None, MSGS, max_new_tokens=10)
    assert pz.chat("ann", MSGS, max_new_tokens=10, **ALL_OFF) == reference
    assert pz.chat(None, MSGS, max_new_tokens=10) == reference  # no user: nothing to condition on


@pytest.mark.parametrize(
    "options",
    [
        {"memory": True},
        {"shots": True},
        {"shots": True, "fspo": True},
        {"pplug": True},
        {"memory": True, "shots": True, "fspo": True, "pplug": True},
    ],
)
def test_each_conditioner_alone_and_together_changes_the_answer_and_batches_exactly(both, options):
    pz, plain = both
    opts = {**ALL_OFF, **options, "max_new_tokens": 10, "memory_threshold": None}
    single = pz.respond("ann", MSGS, **opts)
    assert single.text != plain.chat(None, MSGS, max_new_tokens=10)
    # in a batch with plain rows and other conditioners, each row gives what it gives alone
    batch = pz.chat_batch(
        [
            {"user": "ann", "messages": MSGS, **opts},
            {"user": None, "messages": MSGS, "max_new_tokens": 10},
            {"user": "ann", "messages": MSGS, **ALL_OFF, "pplug": True, "max_new_tokens": 10},
        ]
    )
    assert batch[0] == single.text
    assert batch[1] == plain.chat(None, MSGS, max_new_tokens=10)
    assert batch[2] == pz.chat("ann", MSGS, **{**ALL_OFF, "pplug": True}, max_new_tokens=10)
    if options.get("memory"):
        assert single.memories == ["I boil my eggs for nine minutes, about eggs."]


def test_plug_streams_the_same_tokens(both):
    pz, _ = both
    opts = {**ALL_OFF, "pplug": True, "max_new_tokens": 10}
    assert "".join(pz.stream("ann", MSGS, **opts)).strip() == pz.chat("ann", MSGS, **opts)


def test_plug_history_is_the_users_own(both):
    pz, _ = both
    pz.enroll("bob", [Comparison(prompt="Hi?", chosen="Hello there, friend.", rejected="Go away.")])
    assert pz.history_items("bob") == ["Hello there, friend."]
    assert pz.history_items("ann") == [c.chosen for c in SHOTS] + [
        "I boil my eggs for nine minutes, about eggs."
    ]
    opts = {k: v for k, v in ALL_OFF.items() if k != "steer"} | {"pplug": True}
    bob, ann = (pz.engine.prepare(u, MSGS, {}, opts).plug for u in ("bob", "ann"))
    assert bob.shape == ann.shape and not bool((bob - ann).abs().max() < 1e-4)
    assert pz.engine.prepare("ann", MSGS, {}, {**opts, "pplug": False}).plug is None


def test_plug_for_another_generator_is_refused(tiny_generator, encoder, tmp_path):
    from conftest import build_tiny_llama, build_tokenizer
    from personalign.conditioning.pplug import PlugMismatchError, build_plug, save_plug
    from personalign.models import load_generator

    tokenizer = build_tokenizer()
    other = tmp_path / "wide"
    model = build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, hidden_size=48)
    assert (
        model.config.hidden_size != tiny_generator.model.config.hidden_size
    )  # really another, wider generator
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    folder = save_plug(build_plug(load_generator(str(other), device="cpu"), encoder), tmp_path / "p")
    with pytest.raises(PlugMismatchError, match="projector.base_model.*personalign train pplug"):
        Personalizer(tiny_generator, encoder, tmp_path / "s", pplug=folder)


def test_history_too_long_for_the_context_is_a_typed_error(pz):
    from personalign.errors import ContextLengthError

    pz.enroll("ann", SHOTS)
    with pytest.raises(ContextLengthError, match="messages: the conversation takes .* Fix: shorten"):
        pz.chat("ann", [{"role": "user", "content": "eggs " * 600}], max_new_tokens=10)


def test_context_turn_first_keeps_the_personal_block_in_the_first_turn(pz):
    """``context_turn="first"``: memories and shots are retrieved for, and written into, the
    conversation's first user turn, so a later turn's prompt begins with the earlier turn's whole
    prompt (what a prompt cache reuses); the default keeps them in the latest turn."""
    from personalign.conditioning.fspo import build_conversation, query_of
    from personalign.types import ChatMessage

    pz.enroll("ann", SHOTS)
    pz.remember("ann", "I boil my eggs for nine minutes, about eggs.")
    pz.remember("ann", "My dog is called Rex and loves long walks.")
    first = [{"role": "user", "content": "Question 9 about eggs?"}]
    second = [
        *first,
        {"role": "assistant", "content": "Nine minutes."},
        {"role": "user", "content": "And my dog, how far should we walk?"},
    ]

    def ids(messages, turn):
        return pz.engine.prepare("ann", messages, {}, {"context_turn": turn, "max_new_tokens": 4}).input_ids

    one, two = ids(first, "first"), ids(second, "first")
    assert two[: len(one)] == one  # the first turn's whole prompt is where the second one starts
    last_one, last_two = ids(first, "last"), ids(second, "last")
    shared = next(i for i, (a, b) in enumerate(zip(last_one, last_two, strict=False)) if a != b)
    assert shared < len(last_one) // 2  # the default: the block moves to the latest turn
    cond = pz.condition("ann", second, 8, pz_conditioning(context_turn="first"))
    assert cond.memories[0].startswith("I boil my eggs")  # retrieved for the first (eggs) question
    assert cond.conversation[0]["content"].endswith(first[0]["content"])
    assert cond.conversation[0]["content"] != first[0]["content"]  # the block is in the first turn
    assert cond.conversation[-1]["content"] == second[-1]["content"]  # the latest turn as the user wrote it
    default = pz.condition("ann", second, 8, pz_conditioning())
    assert (
        default.conversation[0]["content"] == first[0]["content"]
    )  # the default: the block in the latest turn
    assert default.conversation[-1]["content"] != second[-1]["content"]
    # the pieces, golden
    parsed = [ChatMessage(**m) for m in second]
    assert query_of(parsed, "first") == "Question 9 about eggs?"
    assert query_of(parsed) == "And my dog, how far should we walk?"
    built = build_conversation(parsed, [], ["m1"], "first")
    assert built[0]["content"].endswith("Question 9 about eggs?") and built[2] == second[2]
    with pytest.raises(Exception, match="context_turn"):
        pz.chat("ann", first, max_new_tokens=4, context_turn="middle")


def pz_conditioning(**options):
    from personalign.chat import ConditioningParams

    return ConditioningParams(**options)
