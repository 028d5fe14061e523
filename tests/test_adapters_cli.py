"""CLI: train a user's adapter, then export it for vLLM."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from personalign.cli import app

runner = CliRunner()


def test_train_user_lora_then_export(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    data = tmp_path / "c.jsonl"
    rows = [
        {"prompt": f"Q{i}?", "chosen": "Short.", "rejected": "A much longer answer than that."}
        for i in range(5)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--store", str(store), "--model", str(tiny_model_dir)]
    out = runner.invoke(
        app,
        ["train", "user-lora", "--user", "ana", "--file", str(data), "--epochs", "1", "--rank", "4", *common],
    )
    assert out.exit_code == 0, out.output
    assert "ana: adapter trained on 5 pairs (5 stored)" in out.output
    out = runner.invoke(
        app, ["train", "user-lora", "--user", "ana", "--epochs", "1", "--rank", "4", *common]
    )  # retrain on stored pairs
    assert out.exit_code == 0 and "trained on 5 pairs" in out.output, out.output
    out = runner.invoke(
        app,
        [
            "export",
            "--engine",
            "vllm",
            "--users",
            "ana",
            "--out",
            str(tmp_path / "x"),
            "--base-model",
            str(tiny_model_dir),
            "--store",
            str(store),
        ],
    )
    assert out.exit_code == 0, out.output
    assert (
        out.output.strip().startswith("vllm serve")
        and (tmp_path / "x" / "ana" / "adapter_model.safetensors").is_file()
    )
    out = runner.invoke(
        app,
        [
            "export",
            "--engine",
            "vllm",
            "--users",
            "bob",
            "--out",
            str(tmp_path / "y"),
            "--base-model",
            "m",
            "--store",
            str(store),
        ],
    )
    assert out.exit_code == 1 and "have no adapter" in out.output
    out = runner.invoke(app, ["train", "user-lora", "--user", "nobody", *common])
    assert out.exit_code == 1 and "not enrolled" in out.output
