"""OpenAI's ``/v1/completions`` and ``/v1/embeddings`` on the real server, through the ``openai`` client.

Completions continue raw text with the tiny Llama (no chat template, nothing personal);
embeddings are the embedded all-MiniLM-L6-v2 encoder's unit vectors.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig

CONFIG = ServerConfig(
    max_tokens_cap=16, default_max_tokens=8, max_body_bytes=64_000, batch_wait_ms=20, max_choices=4
)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def personalizer(lively, encoder, tmp_path_factory):
    with Personalizer(lively, encoder, store=tmp_path_factory.mktemp("endpoints-store")) as pz:
        yield pz


def _error(response, param, status=400):
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.text


# --- completions -------------------------------------------------------------------------------------


def test_completion_continues_the_raw_prompt(client, personalizer):
    reply = client.completions.create(model="personalign", prompt=PROMPT, max_tokens=6, temperature=0)
    ids = personalizer.generator.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    import torch

    with torch.no_grad():
        out = personalizer.generator.model.generate(
            torch.tensor([ids]),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=personalizer.generator.tokenizer.pad_token_id,
        )
    expected = personalizer.generator.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens <= 6


def test_completion_prompts_n_seed_and_logprobs(client):
    reply = client.completions.create(
        model="personalign", prompt=[PROMPT, "Why is the sky"], n=2, seed=3, max_tokens=5, logprobs=2
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    again = client.completions.create(
        model="personalign", prompt=[PROMPT, "Why is the sky"], n=2, seed=3, max_tokens=5, logprobs=2
    )
    assert [c.text for c in reply.choices] == [c.text for c in again.choices]
    logprobs = reply.choices[0].logprobs
    assert (
        len(logprobs.tokens)
        == len(logprobs.token_logprobs)
        == len(logprobs.top_logprobs)
        == len(logprobs.text_offset)
    )
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(t) <= 2 for t in logprobs.top_logprobs)


def test_completion_echo_prepends_the_prompt(client):
    plain = (
        client.completions.create(model="personalign", prompt=PROMPT, max_tokens=5, temperature=0)
        .choices[0]
        .text
    )
    echoed = (
        client.completions.create(model="personalign", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
        .choices[0]
        .text
    )
    assert echoed == PROMPT + plain


def test_streamed_completion_matches_the_whole_one(client):
    body = {
        "model": "personalign",
        "prompt": [PROMPT, "Why is the sky"],
        "n": 2,
        "seed": 5,
        "max_tokens": 6,
        "logprobs": 1,
    }
    whole = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finishes] == [c.finish_reason for c in whole.choices]
    assert finishes[0].logprobs.token_logprobs == whole.choices[0].logprobs.token_logprobs
    assert (
        chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    )


def test_completion_stop(client):
    whole = (
        client.completions.create(model="personalign", prompt=PROMPT, max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = whole[3:5]
    cut = client.completions.create(
        model="personalign", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop
    ).choices[0]
    assert cut.text == whole[: whole.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"prompt": ""}, "prompt", 400),
        ({"prompt": []}, "prompt", 400),
        ({"prompt": PROMPT, "stream": True, "logit_bias": {"999999": 1}}, "logit_bias.999999", 400),
        ({"prompt": PROMPT, "echo": True, "logprobs": 1}, "echo", 400),
        ({"prompt": PROMPT, "suffix": "end"}, "suffix", 400),
        ({"prompt": PROMPT, "best_of": 3}, "best_of", 400),
        ({"prompt": PROMPT, "logprobs": 6}, "logprobs", 400),
        ({"prompt": PROMPT, "logit_bias": {"1": 300}}, "logit_bias.1", 400),
        ({"prompt": PROMPT, "model": "gpt-4"}, "model", 404),
        ({"prompt": PROMPT * 400, "max_tokens": 16}, "messages", 400),
    ],
)
def test_bad_completion_is_4xx_naming_the_field(http, body, param, status):
    _error(http.post("/v1/completions", json={"model": "personalign", **body}), param, status)


# --- embeddings --------------------------------------------------------------------------------------


def test_embeddings_are_the_encoder_vectors(client, personalizer):
    texts = ["I am vegetarian.", "The sky is blue."]
    reply = client.embeddings.create(
        model="personalign", input=texts
    )  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in reply.data], dtype=np.float32)
    np.testing.assert_allclose(vectors, personalizer.encoder.encode(texts), atol=1e-5)
    assert [d.index for d in reply.data] == [0, 1] and reply.usage.prompt_tokens > 0
    floats = client.embeddings.create(
        model=personalizer.encoder.name, input="I am vegetarian.", encoding_format="float"
    )
    np.testing.assert_allclose(floats.data[0].embedding, vectors[0], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"input": ""}, "input", 400),
        ({"input": [1, 2, 3]}, "input[0]", 400),
        ({"input": "x" * 8001}, "input", 400),
        ({"input": ["x"] * 257}, "input", 413),
        ({"input": "x", "dimensions": 12}, "dimensions", 400),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", 400),
        ({"input": "x", "model": "text-embedding-3-small"}, "model", 404),
    ],
)
def test_bad_embeddings_are_4xx_naming_the_field(http, body, param, status):
    _error(http.post("/v1/embeddings", json={"model": "personalign", **body}), param, status)


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="personalign", input="x", dimensions=3)
