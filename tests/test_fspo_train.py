"""FSPO meta-training: tasks, the two stages, the saved adapter in chat, and eval generate."""

from __future__ import annotations

import json

import pytest
import torch

from personalign.adapters.store import AdapterError
from personalign.conditioning.fspo import (
    FSPO_CONFIG,
    FspoTrainConfig,
    _encode,
    _logps,
    fspo_tasks,
    save_fspo,
    task_prompt_ids,
    train_fspo,
)
from personalign.errors import ValidationError
from personalign.eval.generate import GenerateConfig, generation_split, run_generate
from personalign.personalizer import Personalizer
from personalign.training.loop import LoopConfig
from personalign.types import Comparison


def _users(n_users: int = 3, per_user: int = 6) -> dict[str, list[Comparison]]:
    return {
        f"u{u}": [
            Comparison(prompt=f"Question {u}-{i} about eggs?", chosen=f"Boil it {i} minutes.", rejected="No.")
            for i in range(per_user)
        ]
        for u in range(n_users)
    }


def test_tasks_are_windows_of_one_user_with_an_unseen_query():
    users = _users()
    users["short"] = users["u0"][:2]  # fewer than shots + 1: skipped
    tasks = fspo_tasks(users, shots=3, per_user=2, seed=0)
    assert len(tasks) == 6 and {t.user for t in tasks} == {"u0", "u1", "u2"}
    for task in tasks:
        assert len(task.shots) == 3 and all(c in users[task.user] for c in task.shots)
        assert task.query.prompt_text not in {c.prompt_text for c in task.shots}
    assert [t.query for t in fspo_tasks(users, 3, 2, seed=0)] == [t.query for t in tasks]
    assert [t.query for t in fspo_tasks(users, 3, 2, seed=1)] != [t.query for t in tasks]


def _fresh(tiny_model_dir):
    from personalign.models import load_generator

    return load_generator(
        str(tiny_model_dir), device="cpu"
    )  # training wraps the model: never the shared fixture


def _config(epochs: int = 1, ipo_tasks: int = 4) -> FspoTrainConfig:
    return FspoTrainConfig(
        shots=2,
        sft_tasks=4,
        ipo_tasks=ipo_tasks,
        beta=0.1,
        max_length=400,
        sft=LoopConfig(epochs=epochs, learning_rate=1e-2, batch_size=2),
        ipo=LoopConfig(epochs=epochs, learning_rate=1e-3, batch_size=2),
    )


def test_sft_then_ipo_lower_their_losses_and_widen_the_margin(tiny_model_dir):
    generator = _fresh(tiny_model_dir)
    users = _users()
    model, report = train_fspo(generator, users, _config(epochs=4))
    assert report.sft.epoch_loss[-1] < report.sft.epoch_loss[0]
    assert report.ipo is not None and report.ipo.epoch_loss[-1] < report.ipo.epoch_loss[0]
    # after IPO the adapter prefers the chosen answers more than the base model does
    rows = _encode(generator.tokenizer, fspo_tasks(users, 2, 2, seed=0), 400)[-4:]
    pad = generator.tokenizer.pad_token_id
    with torch.no_grad():
        tuned = [(_logps(model, [(r.prompt, r.chosen), (r.prompt, r.rejected)], pad)[0]) for r in rows]
        with model.disable_adapter():
            base = [(_logps(model, [(r.prompt, r.chosen), (r.prompt, r.rejected)], pad)[0]) for r in rows]
    assert sum(float(t[0] - t[1]) for t in tuned) > sum(float(b[0] - b[1]) for b in base)


def test_task_prompt_is_the_chat_layout(tiny_generator):
    task = fspo_tasks(_users(), shots=2, per_user=1, seed=0)[0]
    text = tiny_generator.tokenizer.decode(task_prompt_ids(tiny_generator.tokenizer, task))
    assert "## Preferred Response" in text and "# Task" in text and text.rstrip().endswith("assistant")
    assert text.index(task.shots[0].chosen) < text.index(task.query.prompt_text)


def test_empty_training_data_is_a_typed_error(tiny_model_dir):
    with pytest.raises(ValidationError, match="users"):
        train_fspo(_fresh(tiny_model_dir), {"u0": _users()["u0"][:1]}, _config())


def test_chat_uses_the_fspo_adapter_only_with_shots(fspo_folder, tiny_model_dir, encoder, tmp_path):
    meta = json.loads((fspo_folder / FSPO_CONFIG).read_text())
    assert meta["recipe"] == "fspo" and meta["sft_epoch_loss"]
    with (
        Personalizer(_fresh(tiny_model_dir), encoder, tmp_path / "a", fspo=fspo_folder) as pz,
        Personalizer(_fresh(tiny_model_dir), encoder, tmp_path / "b") as plain,
    ):
        for p in (pz, plain):
            p.enroll("ann", _users()["u0"])
        msgs = [{"role": "user", "content": "Question 9 about eggs?"}]
        opts = {"max_new_tokens": 12, "memory": False}
        with_adapter = pz.chat("ann", msgs, **opts)
        assert with_adapter != plain.chat("ann", msgs, **opts)
        assert pz.chat("ann", msgs, fspo=False, **opts) == plain.chat("ann", msgs, **opts)
        # no shots: nothing to condition on, so the adapter stays off and generation is plain
        assert pz.chat("ann", msgs, shots=False, **opts) == plain.chat(None, msgs, max_new_tokens=12)
        batch = pz.chat_batch(
            [
                {"user": "ann", "messages": msgs, **opts},
                {"user": None, "messages": msgs, "max_new_tokens": 12},
            ]
        )
        assert batch == [with_adapter, plain.chat(None, msgs, max_new_tokens=12)]


def test_fspo_adapter_for_another_model_is_refused(fspo_folder, tiny_generator, encoder, tmp_path):
    meta = json.loads((fspo_folder / FSPO_CONFIG).read_text())
    other = tmp_path / "other"
    other.mkdir()
    for f in fspo_folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / FSPO_CONFIG).write_text(json.dumps({**meta, "base_model": "someone/else"}))
    with pytest.raises(AdapterError, match="trained for base model 'someone/else'.*personalign train fspo"):
        Personalizer(tiny_generator, encoder, tmp_path / "s", fspo=other)
    with pytest.raises(AdapterError, match="has no fspo_config.json"):
        Personalizer(tiny_generator, encoder, tmp_path / "s2", fspo=tmp_path)


def test_generation_split_keeps_users_and_topics_apart():
    split = generation_split(seed=0, shots=4)
    test_users = {u.user for u in split.test}
    assert not test_users & set(split.train) and len(split.prompts) == 15
    held = set(split.prompts)
    assert all(c.prompt_text not in held for cs in split.train.values() for c in cs)
    assert all(len(u.shots) == 4 and all(c.prompt_text not in held for c in u.shots) for u in split.test)


def test_eval_generate_reports_win_rates(fspo_folder, tiny_model_dir, encoder, tmp_path):
    config = GenerateConfig(
        methods=["fspo-prompt", "fspo-trained", "fspo-shuffled"],
        users=2,
        prompts_per_user=1,
        shots=1,
        max_new_tokens=6,
    )
    with Personalizer(_fresh(tiny_model_dir), encoder, tmp_path / "s", fspo=fspo_folder) as pz:
        result = run_generate(pz, config)
        with pytest.raises(ValidationError, match="Persona-Plug"):
            run_generate(pz, GenerateConfig(methods=["pplug"]))
    for r in result["methods"].values():
        assert r["n"] == 2 and 0.0 <= r["win_rate"] <= 1.0 and r["ci"][0] <= r["win_rate"] <= r["ci"][1]
    assert set(result["generic"]["mean_attributes"]) >= {"length", "structure"}


def test_user_description_is_cached_per_version_and_forgotten(pz):
    from personalign.conditioning.fspo import DESCRIPTION_PREFIX, first_sentence, with_description

    assert first_sentence("\n  Likes short answers. Also dogs.\nmore") == "Likes short answers."
    assert with_description([{"role": "user", "content": "q"}], "Likes X.")[0] == {
        "role": "system",
        "content": DESCRIPTION_PREFIX + "Likes X.",
    }
    pz.enroll("ann", _users()["u0"][:2])
    first = pz.describe("ann")
    assert first == pz.describe("ann") and pz._descriptions["ann"][1] == first
    msgs = [{"role": "user", "content": "Question 9 about eggs?"}]
    result = pz.respond("ann", msgs, describe=True, max_new_tokens=6, memory=False)
    assert (
        result.description == first
        and pz.respond("ann", msgs, max_new_tokens=6, memory=False).description is None
    )
    pz.enroll("ann", _users()["u1"][:1])
    assert pz._descriptions["ann"][0][1:] != (pz.profile("ann").version, 3)  # stale until asked again
    pz.describe("ann")
    assert pz._descriptions["ann"][0][1:] == (pz.profile("ann").version, 3)
    pz.forget("ann")
    assert "ann" not in pz._descriptions


def test_merge_generate_refuses_runs_of_other_settings():
    from personalign.eval.generate import merge_generate

    base = {
        "split": {"seed": 0},
        "config": {
            "users": 2,
            "prompts_per_user": 1,
            "shots": 1,
            "seed": 0,
            "max_new_tokens": 6,
            "methods": ["a"],
        },
        "generic": {"x": 1},
        "methods": {"a": {"win_rate": 0.5}},
        "seconds": {"a": 1.0},
    }
    other = {**base, "methods": {"b": {"win_rate": 0.7}}, "seconds": {"b": 2.0}}
    merged = merge_generate([base, other])
    assert list(merged["methods"]) == ["a", "b"] and merged["config"]["methods"] == ["a", "b"]
    with pytest.raises(ValidationError, match=r"results\[1\]"):
        merge_generate([base, {**other, "generic": {"x": 2}}])


def test_saved_adapter_names_its_real_base_and_old_pseudo_id_folders_still_load(
    tiny_model_dir, encoder, tmp_path, monkeypatch
):
    """The embedded model loads from a converted local folder under a pseudo-id: the adapter names
    the hub id it stands for (what ``AutoPeftModelForCausalLM`` loads), ``fspo_config.json`` keeps
    personalign's id, and folders written before (naming the pseudo-id) still load."""
    from personalign import models

    monkeypatch.setitem(models.BASE_ALIASES, "embedded:tiny", "personalign-tests/tiny-llama")
    generator = _fresh(tiny_model_dir)
    generator.model_id = "embedded:tiny"
    config = _config(ipo_tasks=0).model_copy(
        update={
            "sft": LoopConfig(
                epochs=1, learning_rate=1e-2, batch_size=2, checkpoint_dir=str(tmp_path / "ckpt")
            )
        }
    )
    model, report = train_fspo(generator, _users(), config)
    folder = save_fspo(model, tmp_path / "adapter", generator.model_id, config, report, "test")
    adapter_config, meta = (
        json.loads((folder / name).read_text()) for name in ("adapter_config.json", FSPO_CONFIG)
    )
    assert (
        adapter_config["base_model_name_or_path"]
        == meta["base_model_name_or_path"]
        == "personalign-tests/tiny-llama"
    )
    assert (
        meta["base_model"] == "embedded:tiny" and str(tmp_path) not in (folder / FSPO_CONFIG).read_text()
    )  # no machine path
    serving = _fresh(tiny_model_dir)  # training wrapped the first one in PEFT
    serving.model_id = "embedded:tiny"
    with Personalizer(serving, encoder, tmp_path / "s", fspo=folder) as pz:
        assert pz.fspo_folder == folder
    (folder / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": "embedded:tiny"})
    )  # written before
    with Personalizer(serving, encoder, tmp_path / "s2", fspo=folder) as pz:
        assert pz.fspo_folder == folder
    hub = _fresh(tiny_model_dir)  # the same base loaded by its hub id finds the adapter too
    hub.model_id = "personalign-tests/tiny-llama"
    with Personalizer(hub, encoder, tmp_path / "s3", fspo=folder) as pz:
        assert pz.fspo_folder == folder
