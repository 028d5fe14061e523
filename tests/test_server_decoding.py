"""OpenAI's decoding fields on the real server: default temperature, per-row ``seed``, ``logit_bias``,
presence/frequency penalties, ``logprobs``, ``response_format`` and ``tools``.

The server runs on loopback over the tiny Llama with its weights redrawn at std 0.5 (gibberish,
but sampled rows differ and greedy replies depend on the prompt). Each row is decoded by
``steering.decoding.RowDecoder``; its math is checked here on hand-derived values.
"""

from __future__ import annotations

import json

import pytest
import torch

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig
from personalign.steering.decoding import RowControls, RowDecoder, derived_seed, openai_penalties, sample_row

CONFIG = ServerConfig(
    max_tokens_cap=64,
    default_max_tokens=8,
    max_body_bytes=64_000,
    batch_wait_ms=20,
    max_choices=4,
    default_temperature=1.0,
)
ASK = [{"role": "user", "content": "How long should I boil an egg for?"}]
PLAIN = {"memory": False, "shots": False, "steer": {}}
CHOICE = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def personalizer(lively, encoder, tmp_path_factory):
    with Personalizer(lively, encoder, store=tmp_path_factory.mktemp("decoding-store")) as pz:
        yield pz


def _chat(http, **body):
    return http.post("/v1/chat/completions", json={"model": "personalign", "messages": ASK, **PLAIN, **body})


def _error(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error


# --- the math ----------------------------------------------------------------------------------------


def test_openai_penalties_golden():
    """Token 1 generated twice, token 2 once: mu[1] - 2*f - p, mu[2] - f - p, the others unchanged.

    With f = 0.5, p = 1: [0, 1, 2, 3] becomes [0, 1 - 1 - 1, 2 - 0.5 - 1, 3] = [0, -1, 0.5, 3].
    """
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    out = openai_penalties(scores, torch.tensor([[1, 2, 1]]), torch.tensor([1.0]), torch.tensor([0.5]))
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0, 0.5, 3.0]]))
    torch.testing.assert_close(
        openai_penalties(
            scores, torch.zeros(1, 0, dtype=torch.long), torch.tensor([1.0]), torch.tensor([0.5])
        ),
        scores,
    )


def test_sample_row_greedy_and_nucleus():
    logits = torch.tensor([0.0, 5.0, 4.9, -10.0])
    assert sample_row(logits, 0.0, 1.0, None) == 1
    # top_p below the first token's mass keeps only that token, whatever the generator draws
    assert {sample_row(logits, 1.0, 0.1, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    draws = {sample_row(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {1, 2}  # tokens 0 and 3 hold under 1% of the mass


def test_derived_seeds_start_at_the_seed_and_differ():
    assert derived_seed(7, 0) == 7 and derived_seed(-1, 0) == 2**64 - 1
    assert len({derived_seed(7, i) for i in range(8)}) == 8


def test_row_decoder_rows_do_not_see_each_other():
    """A row's tokens depend on its own logits and generator only: the same row alone or beside another."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    mine = RowControls(temperature=1.0, seed=11)

    def tokens(controls, rows):
        decoder = RowDecoder(controls, prompt_width=1, eos_ids=[0])
        out = []
        for step in range(6):
            forced = decoder(torch.zeros(len(controls), 1 + step, dtype=torch.long), rows)
            out.append(int(forced[0].argmax()))
        return out

    alone = tokens([mine], logits)
    beside = tokens([mine, RowControls(temperature=1.5, seed=3)], torch.cat([logits, torch.randn(1, 50)]))
    assert alone == beside


# --- seed and temperature ----------------------------------------------------------------------------


def test_seeded_request_is_the_same_alone_and_in_any_batch(personalizer):
    seeded = {"user": None, "messages": ASK, "max_new_tokens": 8, "temperature": 1.0, "seed": 5, **PLAIN}
    alone = personalizer.respond_batch([seeded])[0].text
    others = [
        {
            "user": None,
            "messages": [{"role": "user", "content": "Plan my dinner, a long one please"}],
            "max_new_tokens": 10,
            "temperature": 0.7,
            "seed": 1,
            **PLAIN,
        }
    ]
    assert (
        personalizer.respond_batch([*others, seeded, {**seeded, "seed": 6}, {**seeded, "temperature": 0.0}])[
            1
        ].text
        == alone
    )
    assert (
        personalizer.respond_batch([seeded, seeded])[1].text == alone
    )  # same seed, same reply, also side by side


def test_omitted_temperature_is_openais_default(client):
    default = client.chat.completions.create(
        model="personalign", messages=ASK, seed=9, max_tokens=8, extra_body=PLAIN
    )
    one = client.chat.completions.create(
        model="personalign", messages=ASK, seed=9, max_tokens=8, temperature=1.0, extra_body=PLAIN
    )
    greedy = client.chat.completions.create(
        model="personalign", messages=ASK, seed=9, max_tokens=8, temperature=0, extra_body=PLAIN
    )
    assert (
        default.choices[0].message.content
        == one.choices[0].message.content
        != greedy.choices[0].message.content
    )


def test_seeded_choices_differ_and_repeat(client):
    first = client.chat.completions.create(
        model="personalign", messages=ASK, n=3, seed=4, max_tokens=8, extra_body=PLAIN
    )
    again = client.chat.completions.create(
        model="personalign", messages=ASK, n=3, seed=4, max_tokens=8, extra_body=PLAIN
    )
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    single = client.chat.completions.create(
        model="personalign", messages=ASK, seed=4, max_tokens=8, extra_body=PLAIN
    )
    assert single.choices[0].message.content == texts[0]  # choice 0 is the seed's own row


# --- logit_bias and penalties ------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(client, personalizer):
    tokenizer = personalizer.generator.tokenizer
    token = tokenizer("egg", add_special_tokens=False)["input_ids"][0]
    forced = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=4, logit_bias={str(token): 100}, extra_body=PLAIN
    )
    assert forced.choices[0].message.content == tokenizer.decode([token] * 4).strip()
    greedy = personalizer.respond(None, ASK, max_new_tokens=4, **PLAIN)
    first = tokenizer(greedy.text, add_special_tokens=False)["input_ids"][0]
    banned = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=4,
        temperature=0,
        logit_bias={str(first): -100},
        extra_body=PLAIN,
    )
    assert not banned.choices[0].message.content.startswith(tokenizer.decode([first]).strip() or "\0")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logit_bias": {"12": 101}}, "logit_bias.12"),
        ({"logit_bias": {"egg": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias.999999"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "high"}, "frequency_penalty"),
    ],
)
def test_bad_bias_or_penalty_is_400_naming_the_field(http, body, param):
    _error(_chat(http, **body), param)


def test_frequency_penalty_changes_a_repetitive_reply(client, personalizer):
    """Greedy decoding of the tiny model repeats tokens; a frequency penalty of 2 must change the reply."""
    plain = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=16, temperature=0, extra_body=PLAIN
    )
    tokens = personalizer.generator.tokenizer(plain.choices[0].message.content, add_special_tokens=False)[
        "input_ids"
    ]
    assert len(set(tokens)) < len(tokens), (
        "the greedy reply should repeat a token for this test to mean anything"
    )
    penalised = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=16,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=0.5,
        extra_body=PLAIN,
    )
    assert penalised.choices[0].message.content != plain.choices[0].message.content


# --- logprobs ----------------------------------------------------------------------------------------


def test_logprobs_in_openais_shape(client):
    reply = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=PLAIN,
    )
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for item in content:
        assert (
            item.logprob <= 0
            and len(item.top_logprobs) == 3
            and item.bytes == list(item.token.encode("utf-8", "backslashreplace"))
        )
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == pytest.approx(
            item.logprob
        )  # greedy: the top token
    assert "".join(i.token for i in content).strip() == reply.choices[0].message.content
    plain = client.chat.completions.create(
        model="personalign", messages=ASK, max_tokens=6, temperature=0, extra_body=PLAIN
    )
    assert (
        plain.choices[0].logprobs is None
        and plain.choices[0].message.content == reply.choices[0].message.content
    )


def test_streamed_logprobs_come_with_each_choices_finish_chunk(client):
    whole = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=PLAIN,
    )
    chunks = [
        c
        for c in client.chat.completions.create(
            model="personalign",
            messages=ASK,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body=PLAIN,
        )
        if c.choices
    ]
    streamed = [
        item for c in chunks if c.choices[0].logprobs is not None for item in c.choices[0].logprobs.content
    ]
    assert [(i.token, i.logprob) for i in streamed] == [
        (i.token, i.logprob) for i in whole.choices[0].logprobs.content
    ]
    assert chunks[-1].choices[0].logprobs is not None and chunks[-1].choices[0].finish_reason in (
        "stop",
        "length",
    )


def test_logprobs_errors(http):
    _error(_chat(http, top_logprobs=2), "top_logprobs")
    _error(_chat(http, logprobs=True, top_logprobs=21), "top_logprobs")


# --- response_format ---------------------------------------------------------------------------------


def test_json_schema_reply_matches_the_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "choice", "schema": CHOICE, "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="personalign", messages=ASK, max_tokens=24, seed=seed, response_format=fmt, extra_body=PLAIN
        )
        assert (
            json.loads(reply.choices[0].message.content)["answer"] in ("yes", "no")
            and reply.choices[0].finish_reason == "stop"
        )


def test_json_object_reply_is_a_json_object_prefix(client):
    reply = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=24,
        seed=0,
        response_format={"type": "json_object"},
        extra_body=PLAIN,
    )
    text = reply.choices[0].message.content
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_json_schema_streams_too(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "choice", "schema": CHOICE}}
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "personalign",
            "messages": ASK,
            "stream": True,
            "max_tokens": 24,
            "response_format": fmt,
            **PLAIN,
        },
    ) as response:
        lines = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in lines if c["choices"])
    assert json.loads(text)["answer"] in ("yes", "no")


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                },
            },
            "grammar",
        ),
    ],
)
def test_bad_response_format_is_400_naming_the_field(http, fmt, param):
    _error(_chat(http, response_format=fmt), param)


# --- tools -------------------------------------------------------------------------------------------


def test_required_tool_call_is_a_valid_call(client):
    reply = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=64,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        extra_body=PLAIN,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (
        call.id.startswith("call_")
        and call.type == "function"
        and call.function.name in ("get_weather", "get_time")
    )
    arguments = json.loads(call.function.arguments)
    assert arguments == {} if call.function.name == "get_time" else arguments["city"] in ("Paris", "Oslo")


def test_named_tool_choice_calls_that_function_and_round_trips(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=64,
        tools=[WEATHER, CLOCK],
        tool_choice=named,
        extra_body=PLAIN,
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12 C and sunny"},
    ]
    after = client.chat.completions.create(
        model="personalign", messages=history, max_tokens=6, tools=[WEATHER], extra_body=PLAIN
    )
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_call_arrives_as_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model="personalign",
        messages=ASK,
        max_tokens=64,
        tools=[WEATHER],
        tool_choice="required",
        stream=True,
        extra_body=PLAIN,
    )
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert (
        json.loads(calls[0].function.arguments)["city"] in ("Paris", "Oslo")
        and chunks[-1].choices[0].finish_reason == "tool_calls"
    )
    assert not any(c.choices[0].delta.content for c in chunks)  # the JSON itself is never streamed as text


def test_auto_tool_choice_parses_a_tool_call_block():
    from personalign.server.tools import parse_auto

    content, calls = parse_auto(
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
        ["get_weather"],
    )
    assert content == "Let me check." and calls[0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Oslo"}',
    }
    assert parse_auto('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', ["get_weather"])[1] == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tools_are_400_naming_the_field(http, body, param):
    _error(_chat(http, **body), param)


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "12 C"}, "messages[1]"),
        ({"role": "user", "content": None}, "messages[1]"),
        ({"role": "assistant", "content": None}, "messages[1]"),
    ],
)
def test_incomplete_tool_turns_are_400(http, message, param):
    response = http.post("/v1/chat/completions", json={"model": "personalign", "messages": [*ASK, message]})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# --- no 5xx for any value of the new fields ----------------------------------------------------------

ODD_VALUES = [
    None,
    "x",
    "",
    -1,
    0,
    3,
    1e308,
    -1e308,
    [],
    [1],
    {},
    {"a": 1},
    {"1": "x"},
    True,
    2**70,
    {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}},
]
NEW_CHAT_FIELDS = [
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "seed",
    "temperature",
    "parallel_tool_calls",
]


@pytest.mark.parametrize("field", NEW_CHAT_FIELDS)
def test_any_value_of_a_new_chat_field_is_answered_without_5xx(http, field):
    for value in ODD_VALUES:
        response = _chat(http, max_tokens=2, **{field: value})
        assert response.status_code in (200, 400), (field, value, response.text)
        if response.status_code == 400:
            assert response.json()["error"]["param"], (field, value, response.text)


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/completions", ["prompt", "logprobs", "echo", "best_of", "n", "stop", "seed"]),
        ("/v1/embeddings", ["input", "dimensions", "encoding_format"]),
    ],
)
def test_any_value_of_a_completion_or_embedding_field_is_answered_without_5xx(http, path, fields):
    base = (
        {"model": "personalign", "prompt": "The fox", "max_tokens": 2}
        if path == "/v1/completions"
        else {"model": "personalign", "input": "x"}
    )
    for field in fields:
        for value in ODD_VALUES:
            response = http.post(path, json={**base, field: value})
            assert response.status_code in (200, 400, 413), (field, value, response.text)


def test_row_decoder_counts_only_generated_tokens_with_a_persona_plug(
    tiny_generator, encoder, pplug_folder, tmp_path, monkeypatch
):
    """A plugged row's ``input_ids`` gain a column; the decoder's prompt width must include it, so the
    penalties count generated tokens only (the first step sees none)."""
    from personalign.steering.decoding import RowDecoder

    seen = []
    real = RowDecoder.__call__

    def spy(self, input_ids, scores):
        seen.append(input_ids.shape[1] - self.prompt_width)
        return real(self, input_ids, scores)

    monkeypatch.setattr(RowDecoder, "__call__", spy)
    plugged = []
    with Personalizer(tiny_generator, encoder, store=tmp_path / "store", pplug=pplug_folder) as pz:
        generate = pz.generator.model.generate
        monkeypatch.setattr(
            pz.generator.model,
            "generate",
            lambda **kw: plugged.append("inputs_embeds" in kw) or generate(**kw),
        )
        pz.enroll("ann", [{"prompt": "How do I boil an egg?", "chosen": "Nine minutes.", "rejected": "No."}])
        pz.respond("ann", ASK, max_new_tokens=3, presence_penalty=1.0, memory=False, shots=False, steer={})
    assert plugged == [True] and seen[:3] == [0, 1, 2]


def test_decoding_controls_with_logit_mixing_are_refused_naming_steer(personalizer):
    """A logit-mixing plan (rows expanded per request, tokens forced by SteeringProcessor) cannot take
    per-row controls; plain sampling with it keeps the steering processor's own sampler."""
    from types import SimpleNamespace

    from personalign.errors import ValidationError

    mixed = SimpleNamespace(greedy=True)
    biased = personalizer.engine.prepare(
        None, ASK, {}, {"logit_bias": {1: 5.0}, "memory": False, "shots": False}
    )
    with pytest.raises(ValidationError, match="logit-mixing") as caught:
        personalizer.engine.row_decoder([biased], mixed, 10)
    assert caught.value.field == "steer"
    sampled = personalizer.engine.prepare(
        None, ASK, {}, {"temperature": 0.7, "seed": 1, "memory": False, "shots": False}
    )
    assert personalizer.engine.row_decoder([sampled], mixed, 10) is None
