def test_tiny_chat(pz):
    pz.enroll(
        "alice",
        [
            {
                "prompt": "How do I boil an egg?",
                "chosen": "Nine minutes.",
                "rejected": "It depends on many things.",
            }
        ],
    )
    pz.remember("alice", "I am vegetarian and I cook for two.")
    r = pz.respond("alice", [{"role": "user", "content": "Plan my dinner."}], max_new_tokens=8)
    assert r.completion_tokens <= 8
