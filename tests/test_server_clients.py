"""The real server on loopback driven by the clients chat apps use: LangChain's ``ChatOpenAI``
(invoke, stream, ``stop``, ``with_structured_output``, ``bind_tools``) and LiteLLM (completion and
stream, the user carried through).

The module's personalizer records the user of every row it generates, so a test can see that
the user a client was given reached the server. The model is the tiny Llama with lively weights:
its text is gibberish, but structured output and tool calls are decoded under a JSON schema,
so they parse whatever the weights.
"""

from __future__ import annotations

import json
import warnings
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig

CONFIG = ServerConfig(max_tokens_cap=64, default_max_tokens=8, batch_wait_ms=5)
ASK = "How long should I boil an egg for?"
EGG = {"prompt": "How do I boil an egg?", "chosen": "Nine minutes.", "rejected": "It depends."}
SEEN: list[str | None] = []


class Verdict(BaseModel):
    """Whether the egg is done."""

    answer: Literal["yes", "no"] = Field(description="yes or no")


class GetWeather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Oslo"]


@pytest.fixture(scope="module")
def personalizer(lively, encoder, tmp_path_factory):
    with Personalizer(lively, encoder, store=tmp_path_factory.mktemp("clients-store")) as pz:
        pz.enroll("ana", [EGG])
        real = pz.respond_batch

        def recording(requests):
            SEEN.extend(r.get("user") for r in requests)
            return real(requests)

        pz.respond_batch = recording
        yield pz


@pytest.fixture()
def llm(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(
        base_url=server.base_url,
        api_key="unused",
        model="personalign",
        temperature=0,
        max_tokens=12,
        max_retries=0,
    )


@pytest.fixture()
def wide(llm):
    """Room for a JSON value or a call in the tiny tokenizer's short tokens."""
    return llm.model_copy(update={"max_tokens": 64})


@pytest.fixture()
def litellm_base(server):
    pytest.importorskip("litellm")
    return {
        "model": "openai/personalign",
        "api_base": server.base_url,
        "api_key": "unused",
        "temperature": 0,
        "max_tokens": 8,
    }


# --- LangChain ---------------------------------------------------------------------------------------


def test_chatopenai_invoke_and_stream_agree(llm):
    whole = llm.invoke(ASK)
    assert isinstance(whole.content, str) and whole.content
    streamed = "".join(chunk.content for chunk in llm.stream(ASK))
    assert streamed == whole.content


def test_chatopenai_stop(llm):
    whole = llm.invoke(ASK).content
    stop = whole[2:4]
    assert llm.invoke(ASK, stop=[stop]).content == whole[: whole.index(stop)]


def test_chatopenai_user_reaches_the_server(llm):
    SEEN.clear()
    llm.bind(user="ana").invoke(ASK)
    assert SEEN == [
        "ana"
    ]  # ana has a profile, so her id is passed on (a stranger's would be None: the generic answer)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_chatopenai_with_structured_output(wide, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = wide.with_structured_output(Verdict, method=method).invoke(ASK)
    assert isinstance(result, Verdict) and result.answer in ("yes", "no")


def test_chatopenai_json_mode(wide):
    """JSON mode constrains to any object; a lively tiny model may not close it within max_tokens (LangChain then
    raises LengthFinishReasonError), so a few seeds are sampled and every finished reply must parse to an object."""
    import openai

    parsed = []
    for seed in range(6):
        try:
            message = wide.bind(response_format={"type": "json_object"}, seed=seed, temperature=1.0).invoke(
                ASK
            )
        except openai.LengthFinishReasonError:
            continue
        parsed.append(json.loads(message.content))
    assert parsed and all(isinstance(p, dict) for p in parsed)


def test_chatopenai_bind_tools(llm, wide):
    forced = wide.bind_tools([GetWeather], tool_choice="GetWeather")
    message = forced.invoke("What is the weather in Oslo?")
    assert (
        message.tool_calls
        and message.tool_calls[0]["name"] == "GetWeather"
        and message.tool_calls[0]["args"]["city"] in ("Paris", "Oslo")
    )
    required = wide.bind_tools(
        [GetWeather, Verdict], tool_choice="any"
    )  # LangChain's "any" is OpenAI's "required"
    assert required.invoke(ASK).tool_calls[0]["name"] in ("GetWeather", "Verdict")
    auto = llm.bind_tools([GetWeather]).invoke(ASK)  # a tiny model answers in text
    assert isinstance(auto.content, str)


# --- LiteLLM -----------------------------------------------------------------------------------------


def test_litellm_completion_carries_the_user(litellm_base):
    import litellm

    messages = [{"role": "user", "content": ASK}]
    for extra in (
        {"safety_identifier": "ana"},
        {"extra_body": {"user": "ana"}},
        {"extra_headers": {"X-Personalign-User": "ana"}},
    ):
        SEEN.clear()
        reply = litellm.completion(**litellm_base, messages=messages, **extra)
        assert SEEN == ["ana"], extra
        assert (
            reply.choices[0].message.content
            and reply.personalign["user"] == "ana"
            and reply.personalign["user_known"]
        )


def test_litellm_stream(litellm_base):
    import litellm

    messages = [{"role": "user", "content": ASK}]
    whole = litellm.completion(**litellm_base, messages=messages).choices[0].message.content
    chunks = litellm.completion(**litellm_base, messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_chatopenai_streams_a_tool_call(wide):
    chunks = list(
        wide.bind_tools([GetWeather], tool_choice="GetWeather").stream("What is the weather in Oslo?")
    )
    message = chunks[0]
    for chunk in chunks[1:]:
        message = message + chunk
    assert (
        message.tool_calls
        and message.tool_calls[0]["name"] == "GetWeather"
        and message.tool_calls[0]["args"]["city"] in ("Paris", "Oslo")
    )
