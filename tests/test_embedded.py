"""Tests on the real embedded models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2). Marked ``embedded``."""

from __future__ import annotations

import time

import pytest

from personalign.cli.demo import demo_comparisons
from personalign.models import (
    EMBEDDED_GENERATOR,
    _gguf_cache_dir,
    convert_embedded_generator,
    embedded_gguf_path,
    load_generator,
)
from personalign.personalizer import Personalizer
from personalign.steering.objectives import word_count

pytestmark = pytest.mark.embedded


def test_gguf_is_converted_once_and_cached(smollm):
    cache = _gguf_cache_dir(embedded_gguf_path())
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    assert convert_embedded_generator() == cache
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    started = time.perf_counter()
    again = load_generator(device="cpu")
    assert time.perf_counter() - started < 20  # de-quantising the GGUF takes ~25 s; the cache well under that
    assert again.model_id == EMBEDDED_GENERATOR == smollm.model_id
    assert smollm.context_length == 8192 and smollm.tokenizer.chat_template


def test_users_with_opposite_comparisons_get_answers_of_opposite_length(smollm, encoder, tmp_path):
    rows = demo_comparisons()
    question = [{"role": "user", "content": "How do I make my coffee taste better?"}]
    with Personalizer(smollm, encoder, store=tmp_path / "store") as pz:
        for user in ("sam", "robin"):
            pz.enroll(user, [c for u, c in rows if u == user])
        words = {
            u: word_count(pz.chat(u, question, max_new_tokens=120, repetition_penalty=1.1))
            for u in ("sam", "robin", None)
        }
    # sam's comparisons prefer ~13-word answers over ~107-word ones; robin's the reverse.
    assert words["sam"] < 0.6 * words[None], words
    assert words["robin"] > 1.5 * words["sam"], words


def test_memory_reaches_the_prompt(smollm, encoder, tmp_path):
    with Personalizer(smollm, encoder, store=tmp_path / "store") as pz:
        pz.remember("alice", ["I am vegetarian and I cook for two.", "My car is a red hatchback."])
        result = pz.respond(
            "alice", [{"role": "user", "content": "Plan my dinner for tonight."}], max_new_tokens=8
        )
    assert result.memories == ["I am vegetarian and I cook for two."]
    assert result.prompt_tokens > 30


def test_shipped_user_vas_heads_guide_enrolled_users_by_default(smollm, encoder, tmp_path):
    """The package's heads fit the embedded generator and the shipped PAL, so an enrolled user's chat
    is guided by their own mixture of the heads unless switched off; a request without a user is not."""
    rows = demo_comparisons()
    question = [{"role": "user", "content": "How do I make my coffee taste better?"}]
    with Personalizer(smollm, encoder, store=tmp_path / "store") as pz:
        assert pz.user_heads() is not None
        pz.enroll("sam", [c for u, c in rows if u == "sam"])
        guided = pz.respond("sam", question, max_new_tokens=8)
        assert guided.personalization["method"] == "user-vas" and guided.personalization["strength"] == 3.0
        assert abs(sum(guided.personalization["weights"]) - 1.0) < 1e-3
        off = pz.respond("sam", question, max_new_tokens=8, user_vas=0)
        assert off.personalization is None
        assert pz.respond(None, question, max_new_tokens=8).personalization is None
