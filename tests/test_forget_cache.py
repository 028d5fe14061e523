"""forget leaves nothing of the user in this process either: the encoder cache drops their texts."""


def test_forget_evicts_the_users_texts_from_the_encoder_cache(pz):
    pz.enroll(
        "ana",
        [
            {
                "prompt": "Unique prompt about zebras?",
                "chosen": "Short zebra.",
                "rejected": "A long zebra answer.",
            }
        ],
    )
    pz.remember("ana", "My secret hobby is competitive origami.")
    pz.remember("bob", "Bob's unrelated fact.")
    pz.respond("ana", [{"role": "user", "content": "Tell me about zebras"}], max_new_tokens=2)
    cache = pz.encoder._cache
    assert "My secret hobby is competitive origami." in cache and "Unique prompt about zebras?" in cache
    pz.forget("ana")
    assert (
        "My secret hobby is competitive origami." not in cache and "Unique prompt about zebras?" not in cache
    )
    assert "Bob's unrelated fact." in cache


def test_profile_command_does_not_create_a_store(tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    out = CliRunner().invoke(app, ["profile", "--user", "x", "--store", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "not a personalign store" in out.output
    assert not (tmp_path / "nope").exists()


def test_rejected_remember_creates_no_user(pz):
    import pytest

    from personalign.errors import ValidationError

    with pytest.raises(ValidationError, match="texts"):
        pz.remember("newbie", "   ")
    with pytest.raises(ValidationError, match="metadata"):
        pz.remember("newbie", "fine text", metadata={"user_id": "x"})
    assert not pz.profiles.exists("newbie") and pz.memory.count("newbie") == 0
