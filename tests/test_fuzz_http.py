"""schemathesis over the server's own OpenAPI schema, against the real server on loopback.

Every operation of ``/openapi.json`` gets generated requests (schemathesis' examples, coverage
and fuzzing phases, seeded and derandomised, so a run is the same run every time) and is checked
with all of schemathesis' checks: no 5xx, statuses, content types, headers and bodies as the
schema declares them, schema-valid data accepted, schema-invalid data refused, undeclared
methods refused, authentication not ignored. On top, every answer must be free of tracebacks,
and a refused request (4xx) must leave the store as it was for the user it named.

Half of the generated user ids are replaced by ``alice``, who has comparisons and memories, so
the fuzzing reaches the code behind an existing user and not only the door. The server runs the
tiny Llama with a cap of 4 new tokens; the file takes about 30 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from personalign.server.config import ServerConfig

CONFIG = ServerConfig(
    max_tokens_cap=4, default_max_tokens=2, batch_wait_ms=1, max_pending=64, keepalive_s=5.0
)
# per operation and phase (21 operations); PERSONALIGN_FUZZ_EXAMPLES=200 for a longer hunt
EXAMPLES = int(os.environ.get("PERSONALIGN_FUZZ_EXAMPLES", 12))
ALICE = "alice"
SENT: Counter[str] = Counter()  # generated cases by outcome ("2xx", "4xx", ...)
BY_CODE: Counter[tuple[str, int, str]] = Counter()


@pytest.fixture(scope="module")
def personalizer(tiny_generator, encoder, tmp_path_factory):
    from personalign.personalizer import Personalizer

    with Personalizer(tiny_generator, encoder, store=tmp_path_factory.mktemp("fuzz") / "store") as pz:
        seed_alice(pz)
        yield pz


@pytest.fixture(scope="module")
def server(personalizer, tmp_path_factory):
    """The app with a job queue (no worker runs the queued trainings: only the routes are fuzzed)."""
    from personalign.jobs import JobQueue, WorkerSpec
    from personalign.server import ServerThread, create_app

    jobs = JobQueue(WorkerSpec(str(tmp_path_factory.mktemp("fuzz-jobs"))))
    with ServerThread(create_app(personalizer, CONFIG, jobs=jobs)) as running:
        yield running


def seed_alice(pz: Any) -> None:
    pz.enroll(ALICE, [{"prompt": "How do I boil an egg?", "chosen": "Nine minutes.", "rejected": "No."}])
    pz.remember(ALICE, ["I am vegetarian.", "I cook for two."], {"topic": "food"})


def stored(pz: Any, user: str) -> Any:
    """Everything the store holds about ``user`` (profile and every memory version), comparable with ==."""
    from personalign.errors import PersonalignError

    try:
        profile = pz.profile(user).model_dump(mode="json") if pz.is_enrolled(user) else None
        memories = pz.memories(user, status="all")["results"]
    except PersonalignError as err:  # an id the store refuses holds nothing
        return type(err).__name__
    return profile, memories


def app_schema() -> dict[str, Any]:
    """The schema ``/openapi.json`` serves under ``CONFIG`` (it does not depend on the personalizer, so a
    stand-in builds it at collection; the requests go to the real server). schemathesis' lazy
    ``from_fixture`` does not run under pytest 9."""
    from unittest.mock import MagicMock

    from personalign.server import create_app

    stand_in = MagicMock()
    stand_in.generator.model_id = CONFIG.served_model  # the model names the schema lists: the served one only
    stand_in.encoder.name = "personalign-embedding"
    stand_in.encoder.dim = 384  # the embedded all-MiniLM-L6-v2's
    return create_app(stand_in, CONFIG).openapi()


api = schemathesis.openapi.from_dict(app_schema())


def targeted_user(case: Any) -> str | None:
    """The user a case names (path or chat body), after steering half of them to ``alice``."""
    path = case.path_parameters or {}
    if "user_id" in path:
        if (
            case.meta is not None
            and case.meta.generation.mode.is_positive
            and zlib.crc32(repr((case.body, case.query, path)).encode("utf-8", "backslashreplace")) % 2
        ):
            path["user_id"] = ALICE
        return path["user_id"]
    if isinstance(case.body, dict) and isinstance(case.body.get("user"), str):
        return case.body["user"]
    return None


# Operations whose schema cannot state every rule the server applies: there, a schema-valid request may be refused
# (400, with the field named), so schemathesis' positive_data_acceptance check is left out; every other check runs.
KNOWN_GAPS = {
    "POST /v1/chat/completions": "the last message must be from the user (or a tool result)",
    "POST /v1/users/{user_id}/comparisons": "comparisons are any TRL preference layout (read by parse_comparisons)",
    "PATCH /v1/users/{user_id}/comparisons": "indices must name stored comparisons (and at least one is given)",
    "GET /v1/users/{user_id}/memories": "filters is JSON text, and may only name fields the user's memories carry",
    "POST /v1/users/{user_id}/memories/search": "filters may only name fields the user's memories carry",
    "POST /v1/users/{user_id}/next-question": "a candidate's a and b must differ",
    "POST /v1/completions": "best_of, when sent, must equal n",
    "POST /v1/users/{user_id}/adapter": "the user must have comparisons to train on",
}

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\.py\", line \d+")


@api.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_passes_all_checks(case, server, personalizer):
    """No 5xx, no traceback, every schemathesis check; a 4xx changes nothing stored."""
    pz = personalizer
    if not pz.is_enrolled(ALICE):  # a fuzzed DELETE may have forgotten her
        seed_alice(pz)
    user = targeted_user(case)
    before = stored(pz, user) if user is not None else None
    response = case.call(base_url=server.url)
    label = f"{case.operation.method.upper()} {case.operation.path}"
    excluded = [positive_data_acceptance] if label in KNOWN_GAPS else None
    try:
        case.validate_response(response, excluded_checks=excluded, transport_kwargs={"base_url": server.url})
    except Exception as err:
        err.add_note(f"answered {response.status_code}: {response.text[:600]}")
        raise
    SENT[f"{response.status_code // 100}xx"] += 1
    code = (response.json().get("error", {}).get("code") or "") if response.status_code >= 400 else ""
    BY_CODE[(label, response.status_code, code)] += 1
    assert response.status_code < 500, response.text
    assert not TRACEBACK.search(response.text), response.text
    if 400 <= response.status_code < 500 and user is not None:
        assert stored(pz, user) == before, (response.status_code, response.text)


def test_zz_counts(server):
    """Runs after the fuzzing: the server's own counters say how many requests it answered, none with a 5xx."""
    text = httpx.get(f"{server.url}/metrics").text
    by_status: Counter[str] = Counter()
    for line in text.splitlines():
        match = re.match(r'personalign_requests_total\{.*status="(\d+)".*\} ([0-9.e+]+)', line)
        if match:
            by_status[match.group(1)[0] + "xx"] += int(float(match.group(2)))
    print(f"\nfuzz: {sum(SENT.values())} generated cases {dict(SENT)}; server answered {dict(by_status)}")
    for key, count in sorted(BY_CODE.items()):
        print(count, *key)
    assert sum(SENT.values()) > 0
    assert by_status["5xx"] == 0


# --- what the fuzzing found, one request each (fixed in src/) -------------------------------------------------------

FOUND = [
    # a repetition penalty that is 0 in float32 made the logits infinite: torch.multinomial raised, a 500 (chat.py)
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "personalign",
            "messages": [{"role": "user", "content": "0"}],
            "repetition_penalty": 5e-324,
            "temperature": 1.0,
        },
        400,
    ),
    # a temperature so small the logits overflow float32 samples its limit, the argmax (steering/decoding.py)
    (
        "POST",
        "/v1/chat/completions",
        {"model": "personalign", "messages": [{"role": "user", "content": "0"}], "temperature": 5e-324},
        200,
    ),
    # top_p below float32's smallest number kept no token: torch.multinomial raised, a 500 (steering/decoding.py)
    (
        "POST",
        "/v1/completions",
        {"model": "personalign", "prompt": "0", "top_p": 5e-324, "temperature": 1.0},
        200,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            **{"model": "personalign"},
            "messages": [{"role": "user", "content": "0"}],
            "top_p": 5e-324,
            "temperature": 1.0,
        },
        200,
    ),
    # a logit_bias key int() cannot read passed the digit check: a 500 (server/controls.py)
    (
        "POST",
        "/v1/chat/completions",
        {"model": "personalign", "messages": [{"role": "user", "content": "0"}], "logit_bias": {"--5": 1}},
        400,
    ),
    # a malformed safety_identifier was ignored when user was also sent
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "personalign",
            "messages": [{"role": "user", "content": "0"}],
            "user": "alice",
            "safety_identifier": "a\x07",
        },
        400,
    ),
    # JSON Schema's integer 5.0 was refused as not an integer
    ("POST", "/v1/embeddings", {"model": "personalign", "input": "0", "dimensions": 384.0}, 200),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), FOUND)
def test_found_by_fuzzing(http, method, path, body, status):
    response = http.request(method, path, json=body)
    assert response.status_code == status, response.text


def test_405_lists_every_method_of_the_path(http):
    """The router's Allow named one method of the path (FastAPI has a route per method); the literal path wins."""
    assert http.request("OPTIONS", "/v1/users/alice/memories").headers["allow"] == "DELETE, GET, HEAD, POST"
    assert http.request("OPTIONS", "/v1/users/alice/memories/search").headers["allow"] == "POST"
    assert http.request("TRACE", "/health").headers["allow"] == "GET, HEAD"
