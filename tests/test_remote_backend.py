"""The remote backend against a real llama.cpp server on loopback, with the embedded GGUF model.

personalign does the personalisation (memories, shots, the user's adapter, steering) and the
server decodes. ``llama-server`` is built once per machine from the llama-cpp-python sdist
(``personalign engine build``; the first run of this module builds it when missing).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from lora_folders import random_lora

pytestmark = pytest.mark.embedded

PROMPT = [{"role": "user", "content": "Give me one tip for learning to cook."}]


@pytest.fixture(scope="module")
def llama():
    from personalign.backends.llamacpp import LlamaServer, server_binary
    from personalign.models import embedded_gguf_path

    server_binary()  # builds llama-server once per machine (cached)
    with LlamaServer(embedded_gguf_path(), parallel=4, threads=1) as server:
        yield server


@pytest.fixture(scope="module")
def smollm():
    """This module's own embedded generator: its adapters must not reach other modules' shared one."""
    from personalign.models import load_generator

    return load_generator(device="cpu")


@pytest.fixture(scope="module")
def remote(smollm, encoder, llama, tmp_path_factory):
    from personalign.backends.remote import RemoteEngine
    from personalign.personalizer import Personalizer

    engine = RemoteEngine(llama.url, kind="llama.cpp", server=llama)
    pz = Personalizer(smollm, encoder, store=tmp_path_factory.mktemp("remote") / "store", backend=engine)
    yield pz
    pz.close()


def test_chat_decodes_the_personalised_prompt_on_the_engine(remote):
    before = remote.backend.requests
    result = remote.respond(None, PROMPT, max_new_tokens=24)
    assert remote.backend.requests == before + 1
    prepared = remote.engine.prepare(None, PROMPT, None, {"max_new_tokens": 24})
    # the engine counted exactly the prompt tokens personalign rendered (its usage, not ours)
    assert result.prompt_tokens == len(prepared.input_ids)
    assert result.text and 0 < result.completion_tokens <= 24


def similar(a: str, b: str) -> float:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio()


def test_stream_pieces_join_to_the_reply(remote):
    from personalign.streaming import TokenStream

    plain = remote.respond(None, PROMPT, max_new_tokens=24)
    stream = TokenStream()
    result = remote.respond_batch([{"messages": PROMPT, "max_new_tokens": 24, "stream": stream}])[0]
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == result.text
    # the same greedy request (llama.cpp's numerics differ slightly once its prompt cache is warm)
    assert similar(result.text, plain.text) > 0.5


def test_memories_and_shots_condition_the_remote_answer(remote):
    user = "cook-fan"
    remote.enroll(
        user,
        [
            {"prompt": "Suggest a dinner.", "chosen": "Grilled tofu with rice.", "rejected": "A steak."},
            {"prompt": "A snack?", "chosen": "Carrot sticks with hummus.", "rejected": "Beef jerky."},
        ],
    )
    remote.remember(user, "I am vegetarian and cook on a small budget.")
    plain = remote.respond(None, PROMPT, max_new_tokens=24)
    mine = remote.respond(user, PROMPT, max_new_tokens=24)
    assert mine.memories == ["I am vegetarian and cook on a small budget."]
    assert len(mine.shots) == 2
    assert mine.prompt_tokens > plain.prompt_tokens
    assert mine.text != plain.text


def test_each_user_gets_their_own_adapter_on_the_engine(remote, llama, smollm, tmp_path):
    comparisons = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]
    for user, seed in (("ada", 1), ("bob", 2)):
        remote.enroll(user, comparisons)
        remote.import_adapter(user, random_lora(smollm, tmp_path / user, seed))
    alone = {
        u: remote.respond(u, PROMPT, max_new_tokens=16, memory=False, shots=False).text
        for u in ("ada", "bob")
    }
    plain = remote.respond("ada", PROMPT, max_new_tokens=16, memory=False, shots=False, adapter=False).text
    assert alone["ada"] != plain and alone["bob"] != plain and alone["ada"] != alone["bob"]
    loaded = {Path(a["path"]).parent.name for a in llama.loaded()}
    assert {"ada", "bob"} <= loaded  # the GGUF beside each user's PEFT folder
    # one batch of both users and the plain model: each request runs its own adapter
    batch = remote.respond_batch(
        [
            {"user": u, "messages": PROMPT, "max_new_tokens": 16, "memory": False, "shots": False}
            for u in ("bob", "ada")
        ]
        + [
            {
                "user": "ada",
                "messages": PROMPT,
                "max_new_tokens": 16,
                "memory": False,
                "shots": False,
                "adapter": False,
            }
        ]
    )
    # each row ran its own adapter (closest to that request alone; llama.cpp batches are not bitwise
    # equal to single requests)
    for row, own in zip(batch, ["bob", "ada", "plain"], strict=True):
        texts = {**alone, "plain": plain}
        assert max(texts, key=lambda name: similar(row.text, texts[name])) == own
    restarts = llama.restarts
    remote.respond("ada", PROMPT, max_new_tokens=4)
    assert llama.restarts == restarts  # loaded adapters are reused, not reloaded
    # a retrained (here: re-imported) adapter is a new version: converted, loaded, the old file gone
    old = {a["path"] for a in llama.loaded() if Path(a["path"]).parent.name == "ada"}
    remote.import_adapter("ada", random_lora(smollm, tmp_path / "ada-v2", 3))
    again = remote.respond("ada", PROMPT, max_new_tokens=16, memory=False, shots=False).text
    assert llama.restarts == restarts + 1
    new = {a["path"] for a in llama.loaded() if Path(a["path"]).parent.name == "ada"}
    assert len(new) == 1 and new != old and not any(Path(p).exists() for p in old)
    assert similar(again, alone["ada"]) < 0.9


def test_mix_is_a_per_request_weighted_lora_list(remote):
    prepared = remote.engine.prepare(
        None,
        PROMPT,
        {"weights": {"verbosity": 0.7, "structure": -0.3}, "method": "mix"},
        {"max_new_tokens": 24},
    )
    remote.backend.load_adapters(remote.engine, [prepared])  # run() does this before sending a batch
    body = remote.backend.body(remote.engine, prepared, stream=False)
    scales = sorted(entry["scale"] for entry in body["lora"])
    assert scales == [-0.3, 0.7]
    steered = remote.respond(
        None, PROMPT, steer={"weights": {"verbosity": 1.0}, "method": "mix"}, max_new_tokens=24
    )
    plain = remote.respond(None, PROMPT, max_new_tokens=24)
    assert steered.text != plain.text
    zero = remote.engine.prepare(None, PROMPT, {"weights": {"verbosity": 0.0}, "method": "mix"}, {})
    assert remote.backend.body(remote.engine, zero, stream=False)["lora"] == []


def test_logit_steering_is_a_logit_bias_on_the_end_tokens(remote):
    from personalign.steering.decoding import DEFAULT_VERBOSITY_STRENGTH, eos_token_ids

    prepared = remote.engine.prepare(
        None, PROMPT, {"weights": {"verbosity": -1.0}, "method": "logit"}, {"logit_bias": {5: 2.0}}
    )
    body = remote.backend.body(remote.engine, prepared, stream=False)
    eos = eos_token_ids(remote.generator.tokenizer, remote.generator.model.generation_config)
    assert body["logit_bias"] == {"5": 2.0, **{str(t): DEFAULT_VERBOSITY_STRENGTH for t in eos}}
    short = remote.respond(
        None, PROMPT, steer={"weights": {"verbosity": -3.0}, "method": "logit"}, max_new_tokens=64
    )
    long = remote.respond(
        None, PROMPT, steer={"weights": {"verbosity": 3.0}, "method": "logit"}, max_new_tokens=64
    )
    assert short.completion_tokens < long.completion_tokens


def test_what_the_engine_cannot_do_is_refused_by_name(remote):
    from personalign.backends import BackendCapabilityError

    cases = [
        ({"steer": {"weights": {"verbosity": 1.0}, "method": "vas"}}, "steer.method"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"user_vas": 2.0}, "user_vas"),
        ({"min_new_tokens": 4}, "min_new_tokens"),
    ]
    remote.enroll("vas-fan", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    for options, field in cases:
        steer = options.pop("steer", None)
        with pytest.raises(BackendCapabilityError) as err:
            remote.respond("vas-fan", PROMPT, steer=steer, **options)
        assert err.value.field == field
        assert "llama.cpp offers steering ['logit', 'mix', 'prompt']" in str(err.value)
    # on by default where they can run, and installed for this generator: left out here, and said so
    result = remote.respond("vas-fan", PROMPT, max_new_tokens=4)
    installed = (
        {"user_vas"} | ({"fspo"} if remote.fspo_folder else set()) | ({"pplug"} if remote.plug else set())
    )
    assert remote.user_heads() is not None
    assert set(result.personalization["skipped"]) == installed


def test_an_unreachable_engine_is_an_engine_error(smollm, encoder, tmp_path):
    from personalign.backends.llamacpp import free_port
    from personalign.backends.remote import RemoteEngine
    from personalign.errors import EngineError
    from personalign.personalizer import Personalizer

    engine = RemoteEngine(f"http://127.0.0.1:{free_port()}", kind="llama.cpp", timeout=5)
    with Personalizer(smollm, encoder, store=tmp_path / "store", backend=engine) as pz:
        with pytest.raises(EngineError, match="unreachable"):
            pz.respond(None, PROMPT, max_new_tokens=4)


def test_the_http_server_on_the_remote_backend(remote):
    """The OpenAI client, streaming, enrollment and memory over HTTP, decoded by llama.cpp."""
    import openai

    from personalign.server import ServerThread, create_app

    with ServerThread(create_app(remote)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        http = httpx.Client(base_url=server.url, timeout=120)
        pairs = [{"prompt": "Lunch?", "chosen": "A lentil salad.", "rejected": "A burger."}]
        assert http.post("/v1/users/http-user/comparisons", json={"comparisons": pairs}).status_code == 200
        assert (
            http.post("/v1/users/http-user/memories", json={"text": "I like short answers."}).status_code
            == 200
        )
        reply = client.chat.completions.create(
            model="personalign", messages=PROMPT, user="http-user", max_tokens=16, temperature=0
        )
        assert reply.choices[0].message.content
        streamed = client.chat.completions.create(
            model="personalign", messages=PROMPT, user="http-user", max_tokens=16, stream=True, temperature=0
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert text and similar(text, reply.choices[0].message.content) > 0.5
        refused = http.post(
            "/v1/chat/completions",
            json={"model": "personalign", "messages": PROMPT, "logprobs": True, "top_logprobs": 2},
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"


def test_the_remote_engine_example_runs(llama, tmp_path):
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "remote_engine.py"
    done = subprocess.run(
        [sys.executable, str(example), "--engine-url", llama.url, "--store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for marker in ("== engine: llama.cpp", "memories: ['I am vegetarian", "refused: top_logprobs", "done in"):
        assert marker in done.stdout, done.stdout


def test_the_ttft_bench_reports_both_cases():
    """`personalign bench ttft` runs end to end (timings are its output, not asserted here)."""
    from personalign.bench.ttft import format_ttft_report, run_ttft_bench

    result = run_ttft_bench(rounds=1, max_new_tokens=2, threads=1)
    assert result["ttft_ms"]["cached"] > 0 and result["ttft_ms"]["uncached"] > 0
    assert result["second_turn_prompt_tokens"] > 50  # shots and memories are in the prompt
    assert "cached / uncached" in format_ttft_report(result)
