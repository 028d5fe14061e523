"""Export to vLLM and LoRAX: every exported adapter loads with PEFT and equals the stored one, and
every generated command line or request parses against the engine's documented arguments."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from personalign.adapters.export import export_adapters, lora_module_arg, vllm_max_lora_rank
from personalign.cli import app
from personalign.errors import ValidationError
from personalign.models import EMBEDDED_GENERATOR, EMBEDDED_GENERATOR_HUB_ID, load_generator
from personalign.personalizer import Personalizer

PAIRS = [
    {"prompt": f"Q{i}?", "chosen": "Short.", "rejected": "A much longer answer than that."} for i in range(3)
]

# ---------------------------------------------------------------------------------------------
# The engines' documented arguments, copied by hand (no vLLM or LoRAX install needed). Only the
# flags export may emit plus their neighbours: a flag missing here is a flag export must not use.
#
# vLLM, `vllm serve MODEL_TAG [options]`, read from vllm-project/vllm main:
#   vllm/engine/arg_utils.py `add_cli_args`, LoRAConfig group (commit 99d7eb5d): --enable-lora is
#     argparse.BooleanOptionalAction; the others come from LoRAConfig through get_kwargs, where a
#     Literal becomes type + choices and a list becomes nargs="+";
#   vllm/config/lora.py (commit 01230b40): MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320,
#     512]; max_loras >= 1; max_cpu_loras >= max_loras; lora_dtype in auto/float16/bfloat16.
#     Also https://docs.vllm.ai/en/v0.14.0/api/vllm/config/lora/ . Releases before the Literal
#     (<= v0.10) checked possible_max_ranks = (8, 16, 32, 64, 128, 256, 320, 512) instead;
#   vllm/entrypoints/openai/cli_args.py (commit 00522333) LoRAParserAction: an item with "=" and
#     no "," is name=path (split on "="), anything else a JSON {"name", "path", "base_model_name"}.
VLLM_MAX_LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_OLD_MAX_LORA_RANKS = [8, 16, 32, 64, 128, 256, 320, 512]
VLLM_SERVE_ARGS = {
    "model_tag": {},
    "--enable-lora": {"action": argparse.BooleanOptionalAction},
    "--max-loras": {"type": int},
    "--max-lora-rank": {"type": int, "choices": VLLM_MAX_LORA_RANKS},
    "--max-cpu-loras": {"type": int},
    "--lora-dtype": {"choices": ["auto", "float16", "bfloat16"]},
    "--fully-sharded-loras": {"action": argparse.BooleanOptionalAction},
    "--lora-modules": {"nargs": "+"},
    "--served-model-name": {"nargs": "+"},
    "--host": {},
    "--port": {"type": int},
}
VLLM_RESOLVER_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_PLUGINS", "VLLM_LORA_RESOLVER_CACHE_DIR"}

# LoRAX, `lorax-launcher [OPTIONS]`, read from predibase/lorax main at commit a7394ba3
# (launcher/src/main.rs `struct Args`, clap long flags; also docs/reference/launcher.md). There is
# no rank flag. The source flags are plain strings to clap; the choices below are the sources
# the server accepts, server/lorax_server/utils/sources/__init__.py (hub, s3, local, pbase). Request bodies: router/src/lib.rs `GenerateRequest` {inputs, parameters:
# GenerateParameters} and `ChatCompletionRequest` (model is the adapter id, plus adapter_source);
# docs/models/adapters/index.md "Local": adapter_id is the adapter folder, adapter_source "local".
LORAX_ADAPTER_SOURCES = ["hub", "s3", "local", "pbase"]
LORAX_LAUNCHER_ARGS = {
    "--model-id": {},
    "--adapter-id": {},
    "--source": {"choices": ["hub", "s3", "local"]},
    "--adapter-source": {"choices": LORAX_ADAPTER_SOURCES},
    "--default-adapter-source": {"choices": LORAX_ADAPTER_SOURCES},
    "--revision": {},
    "--preloaded-adapter-ids": {"action": "append"},
    "--preloaded-adapter-source": {"choices": LORAX_ADAPTER_SOURCES},
    "--max-active-adapters": {"type": int},
    "--adapter-cycle-time-s": {"type": int},
    "--adapter-memory-fraction": {"type": float},
    "--dtype": {"choices": ["float16", "bfloat16"]},
    "--hostname": {},
    "--port": {"type": int},
}
LORAX_GENERATE_PARAMETERS = {
    "adapter_id", "adapter_source", "merged_adapters", "api_token", "best_of", "temperature",
    "repetition_penalty", "frequency_penalty", "presence_penalty", "top_k", "top_p", "typical_p",
    "do_sample", "max_new_tokens", "ignore_eos_token", "return_full_text", "stop", "truncate",
    "watermark", "details", "decoder_input_details", "return_k_alternatives", "apply_chat_template",
    "seed", "response_format",
}  # fmt: skip
LORAX_CHAT_FIELDS = {
    "model", "messages", "temperature", "top_p", "n", "max_tokens", "stop", "stream",
    "presence_penalty", "frequency_penalty", "logit_bias", "user", "seed", "response_format", "tools",
    "tool_choice", "repetition_penalty", "top_k", "ignore_eos_token", "adapter_source", "api_token",
    "tool_prompt", "guideline",
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of exiting, so a bad command is a test failure
        raise ValueError(message)


def _parser(prog: str, table: dict[str, dict]) -> _Parser:
    parser = _Parser(prog=prog, allow_abbrev=False)  # neither clap nor vLLM expands abbreviations
    for flag, kwargs in table.items():
        parser.add_argument(flag, **kwargs)
    return parser


def parse_vllm_serve(command: str) -> tuple[dict[str, str], argparse.Namespace, list[dict]]:
    """Split ``ENV=... vllm serve ...`` into environment, arguments and --lora-modules as vLLM reads them."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["vllm", "serve"], words
    args = _parser("vllm serve", VLLM_SERVE_ARGS).parse_args(words[2:])
    assert args.max_loras >= 1 and (args.max_cpu_loras is None or args.max_cpu_loras >= args.max_loras)
    modules = []
    for item in args.lora_modules or []:  # LoRAParserAction
        if "=" in item and "," not in item:
            name, path = item.split("=")  # more than one "=" fails here, as in vLLM
            modules.append({"name": name, "path": path})
        else:
            modules.append(json.loads(item))
            assert set(modules[-1]) <= {"name", "path", "base_model_name"}
    return env, args, modules


@pytest.fixture(scope="module")
def trained_store(tiny_model_dir, encoder, tmp_path_factory):
    store = tmp_path_factory.mktemp("export-store")
    with Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, store=store) as pz:
        for user in ("ana", "ben"):
            pz.enroll(
                user,
                PAIRS,
                adapter=True,
                adapter_config={"epochs": 1, "rank": 4, "seed": 1 if user == "ben" else 0},
            )
    return store


@pytest.mark.parametrize("engine", ["vllm", "lorax"])
def test_exported_adapters_load_with_peft_and_equal_the_stored_ones(
    engine, trained_store, tiny_model_dir, tmp_path
):
    out = tmp_path / engine
    manifest = export_adapters(trained_store / "users", ["ana", "ben"], engine, out)
    assert manifest["base_model"] == str(tiny_model_dir)  # the base the adapters name
    AutoConfig.from_pretrained(manifest["base_model"])  # a folder transformers (and engines) load
    assert set(manifest["adapters"]) == {"ana", "ben"}
    for user in ("ana", "ben"):
        config = json.loads((out / user / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_model_dir) and not config.get("modules_to_save")
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        peft = PeftModel.from_pretrained(base, str(out / user), adapter_name="x")
        stored = load_file(trained_store / "users" / user / "adapter" / "adapter_model.safetensors")
        loaded = {k.replace(".x.", "."): v for k, v in peft.state_dict().items() if ".x." in k}
        assert stored.keys() == loaded.keys()
        for key in stored:
            torch.testing.assert_close(loaded[key], stored[key], rtol=0, atol=0)
    # PEFT's one-liner finds the base from adapter_config.json alone
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out / "ana"))
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out / "ana")
    )
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(auto(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert json.loads((out / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        (1, 8),
        (4, 8),
        (8, 8),
        (9, 16),
        (16, 16),
        (33, 64),
        (128, 128),
        (200, 256),
        (257, 320),
        (321, 512),
        (512, 512),
    ],
)
def test_vllm_max_lora_rank_rounds_up_to_a_rank_every_vllm_accepts(rank, expected):
    """The smallest of vLLM's ranks >= max(rank, 8): 8 is the floor because releases before
    ``MaxLoRARanks`` (which added 1) refuse 1, so the command starts on both."""
    assert vllm_max_lora_rank(rank) == expected
    assert expected in VLLM_MAX_LORA_RANKS and expected in VLLM_OLD_MAX_LORA_RANKS


@pytest.mark.parametrize("rank", [0, -1, 513, 1024, 2.0, True])
def test_vllm_max_lora_rank_refuses_ranks_vllm_cannot_serve(rank):
    with pytest.raises(ValidationError, match="rank"):
        vllm_max_lora_rank(rank)


def test_the_argument_table_rejects_what_vllm_rejects(tmp_path):
    """The table is strict enough to catch the old export's mistakes."""
    good = f"vllm serve m --enable-lora --max-loras 2 --max-lora-rank 8 --lora-modules a={tmp_path}"
    parse_vllm_serve(good)
    for bad in (
        good.replace("--max-lora-rank 8", "--max-lora-rank 4"),  # not one of vLLM's ranks
        good + " --max-lora-ranks 8",  # unknown flag
        good.replace("--max-loras 2", "--max-loras 2 --max-cpu-loras 1"),  # fewer CPU than GPU slots
        good.replace(f"a={tmp_path}", "a=/x=y"),  # name=path with a second "="
    ):
        with pytest.raises((ValueError, AssertionError)):
            parse_vllm_serve(bad)
    with pytest.raises(ValueError, match="unrecognized"):
        _parser("lorax-launcher", LORAX_LAUNCHER_ARGS).parse_args(["--model-id", "m", "--max-lora-rank", "8"])


def test_vllm_command_parses_against_vllms_arguments(trained_store, tiny_model_dir, tmp_path):
    out = tmp_path / "served"
    manifest = export_adapters(trained_store / "users", ["ana", "ben"], "vllm", out)
    env, args, modules = parse_vllm_serve(manifest["command"])
    assert env == {} and args.model_tag == str(tiny_model_dir) and args.enable_lora
    assert args.max_loras == 2 and args.max_lora_rank == 8  # rank-4 adapters, rounded up
    assert modules == [{"name": u, "path": str((out / u).resolve())} for u in ("ana", "ben")]
    assert (out / "serve.sh").read_text().strip().endswith(manifest["command"])
    assert f"#   {manifest['resolver_command']}" in (out / "serve.sh").read_text()
    env, args, modules = parse_vllm_serve(manifest["resolver_command"])
    assert set(env) == VLLM_RESOLVER_ENV and env["VLLM_LORA_RESOLVER_CACHE_DIR"] == str(out.resolve())
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver" and modules == []
    # vLLM's filesystem resolver loads <cache>/<name> only if its base equals the served model name
    for user in ("ana", "ben"):
        config = json.loads((out / user / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == args.model_tag


def test_vllm_command_caps_gpu_slots_and_keeps_paths_vllm_can_split(trained_store, tmp_path):
    users = trained_store / "users"
    many = tmp_path / "many-users"
    for i in range(34):
        shutil.copytree(users / "ana", many / f"u{i}")
    manifest = export_adapters(many, [f"u{i}" for i in range(34)], "vllm", tmp_path / "o=1,2")
    _, args, modules = parse_vllm_serve(manifest["command"])
    assert args.max_loras == 32 and args.max_cpu_loras == 34  # all 34 stay in the CPU cache
    assert [m["path"] for m in modules] == [a["path"] for a in manifest["adapters"].values()]
    assert lora_module_arg("a", "/p", "b") == "a=/p"


def test_lorax_launcher_and_requests_match_loraxs_arguments(trained_store, tiny_model_dir, tmp_path):
    out = tmp_path / "lorax"
    manifest = export_adapters(trained_store / "users", ["ana", "ben"], "lorax", out)
    lorax = json.loads((out / "lorax.json").read_text())
    assert shlex.join(lorax["launcher"]) == manifest["command"]
    assert lorax["launcher"][0] == "lorax-launcher"
    args = _parser("lorax-launcher", LORAX_LAUNCHER_ARGS).parse_args(lorax["launcher"][1:])
    assert args.model_id == str(tiny_model_dir) and args.default_adapter_source == "local"
    ana = str((out / "ana").resolve())
    assert lorax["adapters"]["ana"] == {"adapter_id": ana, "adapter_source": "local"}
    generate = json.loads((out / "request_example.json").read_text())
    assert set(generate) == {"inputs", "parameters"} and isinstance(generate["inputs"], str)
    assert set(generate["parameters"]) <= LORAX_GENERATE_PARAMETERS
    assert generate["parameters"]["adapter_id"] == ana and generate["parameters"]["adapter_source"] == "local"
    chat = json.loads((out / "chat_request_example.json").read_text())
    assert set(chat) <= LORAX_CHAT_FIELDS and chat["model"] == ana and chat["adapter_source"] == "local"
    assert all(set(m) == {"role", "content"} for m in chat["messages"])


@pytest.mark.parametrize("engine", ["vllm", "lorax"])
def test_written_files_name_no_path_outside_out(engine, trained_store, tmp_path):
    """Apart from the adapters' own provenance file, nothing written names the store or the training folder."""
    out = tmp_path / "out"
    export_adapters(trained_store / "users", ["ana"], engine, out, base_model=EMBEDDED_GENERATOR_HUB_ID)
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".sh") and path.name != "personalign_adapter.json":
            text = path.read_text()
            assert str(trained_store) not in text and str(Path.home()) not in text, path
            assert str(tmp_path) not in text.replace(str(out.resolve()), ""), path


def test_embedded_adapters_default_to_the_hub_id_with_a_note(trained_store, tmp_path):
    """Adapters naming the embedded model (hub id, or the old pseudo-id) export for the hub id."""
    users = tmp_path / "users"
    for user, base in (("new", EMBEDDED_GENERATOR_HUB_ID), ("old", EMBEDDED_GENERATOR)):
        shutil.copytree(trained_store / "users" / "ana", users / user)
        path = users / user / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": base}))
    manifest = export_adapters(users, ["new", "old"], "vllm", tmp_path / "o")
    assert manifest["base_model"] == EMBEDDED_GENERATOR_HUB_ID
    assert "de-quantised" in manifest["notes"][0] and "--base-model" in manifest["notes"][0]
    _, args, _ = parse_vllm_serve(manifest["command"])
    assert args.model_tag == EMBEDDED_GENERATOR_HUB_ID
    for user in ("new", "old"):
        config = json.loads((tmp_path / "o" / user / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == EMBEDDED_GENERATOR_HUB_ID
    with pytest.raises(ValidationError, match="personalign's id"):
        export_adapters(users, ["new"], "vllm", tmp_path / "p", base_model=EMBEDDED_GENERATOR)


def test_export_errors(trained_store, tiny_model_dir, tmp_path):
    users = trained_store / "users"
    with pytest.raises(ValidationError, match="have no adapter"):
        export_adapters(users, ["ana", "nobody"], "vllm", tmp_path / "o", base_model="m")
    with pytest.raises(ValidationError, match="engine"):
        export_adapters(users, ["ana"], "tgi", tmp_path / "o", base_model="m")  # type: ignore[arg-type]
    mixed = tmp_path / "mixed"
    shutil.copytree(users / "ana", mixed / "ana")
    shutil.copytree(users / "ben", mixed / "ben")
    config = mixed / "ben" / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "other/m"}))
    with pytest.raises(ValidationError, match="--base-model"):
        export_adapters(mixed, ["ana", "ben"], "vllm", tmp_path / "o")
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 1024}))
    with pytest.raises(ValidationError, match="ben.*512"):
        export_adapters(mixed, ["ben"], "vllm", tmp_path / "o", base_model=str(tiny_model_dir))
    assert not (tmp_path / "o").exists()
    manifest = export_adapters(mixed, ["ana", "ben"], "lorax", tmp_path / "l", base_model=str(tiny_model_dir))
    assert "other/m" in manifest["notes"][0]  # served on a base one adapter does not name: said so


def test_cli_prints_the_command_on_stdout_and_notes_on_stderr(trained_store, tmp_path):
    users = tmp_path / "store" / "users"
    shutil.copytree(trained_store / "users" / "ana", users / "ana")
    path = users / "ana" / "adapter" / "adapter_config.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": EMBEDDED_GENERATOR})
    )
    common = ["--users", "ana", "--out", str(tmp_path / "o"), "--store", str(tmp_path / "store")]
    result = CliRunner().invoke(app, ["export", "--engine", "vllm", *common])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == json.loads((tmp_path / "o" / "manifest.json").read_text())["command"]
    assert parse_vllm_serve(result.stdout.strip())[1].model_tag == EMBEDDED_GENERATOR_HUB_ID
    assert result.stderr.startswith("note: ") and "de-quantised" in result.stderr
    result = CliRunner().invoke(app, ["export", "--engine", "lorax", "--base-model", "org/m", *common])
    assert result.exit_code == 0 and result.stdout.strip() == shlex.join(
        ["lorax-launcher", "--model-id", "org/m", "--default-adapter-source", "local"]
    )
