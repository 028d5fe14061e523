"""Editing a user's comparisons: the inferred steering and state follow in the same write; the same
from Python, HTTP (``PATCH /v1/users/{id}/comparisons``) and the CLI (``personalign comparisons edit``).

Bad input (an index out of range, a bad comparison, an unknown user, another tenant's user, a
read-only key) is a typed error (4xx over HTTP, exit 1 or 2 on the command line) and changes nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from keyed_server import api_error, client, keyed_server
from personalign.errors import ValidationError
from personalign.memory.profiles import ProfileStore
from personalign.personalizer import Personalizer
from personalign.preference.service import STATE_KEY
from personalign.server.config import TENANT_SEP
from personalign.types import Comparison

SHORT = Comparison(
    prompt="How do I boil an egg?", chosen="Nine minutes.", rejected="Boiling an egg takes care. " * 12
)
LONG = Comparison(
    prompt="How do I boil an egg?", chosen="Boiling an egg takes care. " * 12, rejected="Nine minutes."
)


@pytest.fixture()
def pz(tiny_generator, encoder, tmp_path):
    with Personalizer(tiny_generator, encoder, tmp_path / "store") as personalizer:
        yield personalizer


def test_edits_recompute_steering_and_state_atomically(pz):
    pz.enroll("ana", [SHORT, SHORT, SHORT])
    before = pz.profile("ana")
    assert before.settings["inferred_steer"]["verbosity"] < 0
    edited = pz.edit_comparisons("ana", replace={0: LONG, 1: LONG, 2: LONG})
    assert [c.chosen for c in edited.comparisons] == [LONG.chosen] * 3
    assert edited.settings["inferred_steer"]["verbosity"] > 0  # she now prefers long answers
    stored = np.asarray(edited.settings[STATE_KEY]["vector"])
    np.testing.assert_allclose(
        stored, pz.refresh_state("ana").vector, rtol=1e-5
    )  # the stored state is the re-inferred one
    assert not np.allclose(stored, before.settings[STATE_KEY]["vector"])
    after = pz.edit_comparisons("ana", remove=[0, 1])
    assert len(after.comparisons) == 1


def test_bad_edits_change_nothing(pz):
    pz.enroll("ana", [SHORT, LONG])
    before = pz.profile("ana").model_dump(mode="json")
    for kwargs, field in (
        ({"remove": [5]}, "remove"),
        ({"replace": {-1: SHORT}}, "replace"),
        ({"replace": {0: {"prompt": "q", "chosen": " ", "rejected": "b"}}}, "replace"),
        ({"remove": [0], "replace": {0: SHORT}}, "replace"),
        ({}, "remove"),
    ):
        with pytest.raises(ValidationError) as err:
            pz.edit_comparisons("ana", **kwargs)
        assert err.value.field.startswith(field), (kwargs, err.value)
    assert pz.profile("ana").model_dump(mode="json") == before


# --- HTTP ------------------------------------------------------------------------------------------

ACME, GLOBEX, ACME_READ_ONLY = "sk-acme-edit-01", "sk-globex-edit", "sk-acme-edit-ro"


def _row(comparison: Comparison) -> dict[str, str]:
    return comparison.model_dump(mode="json", include={"prompt", "chosen", "rejected"})


@pytest.fixture(scope="module")
def server(tiny_generator, encoder, tmp_path_factory):
    keys = [
        {"key": ACME, "tenant": "acme"},
        {"key": GLOBEX, "tenant": "globex"},
        {"key": ACME_READ_ONLY, "tenant": "acme", "read_only": True},
    ]
    with keyed_server(tiny_generator, encoder, tmp_path_factory.mktemp("edit-comparisons"), keys) as running:
        yield running


def _enroll(http, user, comparisons):
    http.delete(f"/v1/users/{user}")
    body = {"comparisons": [_row(c) for c in comparisons]}
    assert http.post(f"/v1/users/{user}/comparisons", json=body).status_code == 200


def test_http_edit_matches_python(server):
    pz = server.pz
    pz.forget("py-cara")
    pz.enroll("py-cara", [SHORT, SHORT, SHORT])
    expected = pz.edit_comparisons("py-cara", remove=[2], replace={0: LONG, 1: LONG})
    with client(server, ACME) as http:
        _enroll(http, "cara", [SHORT, SHORT, SHORT])
        edited = http.patch(
            "/v1/users/cara/comparisons",
            json={"remove": [2.0], "replace": {"0": _row(LONG), "1": _row(LONG)}},  # 2.0 is the integer 2
        )
        assert edited.status_code == 200, edited.text
        assert edited.json() == {
            "user": "cara",
            "removed": 1,
            "replaced": 2,
            "comparisons": 2,
            "version": 2,
            "default_steer": pz.default_steer("py-cara"),
        }
        assert edited.json()["default_steer"]["verbosity"] > 0  # she now prefers long answers
        profile = http.get("/v1/users/cara").json()
        assert [c["chosen"] for c in profile["comparisons"]] == [LONG.chosen] * 2
        stored = pz.profile(f"acme{TENANT_SEP}cara")  # the tenant's stored id
        assert stored.settings["inferred_steer"] == expected.settings["inferred_steer"]
        np.testing.assert_allclose(
            stored.settings[STATE_KEY]["vector"], expected.settings[STATE_KEY]["vector"], rtol=1e-6
        )
        removed = http.patch("/v1/users/cara/comparisons", json={"remove": [0]}).json()
        assert (removed["comparisons"], removed["version"], removed["removed"]) == (1, 3, 1)


def test_http_bad_edits_are_4xx_and_change_nothing(server):
    pz, stored_id = server.pz, f"acme{TENANT_SEP}bo"
    with client(server, ACME) as http:
        _enroll(http, "bo", [SHORT, LONG])
        before = pz.profile(stored_id).model_dump(mode="json")
        blank = {"prompt": "q", "chosen": " ", "rejected": "b"}
        for body, param in (
            ({"remove": [5]}, "remove"),
            ({"replace": {"9": _row(SHORT)}}, "replace"),
            ({"replace": {"0": blank}}, "replace.0"),
            ({"replace": {"1": {**_row(SHORT), "colour": "red"}}}, "replace.1"),
            ({"remove": [0], "replace": {"0": _row(SHORT)}}, "replace"),
            ({}, "remove"),
            ({"remove": [-1]}, "remove"),
            ({"remove": ["0"]}, "remove"),
            ({"remove": [True]}, "remove"),
            ({"replace": {"01": _row(SHORT)}}, "replace"),
            ({"replace": {"0": "not a comparison"}}, "replace"),
            ({"remove": [0], "adapter": True}, "adapter"),
        ):
            error = api_error(http.patch("/v1/users/bo/comparisons", json=body), 400)
            assert (error["param"] or "").startswith(param), (body, error)
        api_error(
            http.patch("/v1/users/nobody-here/comparisons", json={"remove": [0]}), 404, "user_not_found"
        )
    with client(server, ACME_READ_ONLY) as reader:
        assert reader.get("/v1/users/bo").status_code == 200  # reads its tenant
        api_error(reader.patch("/v1/users/bo/comparisons", json={"remove": [0]}), 403, "read_only_key")
    with client(server, GLOBEX) as globex:  # another tenant: the same path names another user
        api_error(globex.patch("/v1/users/bo/comparisons", json={"remove": [0]}), 404, "user_not_found")
        _enroll(globex, "bo", [LONG])
        mine = globex.patch("/v1/users/bo/comparisons", json={"replace": {"0": _row(SHORT)}}).json()
        assert (mine["user"], mine["comparisons"], mine["version"]) == ("bo", 1, 2)
        api_error(globex.patch("/v1/users/bo/comparisons", json={"remove": [1]}), 400)  # acme's bo has a 1
        assert "acme" not in json.dumps(mine)
    assert pz.profile(stored_id).model_dump(mode="json") == before
    assert pz.profile(f"globex{TENANT_SEP}bo").comparisons[0].chosen == SHORT.chosen


def test_openapi_declares_the_edit(server):
    with client(server, ACME) as http:
        schema = http.get("/openapi.json").json()
    operation = schema["paths"]["/v1/users/{user_id}/comparisons"]["patch"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "EditComparisonsRequest"
    )
    body = schema["components"]["schemas"]["EditComparisonsRequest"]
    assert body["properties"]["remove"]["items"]["minimum"] == 0
    assert body["additionalProperties"] is False


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_edit_matches_python(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app
    from personalign.models import load_encoder, load_generator

    store = tmp_path / "store"
    # A generator and an encoder of their own, loaded as the CLI loads them: the session's
    # encoder caches texts that earlier tests encoded in other batches, whose vectors differ
    # in the last bits, which moves the inferred state by ~1e-4.
    generator, encoder = load_generator(str(tiny_model_dir), device="cpu"), load_encoder(device="cpu")
    with Personalizer(generator, encoder, store) as pz:
        pz.enroll("dan", [SHORT, SHORT, SHORT])
        pz.enroll("py-dan", [SHORT, SHORT, SHORT])
        expected = pz.edit_comparisons("py-dan", remove=[2], replace={0: LONG, 1: LONG})
        expected_steer = pz.default_steer("py-dan")
    runner = CliRunner()

    def run(*args, code=0):
        out = runner.invoke(
            app, ["comparisons", "edit", *args, "--store", str(store), "--model", str(tiny_model_dir)]
        )
        assert out.exit_code == code, out.output
        return json.loads(out.stdout) if code == 0 else out.output

    def profile(user):
        return ProfileStore(store).get(user).model_dump(mode="json")

    before = profile("dan")
    blank = {"prompt": "q", "chosen": " ", "rejected": "b"}
    for args, code, named in (
        (["--user", "dan", "--remove", "7"], 1, "remove"),
        (["--user", "dan", "--remove", "0,x"], 2, "--remove"),
        (["--user", "dan", "--replace", "{oops"], 2, "--replace"),
        (["--user", "dan", "--replace", json.dumps({"one": _row(LONG)})], 2, "--replace"),
        (["--user", "dan", "--replace", json.dumps({"0": blank})], 2, "--replace.0"),
        (["--user", "dan", "--remove", "0", "--replace", json.dumps({"0": _row(LONG)})], 1, "replace"),
        (["--user", "dan"], 1, "remove"),
        (["--user", "nobody", "--remove", "0"], 1, "nobody"),
    ):
        assert named in run(*args, code=code), args
    assert profile("dan") == before
    missing = runner.invoke(
        app, ["comparisons", "edit", "--user", "dan", "--remove", "0", "--store", str(tmp_path / "none")]
    )
    assert missing.exit_code == 2 and "--store" in missing.output and not (tmp_path / "none").exists()
    edited = run(
        "--user", "dan", "--remove", "2", "--replace", json.dumps({"0": _row(LONG), "1": _row(LONG)})
    )
    assert edited == {
        "user": "dan",
        "removed": 1,
        "replaced": 2,
        "comparisons": 2,
        "version": 2,
        "default_steer": expected_steer,
    }
    after = ProfileStore(store).get("dan")
    assert [c.chosen for c in after.comparisons] == [LONG.chosen] * 2
    assert after.settings["inferred_steer"] == expected.settings["inferred_steer"]
    np.testing.assert_allclose(
        after.settings[STATE_KEY]["vector"], expected.settings[STATE_KEY]["vector"], rtol=1e-6
    )
