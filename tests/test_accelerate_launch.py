"""The shared training loop and the per-user trainer under ``accelerate launch`` with two CPU
processes (gloo).

A MODPO recipe and a user's LoRA on the tiny model, each once in one process and once in two:
the two processes end with bit-equal weights and losses (DDP all-reduces the gradients each
step), the result equals the one-process run up to float rounding (each process trains on its
share of every batch, weighted so the reduced gradient is the whole batch's), and the recipe's
adapters are written once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"
ACCELERATE = Path(sys.executable).parent / "accelerate"
LAUNCH = [
    str(ACCELERATE),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
needs_launcher = pytest.mark.skipif(
    shutil.which(str(ACCELERATE)) is None, reason="the accelerate launcher is not installed"
)


@pytest.fixture(scope="module")
def samples_file(tiny_model_dir, tmp_path_factory):
    from personalign.models import load_generator
    from personalign.training.samples import sample_responses, save_samples

    generator = load_generator(str(tiny_model_dir), device="cpu")
    samples = sample_responses(
        generator, ["Question one", "Task two", "Preferred"], n_per_prompt=4, max_new_tokens=10, batch_size=12
    )
    path = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    save_samples(samples, path)
    return path


def _free_port() -> str:
    """A free local port for the processes' rendezvous (not torchrun's fixed 29500, which a
    concurrent run may hold)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch() -> list[str]:
    return [*LAUNCH, "--main_process_port", _free_port()]


def _run(command: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _compare(single: Path, double: Path) -> dict:
    """The two processes' tensors are bit-equal and match one process's; returns rank 0's report."""
    one, (rank0, rank1) = (
        load_file(str(single / "rank0.safetensors")),
        (load_file(str(double / f"rank{i}.safetensors")) for i in range(2)),
    )
    reports = [json.loads((double / f"rank{i}.json").read_text()) for i in range(2)]
    alone = json.loads((single / "rank0.json").read_text())
    assert [r["processes"] for r in reports] == [2, 2] and alone["processes"] == 1
    assert one.keys() == rank0.keys() == rank1.keys() and len(one) > 0
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), f"{name}: the two processes drifted apart"
        torch.testing.assert_close(
            rank0[name],
            one[name],
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m, n=name: f"{n}: two processes differ from one: {m}",
        )
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in one.items() if "lora_B" in n)  # it trained
    assert reports[0]["loss"] == reports[1]["loss"]
    for key, losses in reports[0]["loss"].items():
        assert losses == pytest.approx(alone["loss"][key], rel=1e-4, abs=1e-5)
    return reports[0]


@needs_launcher
def test_a_recipe_in_two_processes_stays_in_sync_and_matches_one_process(
    tiny_model_dir, samples_file, tmp_path
):
    single, double = tmp_path / "single", tmp_path / "double"
    args = [str(SCRIPTS / "modpo_recipe.py"), str(tiny_model_dir), str(samples_file)]
    _run([sys.executable, *args, str(single)], single)
    _run([*_launch(), *args, str(double)], double)
    report = _compare(single, double)
    # 9 pairs in batches of 4: the last batch of one pair leaves the second process an empty share.
    assert report["pairs"] == {"verbosity": 9, "reading_level": 9}
    adapters = sorted(
        p.parent.relative_to(double / "steering").as_posix()
        for p in (double / "steering").rglob("adapter_config.json")
    )
    assert adapters == ["mix/reading_level", "mix/verbosity"]


@needs_launcher
def test_a_users_adapter_in_two_processes_matches_one_process(tiny_model_dir, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    args = [str(SCRIPTS / "user_adapter.py"), str(tiny_model_dir)]
    _run([sys.executable, *args, str(single)], single)
    _run([*_launch(), *args, str(double)], double)
    report = _compare(single, double)
    assert (
        report["pairs"] == 5 and report["report"]["holdout_pairs"] == 2
    )  # batches of 4 and 1 weighted pairs


@needs_launcher
def test_a_token_weighted_loop_resumed_in_two_processes_matches_one_process(tmp_path):
    """Batches of 3 over 7 items with unequal token counts (the last batch leaves one process
    an empty share), a checkpoint after epoch 2 by ``save_state``, resumed by ``load_state``."""
    single, double = tmp_path / "single", tmp_path / "double"
    script = str(SCRIPTS / "weighted_loop.py")
    _run([sys.executable, script, str(single)], single)
    _run([*_launch(), script, str(double)], double)
    alone = json.loads((single / "rank0.json").read_text())
    ranks = [json.loads((double / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["processes"] for r in ranks] == [2, 2] and alone["processes"] == 1
    assert ranks[0] == {**ranks[1], "processes": 2} and ranks[0]["resumed_from"] == alone["resumed_from"] == 2
    assert ranks[0]["w"] == pytest.approx(alone["w"], rel=1e-5, abs=1e-6)
    assert ranks[0]["loss"]["epochs"] == pytest.approx(alone["loss"]["epochs"], rel=1e-5, abs=1e-6)
    files = sorted(
        p.relative_to(double / "ckpt").as_posix() for p in (double / "ckpt").rglob("*") if p.is_file()
    )
    assert files == [
        "epoch-4/optimizer.bin",
        "epoch-4/random_states_0.pkl",
        "epoch-4/random_states_1.pkl",
        "epoch-4/trainable.safetensors",
        "loop_state.json",
    ]
