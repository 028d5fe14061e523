"""`personalign serve --chroma-url` against a real `chroma run` on loopback, in real processes.

Also: a second process opening the same store gets a clear error, and the CLI's own checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from personalign.cli import app
from personalign.server.run import bound_socket

CHROMA = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
KEY = "sk-test-tenant-key"


def free_port() -> int:
    with bound_socket() as sock:
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"{process.args[:3]} exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def serve_command(store: Path, port: int, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "personalign.cli",
        "serve",
        "--store",
        str(store),
        "--port",
        str(port),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--log-level",
        "warning",
        *extra,
    ]


@pytest.fixture()
def chroma_server(tmp_path):
    if CHROMA is None:
        pytest.skip("the `chroma` command (from the chromadb package) is not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            CHROMA,
            "run",
            "--path",
            str(tmp_path / "chroma-server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/v2/heartbeat", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def test_serve_with_chroma_server_and_api_keys(chroma_server, tiny_model_dir, tmp_path):
    import chromadb

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": KEY, "tenant": "acme"}]}))
    store, port = tmp_path / "store", free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    command = serve_command(
        store,
        port,
        tiny_model_dir,
        "--chroma-url",
        chroma_server,
        "--api-keys",
        str(keys),
        "--max-batch",
        "4",
        "--max-tokens",
        "32",
    )
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server)
        # A second process on the same store is refused at once, with the fix in the message.
        second = subprocess.Popen(
            serve_command(store, free_port(), tiny_model_dir), env=env, stderr=subprocess.PIPE, text=True
        )

        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            comparisons = [
                {
                    "prompt": "How do I boil an egg?",
                    "chosen": "Nine minutes.",
                    "rejected": "A long story about eggs.",
                }
            ]
            assert (
                http.post("/v1/users/sam/comparisons", json={"comparisons": comparisons}).status_code == 200
            )
            assert (
                http.post(
                    "/v1/users/sam/memories", json={"text": ["I am vegetarian.", "I cook for two."]}
                ).status_code
                == 200
            )
            found = http.get(
                "/v1/users/sam/memories", params={"query": "vegetarian food", "top_k": 1}
            ).json()["results"]
            assert [m["memory"] for m in found] == ["I am vegetarian."]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(
            model="personalign",
            messages=[{"role": "user", "content": "Plan a vegetarian dinner."}],
            user="sam",
            max_tokens=5,
            extra_body={"memory_threshold": -1.0},
        )
        assert sorted(reply.model_extra["personalign"]["memories"]) == ["I am vegetarian.", "I cook for two."]
        chunks = list(
            client.chat.completions.create(
                model="personalign",
                messages=[{"role": "user", "content": "Hi"}],
                user="sam",
                max_tokens=4,
                stream=True,
            )
        )
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        # The memories live on the Chroma server, not in the store directory.
        host, chroma_port = chroma_server.removeprefix("http://").split(":")
        remote = chromadb.HttpClient(host=host, port=int(chroma_port))
        collections = remote.list_collections()
        assert len(collections) == 1 and collections[0].metadata["user_id"] == "acme.sam"
        assert sorted(remote.get_collection(collections[0].name).get()["documents"]) == [
            "I am vegetarian.",
            "I cook for two.",
        ]
        assert not (store / "chroma").exists()

        assert second.wait(120) != 0
        assert "is open in another process" in second.stderr.read()
    finally:
        code = stop(server)
    assert code == 0, server.stderr.read()  # SIGTERM is a clean shutdown


def test_serve_cli_rejects_bad_settings_before_loading_models(tmp_path):
    runner = CliRunner()
    unreachable = runner.invoke(
        app, ["serve", "--store", str(tmp_path / "s"), "--chroma-url", f"http://127.0.0.1:{free_port()}"]
    )
    assert unreachable.exit_code == 2 and "no Chroma server answers" in unreachable.output
    not_a_url = runner.invoke(app, ["serve", "--store", str(tmp_path / "s"), "--chroma-url", "localhost"])
    assert not_a_url.exit_code == 2 and "--chroma-url" in not_a_url.output
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"key": "short", "tenant": "acme"}]}')
    bad_keys = runner.invoke(app, ["serve", "--store", str(tmp_path / "s"), "--api-keys", str(keys)])
    assert bad_keys.exit_code == 2 and "keys[0].key" in bad_keys.output
    assert not (tmp_path / "s").exists()  # nothing was opened
