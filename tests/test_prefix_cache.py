"""The in-process prompt cache (personalign.prefix_cache): reused keys and values give the answers
of a full prompt, a changed profile, memory or adapter is never served stale, and it stays bounded."""

from __future__ import annotations

import pytest
import torch

from lora_folders import random_lora
from personalign.prefix_cache import PrefixCache, PrefixCacheConfig, common_prefix, rows_agree

ASK = [{"role": "user", "content": "Plan my dinner for tonight please."}]
MEMORIES = ["I am vegetarian and I cook for two.", "Why is the sky blue? I like blue food."]
COMPARISONS = [
    {"prompt": "How do I boil an egg?", "chosen": "Nine minutes.", "rejected": "Put the egg in water."},
    {"prompt": "Plan my dinner please.", "chosen": "1. First step.", "rejected": "The quick brown fox."},
]


def _ids(pz, user, messages, **options):
    return pz.engine.prepare(user, messages, None, options).input_ids


def _uncached(pz, user, messages, **options):
    """``respond`` with the prompt cache switched off for this one call."""
    cache, pz.backend.prefix_cache = pz.backend.prefix_cache, None
    try:
        return pz.respond(user, messages, **options)
    finally:
        pz.backend.prefix_cache = cache


@pytest.fixture()
def lpz(lively, encoder, tmp_path):
    """A Personalizer on the lively tiny Llama (greedy output depends on the prompt), one user enrolled."""
    from personalign.personalizer import Personalizer

    with Personalizer(lively, encoder, store=tmp_path / "store") as personalizer:
        personalizer.enroll("ana", COMPARISONS)
        personalizer.remember("ana", MEMORIES)
        yield personalizer


def test_common_prefix_and_rows_agree_golden_values():
    t = torch.tensor
    assert common_prefix(t([1, 2, 3, 4]), t([1, 2, 9, 4])) == 2  # first difference at index 2
    assert common_prefix(t([1, 2]), t([1, 2, 3])) == 2  # one is a prefix of the other
    assert common_prefix(t([5]), t([6])) == 0
    assert common_prefix(t([], dtype=torch.long), t([1])) == 0
    assert rows_agree(t([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 7, 4]])) == 2  # row 3 parts at column 2
    assert rows_agree(t([[1, 2], [1, 2]])) == 2


@pytest.mark.parametrize("field, value", [("max_entries", 0), ("max_bytes", -1), ("max_entries", True)])
def test_config_names_the_bad_bound(field, value):
    from personalign.errors import ValidationError

    with pytest.raises(ValidationError, match=f"prefix_cache.{field}"):
        PrefixCacheConfig(**{field: value})


def test_prefix_cache_continuation_equals_the_full_prompt(lively):
    """Parity with plain ``generate``: the first 20 positions' keys and values from a cached run of
    another prompt sharing them, then ``generate`` on the full prompt, give the same greedy tokens
    and the same scores (bit for bit on this project's CPU; allowed float32 rounding, since the
    rest is multiplied as a shorter matrix that another BLAS may split differently)."""
    from transformers import DynamicCache
    from transformers.generation.utils import ALL_CACHE_NAMES

    from personalign.prefix_cache import cacheable, prefix_of

    model = lively.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 300, (1, 40), generator=g)  # (1, 40)
    other = torch.cat([prompt[:, :20], torch.randint(3, 300, (1, 15), generator=g)], dim=1)  # shares 20
    settings = {
        "max_new_tokens": 12,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    settings["pad_token_id"] = lively.tokenizer.pad_token_id
    with torch.inference_mode():
        full = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
        warm = DynamicCache(config=model.config)
        assert cacheable(warm)
        model(other, **{ALL_CACHE_NAMES[0]: warm})
        assert warm.get_seq_length() == 35
        reused = prefix_of(warm, 20, model.config)
        cached = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), **{ALL_CACHE_NAMES[0]: reused}, **settings
        )
    assert warm.get_seq_length() == 35, "the stored entry is never written"
    assert cached.sequences.tolist() == full.sequences.tolist()
    for a, b in zip(cached.scores, full.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_second_turn_reuses_the_first_and_answers_as_without_the_cache(lpz):
    cache = lpz.backend.prefix_cache
    first = lpz.respond("ana", ASK, max_new_tokens=8)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    second = [
        *ASK,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And tomorrow?"},
    ]
    reply = lpz.respond("ana", second, max_new_tokens=8)
    shared = common_prefix(torch.tensor(_ids(lpz, "ana", ASK)), torch.tensor(_ids(lpz, "ana", second)))
    assert cache.hits == 1 and cache.reused_tokens == shared > 0
    assert reply.text == _uncached(lpz, "ana", second, max_new_tokens=8).text
    # The same prompt again (a retry): all of it but its last token comes from the cache.
    again = lpz.respond("ana", second, max_new_tokens=8)
    assert cache.reused_tokens == shared + len(_ids(lpz, "ana", second)) - 1
    assert again.text == reply.text
    assert len(cache) == 2  # the retry's entry replaced the second turn's (a prefix of it)


def test_a_new_memory_or_comparison_is_never_served_stale(lpz):
    """The reused prefix ends where the new prompt first differs from every cached one, so the
    keys and values of the old memories and shots are never attended to."""
    cache = lpz.backend.prefix_cache
    options = {"max_new_tokens": 6, "memory_threshold": None}  # every memory, however far from the question
    before = _ids(lpz, "ana", ASK, **options)
    lpz.respond("ana", ASK, **options)
    for change in (
        lambda: lpz.remember("ana", "I am allergic to eggs."),
        lambda: lpz.enroll("ana", [{"prompt": "Dinner ideas?", "chosen": "Soup.", "rejected": "Steak."}]),
    ):
        change()
        after = _ids(lpz, "ana", ASK, **options)
        assert after != before
        reused = cache.reused_tokens
        reply = lpz.respond("ana", ASK, **options)
        assert cache.reused_tokens - reused == common_prefix(torch.tensor(before), torch.tensor(after))
        assert reply.text == _uncached(lpz, "ana", ASK, **options).text
        before = after


def test_a_batch_of_several_requests_bypasses_the_cache(lpz):
    cache = lpz.backend.prefix_cache
    lpz.respond_batch(
        [{"user": "ana", "messages": ASK, "max_new_tokens": 4}, {"user": None, "messages": ASK}]
    )
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


def test_one_requests_rows_are_cached_together_up_to_where_they_part(lpz):
    """Rerank's candidates are rows of one prompt: they share its keys and values, and only the
    prompt (where the sampled replies agree) is kept."""
    cache = lpz.backend.prefix_cache
    options = {"max_new_tokens": 6, "rerank": 3, "temperature": 1.0, "seed": 1}
    first = lpz.respond("ana", ASK, **options)
    (entry,) = cache._entries.values()
    prompt = _ids(lpz, "ana", ASK, **options)
    assert entry.cache.layers[0].keys.shape[0] == 3 and entry.ids.tolist() == prompt
    again = lpz.respond("ana", ASK, **options)
    assert cache.hits == 1 and cache.reused_tokens == len(prompt) - 1
    assert again.text == first.text == _uncached(lpz, "ana", ASK, **options).text


def test_off_switch_and_forget(lively, encoder, tmp_path):
    from personalign.backends import LocalBackend
    from personalign.personalizer import Personalizer

    with Personalizer(lively, encoder, store=tmp_path / "off", backend=LocalBackend(prefix_cache=None)) as pz:
        assert pz.backend.prefix_cache is None
        assert pz.respond(None, ASK, max_new_tokens=4).completion_tokens == 4
    backend = LocalBackend()
    with Personalizer(lively, encoder, store=tmp_path / "on", backend=backend) as pz:
        pz.remember("ana", MEMORIES)
        pz.remember("bob", "I cook for two.")
        pz.respond("ana", ASK, max_new_tokens=4)
        pz.respond("bob", ASK, max_new_tokens=4)
        assert len(backend.prefix_cache) == 2
        pz.forget("ana")  # the keys and values of ana's memories leave memory
        assert len(backend.prefix_cache) == 1
        assert {e.user for e in backend.prefix_cache._entries.values()} == {"bob"}


def _entry(n: int, first: int = 1):
    """``n`` token ids and a one-layer cache holding ``n`` positions of 1 KiB each."""
    from transformers import DynamicCache

    ids = torch.arange(first, first + n)
    cache = DynamicCache([(torch.zeros(1, 1, n, 128), torch.zeros(1, 1, n, 128))])  # (B, H, T, D) float32
    return ids, cache


def test_least_recently_used_entries_leave_past_the_bounds():
    cache = PrefixCache(PrefixCacheConfig(max_entries=2, max_bytes=10 * 1024))
    for first in (100, 200, 300):
        cache.put("s", *_entry(3, first), user=None)
    assert len(cache) == 2 and cache.nbytes == 2 * 3 * 1024
    hit, length = cache.take("s", [200, 201, 202, 7])
    assert length == 3 and hit.get_seq_length() == 3  # 200.. is kept, 100.. left first
    miss, length = cache.take("s", [100, 101, 7])
    assert length == 0 and miss.get_seq_length() == 0
    assert cache.take("other state", [200, 201, 202, 7])[1] == 0
    cache.put("s", *_entry(4, 400), user=None)  # 300.. is now the least recently used
    assert cache.take("s", [300, 301, 7])[1] == 0
    cache.put("s", *_entry(11, 500), user=None)  # 11 KiB: over max_bytes, not kept
    assert len(cache) == 2 and cache.nbytes <= 10 * 1024
    cache.put("s", *_entry(5, 400), user=None)  # extends 400..403: replaces it
    assert len(cache) == 2 and cache.take("s", [400, 401, 402, 403, 404, 7])[1] == 5


def test_adapter_rows_are_keyed_by_the_adapter_and_its_weights(tiny_model_dir, encoder, tmp_path):
    """A row on a user's LoRA never reuses the base model's keys and values, nor those of the
    adapter it replaced (another adapter imported into the same slot)."""
    from personalign.models import load_generator
    from personalign.personalizer import Personalizer

    # adapters wrap the model: never the shared one
    generator = load_generator(str(tiny_model_dir), device="cpu")
    with Personalizer(generator, encoder, store=tmp_path / "store") as pz:
        cache = pz.backend.prefix_cache
        options = {"max_new_tokens": 6, "memory": False, "shots": False}
        base = pz.respond(None, ASK, **options)
        pz.remember("ana", "I cook for two.")
        pz.import_adapter("ana", random_lora(generator, tmp_path / "a1", seed=1, scale=0.3, rank=4))
        first = pz.respond("ana", ASK, **options)
        assert cache.hits == 0, "the base model's entry is not the adapter's"
        assert first.text != base.text, "the adapter changes the answer (else this test proves nothing)"
        assert pz.respond("ana", ASK, **options).text == first.text and cache.hits == 1
        pz.import_adapter("ana", random_lora(generator, tmp_path / "a2", seed=2, scale=0.3, rank=4))
        hits = cache.hits
        replaced = pz.respond("ana", ASK, **options)
        assert cache.hits == hits, "a new adapter's row never reuses the old adapter's keys and values"
        assert replaced.text == _uncached(pz, "ana", ASK, **options).text
        slot = pz.adapters.adapter_names(["ana"])[0]
        state, _ = pz.engine.forward_state(slot)
        with torch.no_grad():
            next(p for n, p in pz.adapters.peft.named_parameters() if f".{slot}." in n).mul_(2.0)
        assert pz.engine.forward_state(slot)[0] != state, "an in-place refill is another state"


def test_bench_ttft_local_on_the_tiny_model(tiny_model_dir):
    from personalign.bench.ttft import format_ttft_report, run_local_ttft_bench

    result = run_local_ttft_bench(rounds=1, max_new_tokens=2, model=str(tiny_model_dir))
    assert result["config"]["engine"] == "local" and result["second_turn_reused_tokens"] > 0
    assert 0 < result["ttft_ms"]["retry"] and 0 < result["cached_over_uncached"]
    assert "retry / uncached" in format_ttft_report(result)
