"""OpenAI request fields beyond the basics, on the real server: personal reranking, ``stop``, ``n``,
``GET /v1/models/{id}`` and ``max_tokens`` over the cap.

The server runs on loopback (as in test_server.py) over the tiny Llama with its weights redrawn
at std 0.5, so sampled rows differ from each other and replies are long enough to cut. Replies
are compared with the Python API: the server must answer what ``respond``/``respond_batch``
give for the same request.
"""

from __future__ import annotations

import json

import openai
import pytest

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig
from personalign.server.stops import StopScanner, cut
from personalign.steering.decoding import derived_seed

CONFIG = ServerConfig(
    max_tokens_cap=16,
    default_max_tokens=12,
    max_body_bytes=64_000,
    batch_wait_ms=20,
    max_choices=4,
    default_temperature=0.0,
)  # greedy, as respond
EGG = {
    "prompt": "How do I boil an egg?",
    "chosen": "Nine minutes.",
    "rejected": "It depends on many things about the egg, and here is a long story.",
}
ASK = [{"role": "user", "content": "How long should I boil an egg for?"}]
PLAIN = {"memory": False, "shots": False, "steer": {}}  # the reply depends on the decoding options only
SAMPLED = {"temperature": 0.8, "seed": 3}


@pytest.fixture(scope="module")
def personalizer(lively, encoder, tmp_path_factory):
    with Personalizer(lively, encoder, store=tmp_path_factory.mktemp("fields-store")) as pz:
        pz.enroll("ana", [EGG])
        yield pz


def _events(http, body):
    """The parsed chunks of a stream (without ``[DONE]``, which must end it)."""
    with http.stream(
        "POST", "/v1/chat/completions", json={"model": "personalign", "stream": True, **body}
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def _texts(chunks):
    """Each choice's streamed text and finish reason, by index."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
            if choice["finish_reason"] is not None:
                finishes[choice["index"]] = choice["finish_reason"]
    return texts, finishes


def _error(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error


# --- personal reranking ------------------------------------------------------------------------------


def test_rerank_over_http_picks_as_the_python_api_and_reports_it(client, http, personalizer):
    reply = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        user="ana",
        max_tokens=8,
        **SAMPLED,
        extra_body={"rerank": 4, **PLAIN},
    )
    alone = personalizer.respond("ana", ASK, rerank=4, max_new_tokens=8, **SAMPLED, **PLAIN)
    report = reply.model_extra["personalign"]["personalization"]
    assert reply.choices[0].message.content == alone.text and report == alone.personalization
    assert report["method"] == "user-rerank" and report["candidates"] == 4 and len(report["scores"]) == 4
    scored = [i for i in range(4) if report["scores"][i] is not None]  # None: an empty candidate
    assert (
        report["picked"] == max(scored, key=lambda i: (report["scores"][i], -i))
        and report["temperature"] == 0.8
    )
    # Streamed: the picked reply, and the report on the last chunk.
    chunks = _events(http, {"messages": ASK, "user": "ana", "max_tokens": 8, **SAMPLED, "rerank": 4, **PLAIN})
    texts, finishes = _texts(chunks)
    assert texts[0].strip() == alone.text and finishes[0] in ("stop", "length")
    assert chunks[-1]["personalign"]["personalization"] == alone.personalization
    # A greedy request samples its candidates at rerank_temperature.
    greedy = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        user="ana",
        max_tokens=4,
        extra_body={"rerank": 2, "rerank_temperature": 0.6, **PLAIN},
    )
    assert greedy.model_extra["personalign"]["personalization"]["temperature"] == 0.6
    # Not asked for: null. Asked for a user the server does not know: the generic answer, and why.
    assert (
        client.chat.completions.create(
            model="personalign", messages=ASK, user="ana", max_tokens=2
        ).model_extra["personalign"]["personalization"]
        is None
    )
    stranger = client.chat.completions.create(
        model="personalign", messages=ASK, user="nobody-yet", max_tokens=4, extra_body={"rerank": 4}
    ).model_extra["personalign"]
    assert (
        stranger["personalization"]["method"] is None
        and stranger["personalization"]["requested"] == "user-rerank"
        and not stranger["user_known"]
    )


def test_rerank_with_an_empty_candidate_answers(client, personalizer, monkeypatch):
    """A sampled candidate that is empty (the model ended at once) must not fail the chat."""
    real = personalizer.generator.model.generate

    def one_empty(*args, **kwargs):
        output = real(*args, **kwargs)
        output[1, kwargs["input_ids"].shape[1] :] = (
            personalizer.generator.tokenizer.eos_token_id
        )  # candidate 1 ends at once
        return output

    monkeypatch.setattr(personalizer.generator.model, "generate", one_empty)
    reply = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        user="ana",
        max_tokens=6,
        **SAMPLED,
        extra_body={"rerank": 3, **PLAIN},
    )
    report = reply.model_extra["personalign"]["personalization"]
    assert (
        report["candidates"] == 3 and report["scores"][1] is None and report["picked"] != 1
    )  # the empty one is not scored, nor picked


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rerank", 17),
        ("rerank", -1),
        ("rerank", "four"),
        ("rerank", 2.5),
        ("rerank_temperature", 0),
        ("rerank_temperature", 9),
        ("rerank_temperature", "hot"),
    ],
)
def test_rerank_bad_values_are_400_naming_the_field(http, field, value):
    response = http.post(
        "/v1/chat/completions", json={"model": "personalign", "messages": ASK, "user": "ana", field: value}
    )
    _error(response, field)


# --- stop ----------------------------------------------------------------------------------------------


def test_stop_golden_values():
    assert cut("Hello world. Bye", ["."]) == ("Hello world", True)
    assert cut("abcd", ["abcd", "bc"]) == (
        "a",
        True,
    )  # the stop string complete first wins, as when generating
    assert cut("abc", ["x"]) == ("abc", False) and cut("xabc", ["x"]) == ("", True)
    scanner = StopScanner(["\n\nUser:"])
    assert [scanner.feed(p) for p in ("Hi", " there\n", "\nUs", "ed it")] == [
        "Hi",
        " there",
        "",
        "\n\nUsed it",
    ]
    scanner = StopScanner(["\n\nUser:"])
    assert (
        [scanner.feed(p) for p in ("Hi\n", "\nUser", ": more")] == ["Hi", "", ""]
        and scanner.stopped
        and scanner.flush() == ""
    )


def test_stop_cuts_the_reply_before_the_stop_string(client, http):
    full = client.chat.completions.create(model="personalign", messages=ASK, max_tokens=16, extra_body=PLAIN)
    text = full.choices[0].message.content
    assert len(text) > 12, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    reply = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=16, stop=stop, extra_body=PLAIN
    )
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert 0 < reply.usage.completion_tokens < full.usage.completion_tokens
    # A list: the first stop string in the text wins; strings not in the reply change nothing.
    listed = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=16, stop=["never in it \u2603", stop], extra_body=PLAIN
    )
    assert listed.choices[0].message.content == expected
    missing = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=16, stop=["never in it \u2603"], extra_body=PLAIN
    )
    assert (
        missing.choices[0].message.content == text
        and missing.choices[0].finish_reason == full.choices[0].finish_reason
    )
    # Streamed: no text past the stop string, the same text as the whole reply.
    chunks = _events(
        http,
        {
            "messages": ASK,
            "max_tokens": 16,
            "stop": [stop],
            **PLAIN,
            "stream_options": {"include_usage": True},
        },
    )
    texts, finishes = _texts(chunks)
    assert texts[0] == expected and finishes == {0: "stop"} and stop not in "".join(texts.values())
    assert chunks[-1]["usage"]["completion_tokens"] == reply.usage.completion_tokens
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="personalign", messages=ASK, max_tokens=16, stop=stop, stream=True, extra_body=PLAIN
        )
        if c.choices
    )
    assert streamed == expected
    # A stop string at the very start leaves an empty reply.
    first = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=16, stop=text[:2], extra_body=PLAIN
    )
    assert (
        first.choices[0].message.content == ""
        and first.choices[0].finish_reason == "stop"
        and first.usage.completion_tokens == 0
    )


def test_stop_ends_generating_at_the_stop_string(client, personalizer, monkeypatch):
    """A reply cut at a stop string stops its row there: the generate call returns after fewer steps."""
    steps = []
    real = personalizer.generator.model.generate

    def spy(*args, **kwargs):
        output = real(*args, **kwargs)
        steps.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(personalizer.generator.model, "generate", spy)
    full = client.chat.completions.create(model="personalign", messages=ASK, max_tokens=16, extra_body=PLAIN)
    text = full.choices[0].message.content
    stop = text[2:5]
    reply = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=16, stop=stop, extra_body=PLAIN
    )
    assert (
        reply.choices[0].message.content == text[: text.find(stop)]
        and reply.choices[0].finish_reason == "stop"
    )
    assert len(steps) == 2 and steps[1] < steps[0] == full.usage.completion_tokens, steps


@pytest.mark.parametrize(
    ("stop", "param"),
    [
        (["a", "b", "c", "d", "e"], "stop"),
        (["a", ""], "stop[1]"),
        (5, "stop"),
        ([5], "stop[0]"),
        ("x" * 1001, "stop"),
        ({"a": 1}, "stop"),
    ],
)
def test_bad_stop_is_400_naming_the_field(http, stop, param):
    _error(
        http.post("/v1/chat/completions", json={"model": "personalign", "messages": ASK, "stop": stop}), param
    )


def test_empty_stop_is_no_stop(http):
    for stop in ("", [], None):
        assert (
            http.post(
                "/v1/chat/completions",
                json={"model": "personalign", "messages": ASK, "stop": stop, "max_tokens": 2},
            ).status_code
            == 200
        )


# --- n -------------------------------------------------------------------------------------------------


def test_n_sampled_choices_are_rows_of_one_batch(client, http, personalizer):
    reply = client.chat.completions.create(
        model="personalign", messages=ASK, user="ana", n=3, max_tokens=8, **SAMPLED, extra_body=PLAIN
    )
    # choice i samples with seed derived_seed(3, i) (choice 0 with 3 itself), whatever shares its batch
    rows = personalizer.respond_batch(
        [
            {
                "user": "ana",
                "messages": ASK,
                "max_new_tokens": 8,
                **SAMPLED,
                **PLAIN,
                "seed": derived_seed(3, i),
            }
            for i in range(3)
        ]
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [r.text for r in rows] and len(
        {r.text for r in rows}
    ) > 1
    assert (
        reply.usage.completion_tokens == sum(r.completion_tokens for r in rows)
        and reply.usage.prompt_tokens == rows[0].prompt_tokens
    )
    # Streamed: every choice by its index, the same texts.
    chunks = _events(
        http,
        {
            "messages": ASK,
            "user": "ana",
            "n": 3,
            "max_tokens": 8,
            **SAMPLED,
            **PLAIN,
            "stream_options": {"include_usage": True},
        },
    )
    texts, finishes = _texts(chunks)
    assert [texts[i].strip() for i in range(3)] == [r.text for r in rows] and set(finishes) == {0, 1, 2}
    assert chunks[-1]["usage"]["completion_tokens"] == reply.usage.completion_tokens
    assert [c for c in chunks if "personalign" in c] == [chunks[-2]]  # on the last finish chunk only
    # With reranking, each choice is reranked on its own and reports its own pick.
    reranked = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        user="ana",
        n=2,
        max_tokens=6,
        **SAMPLED,
        extra_body={"rerank": 2, **PLAIN},
    )
    by_choice = reranked.model_extra["personalign"]["personalization_by_choice"]
    assert [p["method"] for p in by_choice] == ["user-rerank"] * 2 and by_choice[0] == reranked.model_extra[
        "personalign"
    ]["personalization"]


def test_n_greedy_choices_are_equal_and_one_row_is_run(client, http, server):
    one = client.chat.completions.create(model="personalign", messages=ASK, max_tokens=8, extra_body=PLAIN)
    before = http.get("/v1/server/stats").json()["requests"]
    reply = client.chat.completions.create(
        model="personalign", messages=ASK, n=4, max_tokens=8, extra_body=PLAIN
    )
    assert http.get("/v1/server/stats").json()["requests"] - before == 1
    assert [c.message.content for c in reply.choices] == [one.choices[0].message.content] * 4
    assert reply.usage.completion_tokens == 4 * one.usage.completion_tokens
    streamed = list(
        client.chat.completions.create(
            model="personalign", messages=ASK, n=2, max_tokens=8, stream=True, extra_body=PLAIN
        )
    )
    texts = {
        i: "".join(
            c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i
        )
        for i in (0, 1)
    }
    assert texts[0].strip() == texts[1].strip() == one.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="cap of 4 choices"):
        client.chat.completions.create(model="personalign", messages=ASK, n=5)
    _error(http.post("/v1/chat/completions", json={"model": "personalign", "messages": ASK, "n": 0}), "n")
    _error(http.post("/v1/chat/completions", json={"model": "personalign", "messages": ASK, "n": "2"}), "n")


# --- models, max_tokens ----------------------------------------------------------------------------------


def test_retrieve_model(client, http):
    assert client.models.retrieve("personalign").id == "personalign"
    assert (
        http.get("/v1/models/tiny-lively").json()["id"] == "tiny-lively"
    )  # the generator's own id, which chats accept too
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.models.retrieve("gpt-4o")
    error = http.get("/v1/models/org/some-model").json()["error"]
    assert (
        error["code"] == "model_not_found"
        and error["type"] == "not_found_error"
        and "org/some-model" in error["message"]
    )


def test_max_tokens_over_the_cap_is_clamped_and_reported(client, http):
    reply = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=100, extra_body=PLAIN
    )
    capped = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=16, extra_body=PLAIN
    )
    assert (
        reply.choices[0].message.content == capped.choices[0].message.content
        and reply.usage.completion_tokens <= 16
    )
    assert reply.model_extra["personalign"]["max_tokens_clamped"] == {"requested": 100, "applied": 16}
    assert capped.model_extra["personalign"]["max_tokens_clamped"] is None
    chunks = _events(http, {"messages": ASK, "max_completion_tokens": 5000, **PLAIN})
    assert chunks[-1]["personalign"]["max_tokens_clamped"] == {"requested": 5000, "applied": 16}
