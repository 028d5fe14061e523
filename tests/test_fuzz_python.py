"""hypothesis over the Python API: every refusal is a typed ``PersonalignError``, and a refused call stores nothing.

Each test draws arguments for one method of :class:`Personalizer` from a mix of valid values and
adversarial ones (``None``, wrong types, ``2**70``, NaN and infinities, a lone surrogate,
empty, blank and very long strings, odd user ids, malformed messages and comparisons) and calls
it on a store holding ``alice``. A call may succeed or raise; what it raises must be a
``personalign.errors.PersonalignError`` (its subclasses also inherit the matching builtin), never
a bare ``TypeError`` or ``KeyError`` from deep inside, and after a refusal the store holds what it
held before. Seeded and derandomised (the same calls every run); the tiny Llama generates at
most 3 tokens. The file takes about 15 s on 2 CPU cores.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalign.errors import PersonalignError

EXAMPLES = int(os.environ.get("PERSONALIGN_FUZZ_EXAMPLES", 100))  # per method; more for a longer hunt
CALLS: Counter[tuple[str, str]] = Counter()  # (method, outcome) over the run
ALICE = "alice"
EGG = {"prompt": "How do I boil an egg?", "chosen": "Nine minutes in boiling water.", "rejected": "No."}

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# --- adversarial values ---------------------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(["", " ", "\n\t ", "\ud800", "a\ud800b", "x" * 20_000, "\x00", "$where", "é" * 3])
ODD_NUMBER = st.sampled_from([2**70, -(2**70), math.nan, math.inf, -math.inf, -1, 0, 1.5, 10**6, True])
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    ODD_TEXT,
    ODD_NUMBER,
    st.binary(max_size=4),
    st.just(object()),
)
JUNK = st.one_of(
    SCALAR, st.lists(SCALAR, max_size=3), st.dictionaries(st.text(max_size=5), SCALAR, max_size=3)
)
USER = st.one_of(
    st.just(ALICE),
    st.sampled_from(
        ["bob", "", " ", "..", "../etc", "a/b", "bob\n", "a" * 300, "\ud800", "esc+x", "名前", "a..b"]
    ),
    JUNK,
)
TEXT = st.one_of(st.text(max_size=40), ODD_TEXT, JUNK)
ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "developer", "", "USER"]), JUNK)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLE, "content": TEXT}),
    st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}, optional={"name": JUNK, "extra": JUNK}),
    JUNK,
)
MESSAGES = st.one_of(
    st.just([{"role": "user", "content": "Plan my dinner."}]),
    st.lists(MESSAGE, max_size=3),
    st.tuples(MESSAGE),
    JUNK,
)
COMPARISON = st.one_of(
    st.just(EGG),
    st.fixed_dictionaries(
        {"prompt": TEXT, "chosen": TEXT, "rejected": TEXT},
        optional={"weight": st.one_of(ODD_NUMBER, JUNK), "created_at": ODD_NUMBER, "metadata": JUNK},
    ),
    st.fixed_dictionaries({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES}),
    JUNK,
)
COMPARISONS = st.one_of(st.lists(COMPARISON, max_size=3), COMPARISON, JUNK)
METADATA = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(st.text(max_size=8), ODD_TEXT, st.sampled_from(["$in", "#x", "chroma:document"])),
        SCALAR,
        max_size=3,
    ),
    JUNK,
)
# a few tokens at most when valid: the tiny model stays fast
MAX_NEW = st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 2**70, 10**6, 1.5, "3", True, math.nan]))
OPTIONS = st.fixed_dictionaries(
    {"max_new_tokens": MAX_NEW},
    optional={
        "temperature": st.one_of(st.floats(0, 2), ODD_NUMBER, JUNK),
        "top_p": st.one_of(st.floats(0, 1), ODD_NUMBER),
        "seed": st.one_of(st.integers(), ODD_NUMBER, JUNK),
        "repetition_penalty": ODD_NUMBER,
        "n_memories": st.one_of(st.integers(-2, 200), JUNK),
        "memory_threshold": ODD_NUMBER,
        "shots": JUNK,
        "stop": JUNK,
        "no_such_option": JUNK,
    },
)
STEER = st.one_of(
    st.none(),
    st.just({}),
    st.dictionaries(
        st.sampled_from(["verbosity", "structure", "nope", ""]),
        st.one_of(ODD_NUMBER, st.floats()),
        max_size=2,
    ),
    st.fixed_dictionaries({"angle": st.one_of(ODD_NUMBER, st.floats()), "objectives": JUNK}),
    JUNK,
)


# --- the store ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pz(tiny_generator, encoder, tmp_path_factory):
    from personalign.personalizer import Personalizer

    with Personalizer(
        tiny_generator, encoder, store=tmp_path_factory.mktemp("fuzz") / "store"
    ) as personalizer:
        yield personalizer


def ready(pz: Any) -> Any:
    """``pz`` with ``alice`` holding two comparisons and two memories (an earlier call may have edited her)."""
    if not pz.is_enrolled(ALICE) or len(pz.profile(ALICE).comparisons) < 2:
        pz.enroll(ALICE, [EGG, {**EGG, "prompt": "How long for a soft egg?", "chosen": "Six minutes."}])
    if pz.memory_count(ALICE) < 2:
        pz.remember(ALICE, ["I am vegetarian.", "I cook for two."], {"topic": "food"})
    return pz


def snapshot(pz: Any, user: Any) -> Any:
    """Everything stored that a call on ``user`` could touch: the user list, and ``alice``'s and ``user``'s data."""
    state: list[Any] = [sorted(pz.users())]
    for who in {ALICE, user} if isinstance(user, str) else {ALICE}:
        try:
            profile = pz.profile(who).model_dump(mode="json") if pz.is_enrolled(who) else None
            memories = pz.memories(who, status="all")["results"]
        except PersonalignError as err:  # an id the store refuses holds nothing
            state.append(type(err).__name__)
            continue
        state.append((who, profile, memories))
    return state


def attempt(pz: Any, method: str, user: Any, call: Any) -> Any:
    """Run ``call``; a refusal must be typed and leave the store as it was."""
    before = snapshot(pz, user)
    try:
        result = call()
    except PersonalignError as err:
        CALLS[(method, type(err).__name__)] += 1
        assert snapshot(pz, user) == before, f"{method} raised {err!r} but changed the store"
        return None
    except Exception as err:  # noqa: BLE001 (the point: nothing untyped escapes)
        CALLS[(method, "UNTYPED " + type(err).__name__)] += 1
        raise AssertionError(f"{method} raised an untyped {type(err).__name__}: {err!r}") from err
    CALLS[(method, "ok")] += 1
    return result


# --- one property per method ---------------------------------------------------------------------------------
# Each example draws every argument valid, then spoils none of them, one, or several (each with odds of one in two):
# calls that succeed reach the code behind the checks, and each refusal has one cause to name.


def draw_args(data: Any, valid: dict[str, Any], bad: dict[str, Any]) -> dict[str, Any]:
    spoil = data.draw(st.sampled_from([None, "several", *bad]), label="spoiled")
    args = {}
    for name, strategy in valid.items():
        broken = name in bad and (spoil == name or (spoil == "several" and data.draw(st.booleans())))
        args[name] = data.draw(bad[name] if broken else strategy, label=name)
    return args


VALID_USER = st.sampled_from([ALICE, "bob", "auth0.5f7c", "u-1"])
VALID_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)


@FUZZ
@given(data=st.data())
def test_enroll(pz, data):
    valid = {"user": VALID_USER, "comparisons": st.lists(st.just(EGG), min_size=1, max_size=2)}
    args = draw_args(data, valid, {"user": USER, "comparisons": COMPARISONS})
    attempt(ready(pz), "enroll", args["user"], lambda: pz.enroll(**args))


@FUZZ
@given(data=st.data())
def test_remember(pz, data):
    valid = {
        "user": VALID_USER,
        "text": st.one_of(VALID_TEXT, st.lists(VALID_TEXT, min_size=1, max_size=2)),
        "metadata": st.one_of(st.none(), st.just({"topic": "food", "n": 2})),
        "key": st.none(),
        "on_conflict": st.sampled_from(["keep", "supersede"]),
    }
    bad = {
        "user": USER,
        "text": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
        "metadata": METADATA,
        "key": st.one_of(st.sampled_from(["", "a b", "x" * 100, "k\n"]), JUNK),
        "on_conflict": JUNK,
    }
    args = draw_args(data, valid, bad)
    attempt(ready(pz), "remember", args["user"], lambda: pz.remember(**args))


@FUZZ
@given(data=st.data(), chat=st.booleans())
def test_respond_and_chat(pz, data, chat):
    valid = {
        "user": st.one_of(st.none(), VALID_USER),
        "messages": st.just([{"role": "user", "content": "Plan my dinner."}]),
        "steer": st.one_of(st.none(), st.just({}), st.just({"verbosity": -0.5})),
        "options": st.fixed_dictionaries({"max_new_tokens": st.integers(1, 3)}),
    }
    args = draw_args(data, valid, {"user": USER, "messages": MESSAGES, "steer": STEER, "options": OPTIONS})
    options = args.pop("options")
    call = pz.chat if chat else pz.respond
    attempt(ready(pz), "chat" if chat else "respond", args["user"], lambda: call(**args, **options))


FILTERS = st.one_of(
    st.just({"topic": {"in": ["food", 2**70]}}),
    st.just({"created_at": {"gte": math.nan}}),
    st.just({"nope": 1}),
    st.just({"topic": {"$where": 1}}),
    JUNK,
)


@FUZZ
@given(data=st.data(), search=st.booleans())
def test_memories_and_search(pz, data, search):
    valid = {
        "user": VALID_USER,
        "filters": st.one_of(st.none(), st.just({"topic": "food"})),
        "status": st.sampled_from(["active", "superseded", "all"]),
    }
    bad = {"user": USER, "filters": FILTERS, "status": JUNK}
    if search:
        valid |= {
            "query": VALID_TEXT,
            "top_k": st.integers(1, 5),
            "threshold": st.one_of(st.none(), st.floats(-1, 1)),
        }
        bad |= {
            "query": TEXT,
            "top_k": st.one_of(st.integers(-1, 0), ODD_NUMBER, JUNK),
            "threshold": ODD_NUMBER,
        }
    else:
        valid |= {"limit": st.one_of(st.none(), st.integers(1, 5))}
        bad |= {"limit": st.one_of(st.integers(-1, 0), ODD_NUMBER, JUNK)}
    args = draw_args(data, valid, bad)
    method = pz.search_memories if search else pz.memories
    attempt(ready(pz), method.__name__, args["user"], lambda: method(**args))


@FUZZ
@given(data=st.data())
def test_edit_comparisons(pz, data):
    valid = {
        "user": st.just(ALICE),
        "remove": st.sampled_from([[], [0]]),
        "replace": st.one_of(st.none(), st.just({1: EGG})),
    }
    bad = {
        "user": USER,
        "remove": st.one_of(st.lists(st.one_of(st.integers(-2, 3), ODD_NUMBER, JUNK), max_size=2), JUNK),
        "replace": st.one_of(
            st.dictionaries(
                st.one_of(st.integers(-1, 3), ODD_NUMBER, st.text(max_size=2)), COMPARISON, max_size=2
            ),
            JUNK,
        ),
    }
    args = draw_args(data, valid, bad)
    attempt(ready(pz), "edit_comparisons", args["user"], lambda: pz.edit_comparisons(**args))


@FUZZ
@given(data=st.data(), which=st.sampled_from(["reward", "predict"]))
def test_reward_and_predict(pz, data, which):
    valid = {"user": VALID_USER, "prompt": VALID_TEXT}
    bad = {"user": USER, "prompt": TEXT}
    if which == "reward":
        valid["responses"] = st.lists(VALID_TEXT, min_size=1, max_size=3)
        bad["responses"] = st.one_of(st.lists(TEXT, max_size=3), JUNK)
    else:
        valid |= {"a": st.just("Nine minutes."), "b": st.just("No.")}
        bad |= {"a": TEXT, "b": TEXT}
    args = draw_args(data, valid, bad)
    method = getattr(pz, which)
    result = attempt(ready(pz), which, args["user"], lambda: method(**args))
    if which == "reward":
        assert result is None or all(math.isfinite(r) for r in result)
    else:
        assert result is None or 0.0 <= result <= 1.0


def test_zz_counts():
    """Runs last: how many calls each method got, and how they ended (no untyped errors, or a test above failed)."""
    by_method: dict[str, Counter[str]] = {}
    for (method, outcome), count in CALLS.items():
        by_method.setdefault(method, Counter())[outcome] += count
    for method, outcomes in sorted(by_method.items()):
        print(f"\n{method}: {sum(outcomes.values())} calls {dict(outcomes.most_common())}", end="")
    print(f"\ntotal: {sum(CALLS.values())} calls")
    assert not [key for key in CALLS if key[1].startswith("UNTYPED")]


# --- what the fuzzing found, one call each (fixed in src/): each raised an untyped error before -----------------

FOUND = {
    "enroll(chosen=surrogate)": lambda pz: pz.enroll(
        ALICE, [{**EGG, "chosen": "a\ud800"}]
    ),  # encoder TypeError
    # transformers divided the logits by a penalty that is 0 in float32: RuntimeError from torch.multinomial
    "respond(repetition_penalty=5e-324)": lambda pz: pz.respond(
        ALICE,
        [{"role": "user", "content": "hi"}],
        max_new_tokens=1,
        temperature=1.0,
        repetition_penalty=5e-324,
    ),
    "enroll(u, None)": lambda pz: pz.enroll(ALICE, None),  # TypeError from parse_comparisons
    "respond(u, None)": lambda pz: pz.respond(ALICE, None, max_new_tokens=1),  # TypeError from parse_messages
    "edit_comparisons(remove=None)": lambda pz: pz.edit_comparisons(ALICE, remove=None),  # TypeError
    "edit_comparisons(remove=[None, 0])": lambda pz: pz.edit_comparisons(
        ALICE, remove=[None, 0]
    ),  # sort TypeError
    "edit_comparisons(replace=[1])": lambda pz: pz.edit_comparisons(ALICE, replace=[1]),  # dict() ValueError
    "remember(metadata={'$in': 1})": lambda pz: pz.remember(
        ALICE, "x", {"$in": 1}
    ),  # chromadb InvalidArgumentError
    "remember(metadata={'': 1})": lambda pz: pz.remember(ALICE, "x", {"": 1}),
    "remember(metadata={'n': 2**70})": lambda pz: pz.remember(ALICE, "x", {"n": 2**70}),
    "remember(metadata={'s': surrogate})": lambda pz: pz.remember(ALICE, "x", {"s": "\ud800"}),
    "memories(filters in mixed)": lambda pz: pz.memories(
        ALICE, filters={"topic": {"in": ["food", 1]}}
    ),  # ValueError
    "memories(filters in 2**70)": lambda pz: pz.memories(ALICE, filters={"topic": {"in": [2**70]}}),
    "predict(prompt=surrogate)": lambda pz: pz.predict(ALICE, "\ud800", "a", "b"),  # tokenizer TypeError
    "reward(responses=[surrogate])": lambda pz: pz.reward(ALICE, "p", ["\ud800"]),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_found_by_fuzzing(pz, name):
    from personalign.errors import ValidationError

    before = snapshot(ready(pz), ALICE)
    with pytest.raises(ValidationError):
        FOUND[name](pz)
    assert snapshot(pz, ALICE) == before
