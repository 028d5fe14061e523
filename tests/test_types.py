"""Input schemas: comparison and user-id validation, and the JSONL preference format (TRL + ``user``)."""

from __future__ import annotations

import json
import math

import pydantic
import pytest

from personalign.errors import PersonalignError, ValidationError
from personalign.types import (
    USER_ID_MAX_LEN,
    ChatMessage,
    Comparison,
    UserProfile,
    parse_comparisons,
    parse_messages,
    read_preferences,
    validate_user_id,
    write_preferences,
)

GOOD = {
    "prompt": "How do I boil an egg?",
    "chosen": "Nine minutes.",
    "rejected": "It depends on many things.",
}


def _bad(**update):
    return {**GOOD, **update}


def _error(items) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_comparisons(items)
    return info.value


# --- Comparison -------------------------------------------------------------------------------


def test_good_comparison_parses_unchanged():
    [parsed] = parse_comparisons([GOOD])
    assert (parsed.prompt, parsed.chosen, parsed.rejected) == (
        GOOD["prompt"],
        GOOD["chosen"],
        GOOD["rejected"],
    )
    assert parsed.weight == 1.0 and parsed.created_at is None
    assert parsed.prompt_text == GOOD["prompt"]


@pytest.mark.parametrize(
    ("update", "field", "words"),
    [
        ({"chosen": ""}, "comparisons[0].chosen", "chosen must not be empty"),
        ({"chosen": "  \n\t "}, "comparisons[0].chosen", "chosen must not be empty"),
        ({"rejected": " "}, "comparisons[0].rejected", "rejected must not be empty"),
        ({"prompt": "   "}, "comparisons[0].prompt", "prompt must not be empty"),
        ({"rejected": "Nine minutes."}, "comparisons[0]", "chosen and rejected must differ"),
        ({"rejected": "  Nine minutes.  "}, "comparisons[0]", "chosen and rejected must differ"),
        ({"weight": math.nan}, "comparisons[0].weight", "greater than 0"),
        ({"weight": math.inf}, "comparisons[0].weight", "finite"),
        ({"weight": -1.0}, "comparisons[0].weight", "greater than 0"),
        ({"weight": 0}, "comparisons[0].weight", "greater than 0"),
        ({"colour": "red"}, "comparisons[0].colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_comparison_names_field_and_fix(update, field, words):
    err = _error([_bad(**update)])
    assert isinstance(err, ValueError) and isinstance(err, PersonalignError)
    assert err.field == field
    message = str(err)
    assert message.startswith(f"{field}: ")
    assert words in message
    assert "Fix: " in message and err.fix


def test_fix_texts_are_specific():
    assert "finite weight greater than 0" in _error([_bad(weight=math.nan)]).fix
    assert "remove this field" in _error([_bad(colour="red")]).fix
    assert "add the missing field" in _error([{"prompt": "p", "chosen": "a"}]).fix
    assert _error([{"prompt": "p", "chosen": "a"}]).field == "comparisons[0].rejected"


def test_chat_message_prompts():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I boil an egg?"},
    ]
    [parsed] = parse_comparisons([_bad(prompt=messages)])
    assert parsed.prompt == [ChatMessage(**m) for m in messages]
    assert parsed.prompt_text == "How do I boil an egg?"  # the last user turn


@pytest.mark.parametrize(
    ("prompt", "field", "fix_words"),
    [
        ([], "comparisons[0].prompt", "non-empty"),
        ([{"role": "user", "content": "   "}], "comparisons[0].prompt", "non-empty"),
        (
            [{"role": "bot", "content": "hi"}],
            "comparisons[0].prompt[0].role",
            "'system', 'user', 'assistant'",
        ),
        ([{"role": "user", "content": "hi", "name": "x"}], "comparisons[0].prompt[0].name", "role, content"),
        ([{"role": "user"}], "comparisons[0].prompt[0].content", "add the missing field"),
        (5, "comparisons[0].prompt", "non-empty"),
    ],
)
def test_bad_chat_prompt_names_the_message_field(prompt, field, fix_words):
    # The field path is the message's, without pydantic's union-member tags ("str", "list[ChatMessage]").
    err = _error([_bad(prompt=prompt)])
    assert err.field == field
    assert fix_words in err.fix


def test_messages_field_paths():
    with pytest.raises(ValidationError) as info:
        parse_messages([{"role": "user", "content": "hi"}, {"role": "user", "content": "x", "name": "n"}])
    assert info.value.field == "messages[1].name" and "role, content" in info.value.fix
    with pytest.raises(ValidationError) as info:
        parse_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert info.value.field == "messages[1].role"
    with pytest.raises(ValidationError, match="^messages: is empty"):
        parse_messages([])


def test_direct_construction_rejects_bad_input_as_value_error():
    # Constructing the model directly raises pydantic's error (also a ValueError); the SDK's entry
    # points (parse_comparisons, enroll, read_preferences) convert it into ours.
    with pytest.raises(ValueError, match="chosen and rejected must differ"):
        Comparison(prompt="p", chosen="same", rejected="same")
    with pytest.raises(pydantic.ValidationError):
        Comparison(prompt="p", chosen="a", rejected="b", extra=1)


def test_comparisons_are_frozen_and_stamped_once():
    [parsed] = parse_comparisons([GOOD])
    with pytest.raises(pydantic.ValidationError):
        parsed.chosen = "other"
    stamped = parsed.stamped(123.0)
    assert stamped.created_at == 123.0 and parsed.created_at is None
    assert stamped.stamped(456.0).created_at == 123.0  # an existing time is kept


# --- parse_comparisons -----------------------------------------------------------------------


def test_parse_reports_index_of_bad_item():
    items = [GOOD, _bad(prompt="Why is the sky blue?"), _bad(chosen="   "), _bad(weight=-2.0)]
    err = _error(items)
    assert err.field == "comparisons[2].chosen"  # the first bad one, by index
    assert str(err).startswith("comparisons[2].chosen: ")


def test_parse_custom_field_prefix_and_non_dict_items():
    with pytest.raises(ValidationError) as info:
        parse_comparisons([GOOD, "not a comparison"], field="body.comparisons")
    assert info.value.field == "body.comparisons[1]"
    assert "Comparison(prompt=" in info.value.fix


def test_parse_empty_and_mixed():
    with pytest.raises(ValidationError, match="^comparisons: is empty"):
        parse_comparisons([])
    ready = Comparison(**GOOD)
    parsed = parse_comparisons([ready, _bad(prompt="Other?")])
    assert parsed[0] is ready and parsed[1].prompt == "Other?"


# --- user ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_id",
    ["alice", "a", "Bob_1", "alice@example.com", "user.name+tag-2", "0", "x" * USER_ID_MAX_LEN],
)
def test_good_user_ids(user_id):
    assert validate_user_id(user_id) == user_id


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("a/b", "not allowed"),
        ("a\\b", "not allowed"),
        ("/etc", "not allowed"),
        ("..", "not allowed"),
        ("a..b", "not allowed"),
        ("../alice", "not allowed"),
        (".hidden", "not allowed"),
        ("-rf", "not allowed"),
        ("a b", "not allowed"),
        ("a\x00b", "not allowed"),
        ("alice\n", "not allowed"),
        ("é", "not allowed"),
        ("x" * (USER_ID_MAX_LEN + 1), "characters long"),
        ("", "characters long"),
        (None, "must be a string"),
        (5, "must be a string"),
        (b"alice", "must be a string"),
    ],
)
def test_bad_user_ids(user_id, problem):
    with pytest.raises(ValidationError) as info:
        validate_user_id(user_id, field="user")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == "user" and problem in err.problem
    assert "Fix: use 1-128 characters" in str(err)


def test_profile_validates_user_id():
    with pytest.raises(ValueError, match="user_id"):
        UserProfile(user_id="../escape")
    assert UserProfile(user_id="alice").version == 0


# --- JSONL preference files ------------------------------------------------------------------


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_round_trip_with_user_column(tmp_path):
    rows = [
        ("alice", Comparison(**GOOD)),
        (
            "bob",
            Comparison(
                prompt="Why is the sky blue?",
                chosen="Scattering.",
                rejected="Magic.",
                weight=2.5,
                created_at=10.0,
            ),
        ),
        (
            None,
            Comparison(
                prompt=[ChatMessage(role="user", content="Hi ☃")], chosen="Hello.", rejected="Go away."
            ),
        ),
    ]
    path = tmp_path / "prefs.jsonl"
    assert write_preferences(path, rows) == 3
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records[0] == {"user": "alice", **GOOD}  # default weight and missing time are not written
    assert records[1]["weight"] == 2.5 and records[1]["created_at"] == 10.0
    assert "user" not in records[2] and records[2]["prompt"] == [{"role": "user", "content": "Hi ☃"}]
    assert "☃" in path.read_text(encoding="utf-8")  # not escaped
    assert read_preferences(path) == rows


def test_round_trip_without_user_column(tmp_path):
    rows = [(None, Comparison(**GOOD)), (None, Comparison(prompt="p", chosen="a", rejected="b", weight=0.5))]
    path = tmp_path / "plain.jsonl"
    write_preferences(path, rows)
    assert all("user" not in json.loads(line) for line in path.read_text().splitlines())
    assert read_preferences(path) == rows


def test_reads_trl_conversational_rows(tmp_path):
    row = {
        "user": "alice",
        "prompt": [{"role": "user", "content": "How do I boil an egg?"}],
        "chosen": [{"role": "assistant", "content": "Nine minutes."}],
        "rejected": [{"role": "assistant", "content": "It depends."}],
    }
    path = _write_lines(tmp_path / "trl.jsonl", [json.dumps(row), "", json.dumps({**GOOD})])
    [(user, comparison), (other, plain)] = read_preferences(path)
    assert user == "alice" and other is None
    assert comparison.chosen == "Nine minutes." and comparison.rejected == "It depends."
    assert comparison.prompt == [ChatMessage(role="user", content="How do I boil an egg?")]
    assert plain == Comparison(**GOOD)


@pytest.mark.parametrize(
    ("bad_line", "field", "words"),
    [
        ("{not json", "prefs.jsonl:3", "not valid JSON"),
        ("[1, 2]", "prefs.jsonl:3", "not a JSON object"),
        (json.dumps(_bad(chosen="")), "prefs.jsonl:3.chosen", "must not be empty"),
        (json.dumps(_bad(rejected=GOOD["chosen"])), "prefs.jsonl:3", "must differ"),
        (json.dumps({"prompt": "p", "chosen": "a"}), "prefs.jsonl:3.rejected", "Field required"),
        (json.dumps({"user": "../root", **GOOD}), "prefs.jsonl:3.user", "not allowed"),
        (
            json.dumps(
                {
                    **GOOD,
                    "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                }
            ),
            "prefs.jsonl:3.chosen",
            "one assistant message",
        ),
    ],
)
def test_bad_line_reports_file_and_line(tmp_path, bad_line, field, words):
    # Line 2 is blank: it is skipped but still counted, so the bad row is reported as line 3.
    path = _write_lines(
        tmp_path / "prefs.jsonl", [json.dumps({"user": "alice", **GOOD}), "  ", bad_line, json.dumps(GOOD)]
    )
    with pytest.raises(ValidationError) as info:
        read_preferences(path)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ") and words in str(info.value)
    assert "Fix: " in str(info.value)


def test_read_preferences_names_a_missing_file_or_a_folder(tmp_path):
    for path, words in ((tmp_path / "missing.jsonl", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(ValidationError) as err:
            read_preferences(path)
        assert err.value.field == "data" and words in str(err.value) and "JSONL file" in str(err.value)


def test_train_recipes_refuse_a_missing_data_file_with_a_typed_error(tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    for recipe in ("fspo", "pplug"):
        result = CliRunner().invoke(
            app, ["train", recipe, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / recipe)]
        )
        assert result.exit_code != 0 and "does not exist" in result.output, (recipe, result.output)
        assert not (tmp_path / recipe).exists()
