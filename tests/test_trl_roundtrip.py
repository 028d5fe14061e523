"""TRL's preference layouts in and out: JSONL files, ``datasets``, ``enroll`` and HTTP.

Every layout TRL documents for preference data (standard or conversational; explicit or
implicit prompt; extra columns) reads to the same :class:`Comparison`; what personalign writes
goes through TRL's own ``maybe_apply_chat_template`` and ``DPOTrainer`` data preparation.
"""

from __future__ import annotations

import json

import pytest

from personalign.errors import ValidationError
from personalign.server import ServerConfig
from personalign.types import (
    ChatMessage,
    Comparison,
    comparison_from_row,
    from_dataset,
    parse_comparisons,
    preference_record,
    read_preferences,
    split_implicit_text,
    to_dataset,
    write_preferences,
)

CONFIG = ServerConfig(max_tokens_cap=16, default_max_tokens=8, max_body_bytes=64_000, batch_wait_ms=20)
Q, YES, NO = "What color is the sky?", "It is blue.", "It is green."
USER = {"role": "user", "content": Q}
SYSTEM = {"role": "system", "content": "Be brief."}


def _assistant(text):
    return [{"role": "assistant", "content": text}]


TEXT = Comparison(prompt=Q, chosen=YES, rejected=NO)
CHAT = Comparison(prompt=[ChatMessage(**SYSTEM), ChatMessage(**USER)], chosen=YES, rejected=NO)

# (layout name, row, the comparison it reads as) -- the layouts of TRL's "preference" dataset type.
LAYOUTS = [
    ("standard explicit", {"prompt": Q, "chosen": YES, "rejected": NO}, TEXT),
    # TRL's rule: the prompt is all the shared leading text (here "... It is"), less the space before the responses.
    (
        "standard implicit",
        {"chosen": f"{Q} {YES}", "rejected": f"{Q} {NO}"},
        Comparison(prompt=f"{Q} It is", chosen=" blue.", rejected=" green."),
    ),
    (
        "conversational explicit",
        {"prompt": [SYSTEM, USER], "chosen": _assistant(YES), "rejected": _assistant(NO)},
        CHAT,
    ),
    (
        "conversational implicit",
        {"chosen": [SYSTEM, USER, *_assistant(YES)], "rejected": [SYSTEM, USER, *_assistant(NO)]},
        CHAT,
    ),
    (
        "explicit prompt, shared turns in the responses",
        {"prompt": [SYSTEM], "chosen": [USER, *_assistant(YES)], "rejected": [USER, *_assistant(NO)]},
        CHAT,
    ),
    (
        "text prompt, conversational responses",
        {"prompt": Q, "chosen": _assistant(YES), "rejected": _assistant(NO)},
        TEXT,
    ),
]


@pytest.mark.parametrize(("name", "row", "expected"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_every_trl_layout_reads_the_same_everywhere(tmp_path, name, row, expected):
    # enroll() and the HTTP endpoint parse with parse_comparisons; files and datasets with the readers.
    assert parse_comparisons([row]) == [expected]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"user": "kim", **row}) + "\n", encoding="utf-8")
    assert read_preferences(path) == [("kim", expected)]
    assert from_dataset(to_dataset_raw([row])) == [(None, expected)]


def to_dataset_raw(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_ultrafeedback_binarized_rows_load_with_extras_as_metadata(tmp_path):
    # HuggingFaceH4/ultrafeedback_binarized: a text prompt, implicit conversational responses and extra columns.
    row = {
        "prompt": Q,
        "prompt_id": "abc123",
        "chosen": [USER, *_assistant(YES)],
        "rejected": [USER, *_assistant(NO)],
        "messages": [USER, *_assistant(YES)],
        "score_chosen": 8.0,
        "score_rejected": 5.5,
    }
    extras = {k: row[k] for k in ("prompt_id", "messages", "score_chosen", "score_rejected")}
    expected = Comparison(prompt=[ChatMessage(**USER)], chosen=YES, rejected=NO, metadata=extras)
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert read_preferences(path) == [(None, expected)]
    assert from_dataset(to_dataset_raw([row])) == [(None, expected)]
    assert read_preferences(path, extra="ignore") == [(None, expected.model_copy(update={"metadata": None}))]
    assert parse_comparisons([row], extra="metadata") == [expected]
    with pytest.raises(
        ValidationError
    ) as info:  # the API refuses unknown keys unless asked: a typo is not dropped
        parse_comparisons([row])
    assert info.value.field == "comparisons[0].prompt_id" and "metadata" in info.value.fix
    with pytest.raises(ValidationError) as info:
        read_preferences(path, extra="error")
    assert info.value.field == "uf.jsonl:1.prompt_id"


def test_extra_columns_are_written_back_as_columns(tmp_path):
    rows = [
        (
            "kim",
            Comparison(
                prompt=Q, chosen=YES, rejected=NO, weight=2.0, metadata={"prompt_id": "a", "score": 1.5}
            ),
        ),
        (None, Comparison(prompt=Q, chosen=NO, rejected=YES, created_at=5.0)),
    ]
    path = tmp_path / "out.jsonl"
    write_preferences(path, rows)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {
        "user": "kim",
        "prompt": Q,
        "chosen": YES,
        "rejected": NO,
        "weight": 2.0,
        "prompt_id": "a",
        "score": 1.5,
    }
    assert read_preferences(path) == rows
    assert (
        from_dataset(to_dataset(rows)) == rows
    )  # columns a row lacks are null in the dataset, absent again here


def test_metadata_under_its_own_key_and_clashes():
    [merged] = parse_comparisons(
        [{"prompt": Q, "chosen": YES, "rejected": NO, "metadata": {"a": 1}, "b": 2}], extra="metadata"
    )
    assert merged.metadata == {"a": 1, "b": 2}
    with pytest.raises(ValidationError, match="repeats the columns"):
        parse_comparisons(
            [{"prompt": Q, "chosen": YES, "rejected": NO, "metadata": {"a": 1}, "a": 2}], extra="metadata"
        )
    with pytest.raises(ValidationError) as info:
        parse_comparisons([{"prompt": Q, "chosen": YES, "rejected": NO, "metadata": {"user": "x"}}])
    assert info.value.field == "comparisons[0].metadata" and "column names" in str(info.value)


def test_written_conversational_rows_are_conversational_throughout(tmp_path):
    record = preference_record("kim", CHAT)
    assert record["prompt"] == [SYSTEM, USER]
    assert record["chosen"] == _assistant(YES) and record["rejected"] == _assistant(NO)
    assert preference_record(None, TEXT) == {"prompt": Q, "chosen": YES, "rejected": NO}
    assert comparison_from_row(record | {"user": None}, extra="ignore") == CHAT


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [
        (f"{Q} {YES}", f"{Q} {NO}"),
        ("The sky is blue", "The sky is green"),
        ("Answer: 4", "Answer: four"),
        ("ab c", "ab d"),
    ],
)
def test_implicit_text_prompt_matches_trl_extract_prompt(chosen, rejected):
    from trl import extract_prompt

    theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert split_implicit_text(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        (
            {"chosen": [USER, *_assistant(YES), USER, *_assistant("x")], "rejected": [USER, *_assistant(NO)]},
            "r[0].chosen",
            "one assistant message",
        ),
        (
            {"chosen": [USER, *_assistant(YES)], "rejected": [USER, {"role": "user", "content": "?"}]},
            "r[0].rejected",
            "one assistant message",
        ),
        (
            {
                "prompt": "Something else?",
                "chosen": [USER, *_assistant(YES)],
                "rejected": [USER, *_assistant(NO)],
            },
            "r[0].prompt",
            "differs",
        ),
        ({"chosen": "Blue.", "rejected": "Green."}, "r[0].prompt", "share no leading text"),
        ({"chosen": _assistant(YES), "rejected": _assistant(NO)}, "r[0].prompt", "Field required"),
    ],
)
def test_layout_errors_name_the_field(row, field, words):
    with pytest.raises(ValidationError) as info:
        parse_comparisons([row], field="r")
    assert info.value.field == field and words in str(info.value) and info.value.fix


def test_from_dataset_drops_the_null_keys_arrow_adds_to_messages():
    # One message with a "name" gives every message of the column a "name" key, null where absent.
    named = {"role": "system", "content": "Be brief.", "name": "rules"}
    rows = [
        {"prompt": [named, USER], "chosen": _assistant(YES), "rejected": _assistant(NO)},
        {"prompt": [USER], "chosen": _assistant(YES), "rejected": _assistant(NO)},
    ]
    dataset = to_dataset_raw(rows)
    assert dataset[1]["prompt"][0]["name"] is None
    with pytest.raises(ValidationError) as info:  # a key a chat message cannot have is still refused
        from_dataset(dataset)
    assert info.value.field == "dataset[0].prompt[0].name"
    assert from_dataset(dataset.select([1])) == [
        (None, Comparison(prompt=[ChatMessage(**USER)], chosen=YES, rejected=NO))
    ]


def test_to_dataset_refuses_mixed_layouts():
    with pytest.raises(ValidationError, match="mix text and conversational"):
        to_dataset([(None, TEXT), (None, CHAT)])


# --- TRL itself takes what personalign writes --------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import build_tokenizer

    return build_tokenizer()


def test_trl_maybe_apply_chat_template_accepts_written_rows(tmp_path, tokenizer):
    from trl import maybe_apply_chat_template

    path = tmp_path / "rows.jsonl"
    write_preferences(path, [("kim", CHAT), ("kim", TEXT)])
    chat, text = (json.loads(line) for line in path.read_text().splitlines())
    applied = maybe_apply_chat_template(chat, tokenizer)
    assert (
        applied["prompt"]
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert applied["chosen"] == f"{YES}<|im_end|>\n" and applied["rejected"] == f"{NO}<|im_end|>\n"
    assert maybe_apply_chat_template(text, tokenizer) == text  # standard rows pass through unchanged


@pytest.mark.parametrize("layout", ["standard", "conversational"])
def test_trl_dpo_trainer_prepares_and_trains_on_written_datasets(tmp_path, tokenizer, layout):
    import torch
    from trl import DPOConfig, DPOTrainer

    from conftest import build_tiny_llama

    base = TEXT if layout == "standard" else CHAT
    rows = [
        ("kim", base.model_copy(update={"weight": 2.0, "created_at": 1.0, "metadata": {"prompt_id": "p0"}})),
        ("lee", base.model_copy(update={"chosen": NO, "rejected": YES})),
    ]
    dataset = to_dataset(rows)
    assert {"user", "weight", "created_at", "prompt_id"} <= set(dataset.column_names)
    model, ref = (
        build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id) for _ in range(2)
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=2, max_steps=1,
        use_cpu=True, save_strategy="no", logging_strategy="no", dataset_num_proc=None,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    prepared = trainer.train_dataset
    assert len(prepared) == 2
    first = prepared[0]
    decoded = tokenizer.decode(first["prompt_ids"] + first["chosen_ids"])
    if layout == "standard":
        assert decoded == f"{Q}{YES}<|im_end|>"
    else:
        assert decoded == tokenizer.apply_chat_template([SYSTEM, USER, *_assistant(YES)], tokenize=False)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()  # the extra columns do not get in the collator's way
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


# --- enroll() and HTTP take the same layouts ---------------------------------------------------


@pytest.fixture(scope="module")
def personalizer(tiny_generator, encoder, tmp_path_factory):
    from personalign.personalizer import Personalizer

    with Personalizer(tiny_generator, encoder, store=tmp_path_factory.mktemp("trl-store")) as pz:
        yield pz


def test_enroll_and_http_take_trl_conversational_rows(personalizer, http):
    explicit = {"prompt": [USER], "chosen": _assistant(YES), "rejected": _assistant(NO)}
    implicit = {"chosen": [USER, *_assistant(YES)], "rejected": [USER, *_assistant(NO)]}
    profile = personalizer.enroll("trl-sdk", [explicit, implicit])
    assert [c.prompt for c in profile.comparisons] == [[ChatMessage(**USER)]] * 2
    assert {(c.chosen, c.rejected) for c in profile.comparisons} == {(YES, NO)}
    response = http.post("/v1/users/trl-http/comparisons", json={"comparisons": [explicit, implicit]})
    assert response.status_code == 200, response.text
    assert response.json()["comparisons"] == 2
    stored = personalizer.profiles.get("trl-http").comparisons
    assert [(c.prompt, c.chosen, c.rejected) for c in stored] == [([ChatMessage(**USER)], YES, NO)] * 2


def test_metadata_leaves_the_adapter_data_hash_unchanged():
    import hashlib

    from personalign.adapters.lora import data_hash

    # The digest of adapters trained before metadata existed: the dump without created_at.
    before = hashlib.sha256(
        json.dumps({"prompt": Q, "chosen": YES, "rejected": NO, "weight": 1.0}, sort_keys=True).encode()
    ).hexdigest()
    assert (
        data_hash([TEXT]) == before == data_hash([TEXT.model_copy(update={"metadata": {"prompt_id": "x"}})])
    )
