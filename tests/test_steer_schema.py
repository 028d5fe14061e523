"""The steering request schema: each form's golden value, each error's field, and parity of the
errors between Python (``parse_steering``), the CLI (``--steer``) and HTTP (``steer``)."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from personalign.cli import app
from personalign.cli.core import steering_option
from personalign.errors import ValidationError
from personalign.steering.decoding import MAX_WEIGHT, validate_steer
from personalign.steering.methods import METHODS, steerable_by_method
from personalign.steering.objectives import OBJECTIVES, Objective
from personalign.steering.schema import Steering, parse_steering

ASK = [{"role": "user", "content": "How long should I boil an egg for?"}]


@pytest.fixture(autouse=True)
def no_trained_steerers(tmp_path, monkeypatch):
    """No vas/mix artefacts installed, so what ``auto`` resolves to does not depend on the checkout."""
    monkeypatch.setenv("PERSONALIGN_STEERING_DIR", str(tmp_path / "steering"))
    return tmp_path / "steering"


def _error(value, field="steer") -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_steering(value, field)
    assert isinstance(info.value, ValueError) and "Fix: " in str(info.value)
    return info.value


# --- the forms ---------------------------------------------------------------------------------


def test_flat_weights_are_the_shorthand():
    assert parse_steering({"verbosity": -0.5, "structure": 0.3}) == Steering(
        {"verbosity": -0.5, "structure": 0.3}
    )
    steering = parse_steering({"verbosity": -1})
    assert steering.weights == {"verbosity": -1.0} and isinstance(steering.weights["verbosity"], float)
    assert steering.method == "auto" and not steering.direction and steering
    off = parse_steering({})
    assert off == Steering({}) and not off and off.to_json() == {}
    assert not parse_steering({"verbosity": 0.0})  # all-zero weights steer nothing


def test_nested_weights_keep_the_method_and_any_real_in_range():
    steering = parse_steering(
        {"weights": {"verbosity": MAX_WEIGHT, "structure": -MAX_WEIGHT}, "method": "prompt"}
    )
    assert steering == Steering({"verbosity": MAX_WEIGHT, "structure": -MAX_WEIGHT}, "prompt")
    # "auto" is kept for the decoder to resolve, though only prompting steers structure today.
    assert parse_steering({"weights": {"structure": 0.3}}).method == "auto"


def test_direction_is_normalised_to_a_unit_vector():
    """(3, 4) has L2 norm 5, so the unit direction is (3/5, 4/5)."""
    steering = parse_steering({"direction": {"verbosity": 3, "structure": 4}})
    assert steering.direction and steering.method == "auto"
    assert steering.weights == pytest.approx({"verbosity": 0.6, "structure": 0.8}, abs=1e-15)
    assert parse_steering({"direction": {"verbosity": -2}}).weights == {"verbosity": -1.0}


@pytest.mark.parametrize(
    ("angle", "expected"),
    [
        (0, (1.0, 0.0)),
        (90, (0.0, 1.0)),
        (180, (-1.0, 0.0)),
        (-90, (0.0, -1.0)),
        (30, (math.sqrt(3) / 2, 0.5)),
    ],
)
def test_angle_gives_cos_sin_over_two_objectives(angle, expected):
    """Angle θ in degrees from the first objective's axis: direction (cos θ, sin θ)."""
    steering = parse_steering({"angle": angle, "objectives": ["verbosity", "structure"], "method": "prompt"})
    assert steering.direction and steering.method == "prompt"
    assert list(steering.weights) == ["verbosity", "structure"]
    for got, want in zip(steering.weights.values(), expected, strict=True):
        assert abs(got - want) < 1e-12


def test_a_steering_passes_unchanged_and_a_pydantic_model_reads_like_its_dict():
    steering = Steering({"verbosity": 0.5}, "logit")
    assert parse_steering(steering) is steering

    class SteerBody(BaseModel):
        weights: dict[str, float] | None = None
        direction: dict[str, float] | None = None
        method: str = "auto"

    assert parse_steering(SteerBody(direction={"verbosity": 3, "structure": 4})) == parse_steering(
        {"direction": {"verbosity": 3, "structure": 4}}
    )
    assert parse_steering(SteerBody(weights={"verbosity": 1}, method="logit")) == Steering(
        {"verbosity": 1.0}, "logit"
    )


@pytest.mark.parametrize(
    "request_",
    [
        {"verbosity": -0.5},
        {"weights": {"verbosity": 0.0, "structure": 2}, "method": "prompt"},
        {"direction": {"verbosity": 3, "structure": 4}, "method": "auto"},
        {"direction": {"verbosity": 1, "structure": 1, "formality": -1}},
        {"angle": 30, "objectives": ["verbosity", "structure"]},
        {"angle": 123.4, "objectives": ["formality", "politeness"], "method": "prompt"},
        {},
    ],
)
def test_to_json_round_trips(request_):
    steering = parse_steering(request_)
    again = parse_steering(json.loads(json.dumps(steering.to_json())))
    assert again == steering and again.weights == steering.weights  # exactly, not approximately


def test_validate_steer_still_returns_the_weights():
    assert validate_steer(None) == {}
    assert validate_steer({"direction": {"verbosity": 3, "structure": 4}}) == pytest.approx(
        {"verbosity": 0.6, "structure": 0.8}
    )


def test_steering_checks_itself_at_construction():
    with pytest.raises(ValidationError, match="steer.method"):
        Steering({"verbosity": 1.0}, "beam")
    with pytest.raises(ValidationError, match="steer.direction"):
        Steering({"verbosity": 0.5}, direction=True)  # not a unit vector
    with pytest.raises(ValidationError, match="steer.weights.structure"):
        Steering({"structure": 1.0}, "logit")
    with pytest.raises(ValidationError, match="steer.weights"):
        Steering({}, "prompt")  # no weights, so nothing for a method to steer


# --- the errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        # unknown objectives, in each form
        ({"humour": 1.0}, "steer.humour", "is not a known objective"),
        ({"weights": {"humour": 1.0}}, "steer.weights.humour", "is not a known objective"),
        (
            {"direction": {"verbosity": 1, "kindness": 1}},
            "steer.direction.kindness",
            "is not a known objective",
        ),
        (
            {"angle": 10, "objectives": ["verbosity", "kindness"]},
            "steer.objectives[1]",
            "is not a known objective",
        ),
        # numbers: NaN, inf, bool, strings, None, out of range
        ({"weights": {"verbosity": math.nan}}, "steer.weights.verbosity", "finite number"),
        ({"verbosity": math.inf}, "steer.verbosity", "finite number"),
        ({"weights": {"verbosity": True}}, "steer.weights.verbosity", "finite number"),
        ({"weights": {"verbosity": "1"}}, "steer.weights.verbosity", "finite number"),
        ({"direction": {"verbosity": None}}, "steer.direction.verbosity", "finite number"),
        ({"direction": {"verbosity": -math.inf}}, "steer.direction.verbosity", "finite number"),
        ({"weights": {"verbosity": -MAX_WEIGHT - 0.5}}, "steer.weights.verbosity", "within"),
        ({"angle": math.nan, "objectives": ["verbosity", "structure"]}, "steer.angle", "finite number"),
        ({"angle": False, "objectives": ["verbosity", "structure"]}, "steer.angle", "finite number"),
        ({"angle": "30", "objectives": ["verbosity", "structure"]}, "steer.angle", "finite number"),
        ({"angle": 720, "objectives": ["verbosity", "structure"]}, "steer.angle", "within"),
        # forms that do not go together
        (
            {"weights": {"verbosity": 1}, "direction": {"verbosity": 1}},
            "steer.direction",
            "cannot be combined with weights",
        ),
        (
            {"angle": 30, "objectives": ["verbosity", "structure"], "weights": {"verbosity": 1}},
            "steer.angle",
            "cannot be combined",
        ),
        ({"angle": 30, "direction": {"verbosity": 1}}, "steer.angle", "cannot be combined"),
        (
            {"objectives": ["verbosity", "structure"], "weights": {"verbosity": 1}},
            "steer.objectives",
            "only goes with angle",
        ),
        ({"method": "logit"}, "steer", "no weights, direction or angle"),
        # unknown keys, empty requests, a zero direction
        ({"weights": {"verbosity": 1}, "foo": 1}, "steer.foo", "is not a field"),
        ({"weights": {"verbosity": 1}, "structure": 1}, "steer.structure", "is not a field"),
        ({"weights": {}}, "steer.weights", "is empty"),
        ({"direction": {}}, "steer.direction", "is empty"),
        ({"direction": {"verbosity": 0, "structure": 0.0}}, "steer.direction", "all zeros"),
        ({"weights": [["verbosity", 1]]}, "steer.weights", "must be a mapping"),
        # angle objectives: exactly two distinct names
        ({"angle": 30}, "steer.objectives", "is required"),
        ({"angle": 30, "objectives": ["verbosity"]}, "steer.objectives", "exactly two"),
        (
            {"angle": 30, "objectives": ["verbosity", "structure", "formality"]},
            "steer.objectives",
            "exactly two",
        ),
        ({"angle": 30, "objectives": "verbosity"}, "steer.objectives", "exactly two"),
        ({"angle": 30, "objectives": ["verbosity", "verbosity"]}, "steer.objectives", "twice"),
        # methods
        ({"weights": {"verbosity": 1}, "method": "beam"}, "steer.method", "is not a steering method"),
        ({"weights": {"verbosity": 1}, "method": None}, "steer.method", "is not a steering method"),
        # not a mapping at all
        ([("verbosity", 1.0)], "steer", "must be a mapping"),
        ("verbosity=1", "steer", "must be a mapping"),
        (None, "steer", "must be a mapping"),
    ],
)
def test_errors_name_the_field(value, field, problem):
    err = _error(value)
    assert err.field == field and problem in err.problem


def test_unknown_objective_fix_lists_the_known_objectives_sorted():
    err = _error({"weights": {"humour": 1.0}})
    assert str(sorted(OBJECTIVES)) in err.fix
    assert _error({"humour": 1.0}, field="body.steer").field == "body.steer.humour"


def test_unsteerable_by_the_method_names_the_objective_and_lists_each_method():
    err = _error({"weights": {"verbosity": 1.0, "structure": 0.5}, "method": "logit"})
    assert err.field == "steer.weights.structure" and "'logit'" in err.problem
    for method, names in steerable_by_method().items():
        assert f"{method}: {', '.join(names) if names else 'none installed'}" in err.fix
    assert _error({"direction": {"formality": 1}, "method": "vas"}).field == "steer.direction.formality"
    assert (
        _error({"angle": 45, "objectives": ["verbosity", "politeness"], "method": "logit"}).field
        == "steer.objectives[1]"
    )
    # A zero weight asks nothing of the method, so it is not refused.
    assert (
        parse_steering({"weights": {"verbosity": 1.0, "structure": 0.0}, "method": "logit"}).method == "logit"
    )


def test_auto_refuses_what_no_method_steers(monkeypatch, no_trained_steerers):
    monkeypatch.setitem(OBJECTIVES, "humour", Objective("humour", len, 1.0, "jokes"))
    err = _error({"weights": {"verbosity": 1, "humour": 1}})
    assert err.field == "steer.weights.humour" and "no decode-time steering method" in err.problem
    # With value heads for humour only, each objective has a method but none steers both.
    (no_trained_steerers / "vas" / "humour").mkdir(parents=True)
    (no_trained_steerers / "vas" / "humour" / "value_config.json").write_text("{}")
    assert parse_steering({"weights": {"humour": 1}}).method == "auto"
    err = _error({"weights": {"formality": 1, "humour": 1}})
    assert err.field == "steer.weights" and "together" in err.problem and "vas: humour" in err.fix


# --- the Personalizer ---------------------------------------------------------------------------


def test_personalizer_applies_every_form_and_keeps_the_method(pz):
    prepared = pz.engine.prepare(
        None, ASK, {"weights": {"verbosity": -0.5}, "method": "prompt"}, {"max_new_tokens": 2}
    )
    assert prepared.steer == {"verbosity": -0.5} and prepared.steer_method == "prompt"
    assert pz.engine.prepare(None, ASK, None, {}).steer_method == "auto"
    result = pz.respond(None, ASK, steer={"direction": {"verbosity": -2}}, max_new_tokens=2)
    assert result.steer == {"verbosity": -1.0}
    with pytest.raises(ValidationError) as info:
        pz.respond(None, ASK, steer={"weights": {"verbosity": 1}, "foo": 1}, max_new_tokens=2)
    assert info.value.field == "steer.foo"


def test_stored_default_in_every_form(pz):
    pz.enroll(
        "ana",
        [
            {
                "prompt": "Egg?",
                "chosen": "Nine minutes.",
                "rejected": "It depends on many things about the egg.",
            }
        ],
    )
    pz.set_steering("ana", {"direction": {"verbosity": 3, "structure": 4}, "method": "prompt"})
    stored = pz.profile("ana").settings["steer"]
    assert (
        stored
        == parse_steering({"direction": {"verbosity": 3, "structure": 4}, "method": "prompt"}).to_json()
    )
    assert pz.default_steer("ana") == pytest.approx({"verbosity": 0.6, "structure": 0.8})
    assert pz.engine.prepare("ana", ASK, None, {"shots": False, "memory": False}).steer_method == "prompt"
    pz.set_steering("ana", Steering({"verbosity": 0.5}))
    assert pz.profile("ana").settings["steer"] == {"weights": {"verbosity": 0.5}, "method": "auto"}

    def old_flat(profile):  # the flat dict earlier versions stored
        profile.settings["steer"] = {"verbosity": -0.25}
        return profile

    pz.profiles.update("ana", old_flat, create=False)
    assert pz.default_steer("ana") == {"verbosity": -0.25}
    with pytest.raises(ValidationError, match="steer.weights"):
        pz.set_steering("ana", {"weights": {}})
    assert pz.default_steer("ana") == {"verbosity": -0.25}


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_steer_forms_and_method():
    assert steering_option(None, None) is None
    assert steering_option("verbosity=-0.5,structure=0.3", None) == Steering(
        {"verbosity": -0.5, "structure": 0.3}
    )
    assert steering_option("verbosity=-0.5", "prompt") == Steering({"verbosity": -0.5}, "prompt")
    assert steering_option('{"direction": {"verbosity": 3, "structure": 4}}', "prompt") == parse_steering(
        {"direction": {"verbosity": 3, "structure": 4}, "method": "prompt"}
    )
    assert steering_option(
        '{"angle": 90, "objectives": ["verbosity", "structure"], "method": "prompt"}', "prompt"
    ).direction
    for text, method, field in [
        ("verbosity=1", "beam", "steer.method"),
        ('{"weights": {"verbosity": 1}, "method": "logit"}', "prompt", "--steer-method"),
        (None, "prompt", "--steer-method"),
        ('{"weights": ', None, "--steer"),
        ("verbosity", None, "--steer"),
    ]:
        with pytest.raises(ValidationError) as info:
            steering_option(text, method)
        assert info.value.field == field
    assert set(METHODS) >= {"auto", "logit", "prompt"}


# --- the same error from Python, the CLI and HTTP ------------------------------------------------

BAD = [
    {"weights": {"verbosity": 1, "structure": 2}, "method": "logit"},
    {"weights": {"verbosity": 1}, "foo": 1},
    {"direction": {"verbosity": 0}},
    {"angle": 30, "objectives": ["verbosity", "verbosity"]},
    {"weights": {"verbosity": "1"}},
]


@pytest.fixture(scope="module")
def server(tiny_generator, encoder, tmp_path_factory):
    from personalign.personalizer import Personalizer
    from personalign.server import ServerConfig, ServerThread, create_app

    config = ServerConfig(max_tokens_cap=8, default_max_tokens=2, batch_wait_ms=0)
    with (
        Personalizer(tiny_generator, encoder, store=tmp_path_factory.mktemp("steer-store")) as pz,
        ServerThread(create_app(pz, config)) as running,
    ):
        yield running


@pytest.mark.parametrize("bad", BAD)
def test_same_error_from_python_cli_and_http(bad, server, tmp_path):
    err = _error(bad)
    out = CliRunner().invoke(
        app, ["chat", "--message", "hi", "--steer", json.dumps(bad), "--store", str(tmp_path / "s")]
    )
    assert out.exit_code == 2 and f"error: {err}" in out.output  # refused before any model loads
    body = {"model": "personalign", "messages": ASK, "steer": bad}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == err.field and error["message"] == str(err) and error["code"] == "invalid_value"


def test_http_accepts_the_nested_forms_and_answers_with_the_weights(server):
    body = {
        "model": "personalign",
        "messages": ASK,
        "max_tokens": 2,
        "steer": {"direction": {"verbosity": 3, "structure": 4}},
    }
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["personalign"]["steer"] == pytest.approx({"verbosity": 0.6, "structure": 0.8})
    body["steer"] = {"angle": 90, "objectives": ["verbosity", "structure"], "method": "prompt"}
    steer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()["personalign"][
        "steer"
    ]
    assert abs(steer["verbosity"]) < 1e-12 and steer["structure"] == 1.0


def test_the_request_schema_imports_without_torch():
    """The schema is what an HTTP layer imports to validate requests: it must not pull in torch."""
    import subprocess
    import sys

    code = "import sys, personalign.steering.schema; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
