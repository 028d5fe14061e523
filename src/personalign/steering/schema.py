"""The steering request, one schema for Python, the CLI and HTTP.

A request is one of these forms (``parse_steering`` reads each into a :class:`Steering`):

``{"verbosity": -0.5, "structure": 0.3}``
    shorthand for ``{"weights": {...}}``; ``{}`` turns steering off.
``{"weights": {"verbosity": -0.5}, "method": "vas"}``
    MODPO-style mixing coefficients (Zhou et al. 2024): any real in ``[-MAX_WEIGHT, MAX_WEIGHT]``,
    0 leaves an objective unchanged, the sign says more (``+``) or less (``-``).
``{"direction": {"verbosity": 3, "structure": 4}}``
    a DPA-style preference direction (Wang et al. 2024), normalised to a unit vector
    ``v / ||v||_2`` (here ``0.6, 0.8``).
``{"angle": 30, "objectives": ["verbosity", "structure"]}``
    a direction in the plane of two objectives: ``(cos 30°, sin 30°)``.

The nested forms take an optional ``"method"`` (one of ``METHODS``, default ``"auto"``). The
method stays as requested (``"auto"`` is resolved by the decoder at run time), but a request
whose nonzero objectives no method can steer is refused here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from personalign.errors import ValidationError
from personalign.steering.methods import MAX_WEIGHT, METHODS, canonical, resolve_method, steerable_by_method

FORMS = ("weights", "direction", "angle")
NESTED_KEYS = (*FORMS, "objectives", "method")
MAX_ANGLE = 360.0
# A direction whose norm is 1 up to float rounding is kept as given, so ``to_json`` round-trips exactly.
_UNIT_TOLERANCE = 8 * 2.0**-52

Naming = Callable[[str], str]


@dataclass(frozen=True)
class Steering:
    """A validated steering request.

    Attributes:
        weights: ``{objective: weight}``; for a direction, the unit vector's components.
        method: one of ``METHODS``; ``"auto"`` is resolved by the decoder at run time.
        direction: ``True`` when the request came as a direction (or an angle).
    """

    weights: dict[str, float]
    method: str = "auto"
    direction: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping):
            raise ValidationError(
                "steer.weights",
                "must be a mapping of objective name to weight",
                'pass e.g. {"verbosity": -0.5}',
                self.weights,
            )
        key = "direction" if self.direction else "weights"
        clean = _check_numbers(
            self.weights, lambda name: f"steer.{key}.{name}", bound=None if self.direction else MAX_WEIGHT
        )
        _check_method(self.method, "steer.method")
        object.__setattr__(self, "method", canonical(self.method))
        if not clean and (self.method != "auto" or self.direction):
            raise ValidationError(
                f"steer.{key}",
                "is empty",
                "give at least one objective, or use Steering({}) for no steering",
                dict(self.weights),
            )
        if self.direction and abs(math.hypot(*clean.values()) - 1.0) > _UNIT_TOLERANCE:
            raise ValidationError(
                "steer.direction",
                "is not a unit vector",
                'build it with parse_steering({"direction": {...}}), which normalises',
                clean,
            )
        _check_steerable(clean, self.method, lambda name: f"steer.{key}.{name}", f"steer.{key}")
        object.__setattr__(self, "weights", clean)

    def __bool__(self) -> bool:
        """True when any weight is nonzero (an all-zero request steers nothing)."""
        return any(w != 0.0 for w in self.weights.values())

    def to_json(self) -> dict[str, Any]:
        """The nested form (``{}`` for no steering); ``parse_steering`` reads it back to an equal object."""
        if not self.weights:
            return {}
        return {"direction" if self.direction else "weights": dict(self.weights), "method": self.method}


def parse_steering(value: Any, field: str = "steer") -> Steering:
    """Read a steering request in any of the module's forms (or a ``Steering``, returned as is).

    Raises ``ValidationError`` naming the exact field (``steer.weights.verbosity``,
    ``steer.method``, ``steer.angle``, ...), the problem and the fix.
    """
    if isinstance(value, Steering):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_unset=True)
    if not isinstance(value, Mapping):
        raise ValidationError(
            field,
            "must be a mapping of objective name to weight, or a steering request",
            'pass e.g. {"verbosity": -0.5} or {"direction": {...}}',
            value,
        )
    if not any(key in NESTED_KEYS for key in value):
        return _from_weights(value, lambda name: f"{field}.{name}", field)
    _check_keys(value, field)
    method = value.get("method", "auto")
    _check_method(method, f"{field}.method")
    method = canonical(method)  # a documented alias (modpo, trunk, gru) becomes the method's one name
    given = [key for key in FORMS if key in value]
    if "objectives" in value and "angle" not in value:
        raise ValidationError(
            f"{field}.objectives",
            "only goes with angle",
            'add "angle", or use "weights" or "direction" instead',
            value["objectives"],
        )
    if not given:
        raise ValidationError(
            field,
            "has a method but no weights, direction or angle",
            'add e.g. "weights": {"verbosity": -0.5}',
            dict(value),
        )
    if "angle" in given and len(given) > 1:
        raise ValidationError(
            f"{field}.angle",
            f"cannot be combined with {' or '.join(k for k in given if k != 'angle')}",
            "send one of weights, direction or angle",
            value["angle"],
        )
    if len(given) > 1:
        raise ValidationError(
            f"{field}.direction",
            "cannot be combined with weights",
            "send either weights (MODPO-style) or a direction (DPA-style)",
            value["direction"],
        )
    if "weights" in value:
        return _from_weights(
            _nested_mapping(value["weights"], f"{field}.weights"),
            lambda name: f"{field}.weights.{name}",
            f"{field}.weights",
            method,
        )
    if "direction" in value:
        return _from_direction(_nested_mapping(value["direction"], f"{field}.direction"), field, method)
    return _from_angle(value["angle"], value.get("objectives"), field, method)


def direction_from_angle(degrees: float) -> tuple[float, float]:
    """The unit vector at ``degrees`` from the first objective's axis: ``(cos θ, sin θ)``."""
    radians = math.radians(degrees)
    return math.cos(radians), math.sin(radians)


def normalise(vector: Mapping[str, float]) -> dict[str, float]:
    """``v / ||v||_2``; a vector already of unit norm (up to float rounding) is kept as is."""
    norm = math.hypot(*vector.values())
    if abs(norm - 1.0) <= _UNIT_TOLERANCE:
        return dict(vector)
    return {name: value / norm for name, value in vector.items()}


def _from_weights(weights: Mapping[str, Any], naming: Naming, group: str, method: str = "auto") -> Steering:
    clean = _check_numbers(weights, naming, bound=MAX_WEIGHT)
    _check_steerable(clean, method, naming, group)
    return Steering(clean, method)


def _from_direction(vector: Mapping[str, Any], field: str, method: str) -> Steering:
    def naming(name: str) -> str:
        return f"{field}.direction.{name}"

    clean = _check_numbers(vector, naming, bound=None)
    if math.hypot(*clean.values()) == 0.0:
        raise ValidationError(
            f"{field}.direction",
            "is all zeros, so it has no direction",
            "give at least one nonzero component, or send {} for no steering",
            dict(vector),
        )
    unit = normalise(clean)
    _check_steerable(unit, method, naming, f"{field}.direction")
    return Steering(unit, method, direction=True)


def _from_angle(angle: Any, objectives: Any, field: str, method: str) -> Steering:
    if not _is_real(angle) or not math.isfinite(angle):
        raise ValidationError(f"{field}.angle", "must be a finite number of degrees", "pass e.g. 30", angle)
    if abs(angle) > MAX_ANGLE:
        raise ValidationError(
            f"{field}.angle",
            f"must be within [-{MAX_ANGLE:g}, {MAX_ANGLE:g}] degrees",
            "give the angle in degrees, e.g. 30",
            angle,
        )
    if objectives is None:
        raise ValidationError(
            f"{field}.objectives", "is required with angle", 'add "objectives": ["verbosity", "structure"]'
        )
    two = 'pass two distinct names, e.g. ["verbosity", "structure"]'
    if not isinstance(objectives, list | tuple) or len(objectives) != 2:
        raise ValidationError(f"{field}.objectives", "must be exactly two objective names", two, objectives)
    for index, name in enumerate(objectives):
        _check_known(name, f"{field}.objectives[{index}]")
    first, second = objectives
    if first == second:
        raise ValidationError(f"{field}.objectives", "names the same objective twice", two, list(objectives))
    cos, sin = direction_from_angle(float(angle))
    unit = {first: cos, second: sin}  # (cos θ, sin θ) in the plane of the two objectives
    _check_steerable(
        unit, method, lambda name: f"{field}.objectives[{[first, second].index(name)}]", f"{field}.objectives"
    )
    return Steering(unit, method, direction=True)


def _nested_mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(
            field, "must be a mapping of objective name to number", 'pass e.g. {"verbosity": -0.5}', value
        )
    if not value:
        raise ValidationError(
            field,
            "is empty, so the request asks for nothing",
            "give at least one objective, or send {} for no steering",
            dict(value),
        )
    return value


def _check_keys(value: Mapping[str, Any], field: str) -> None:
    from personalign.steering.objectives import OBJECTIVES

    for key in value:
        if key in NESTED_KEYS:
            continue
        if key in OBJECTIVES:
            fix = (
                f'put objective weights inside "weights", e.g. {{"weights": {{"{key}": ...}}, "method": ...}}'
            )
        else:
            fix = f"use only {list(NESTED_KEYS)}"
        raise ValidationError(f"{field}.{key}", "is not a field of a steering request", fix, key)


def _check_method(method: Any, field: str) -> None:
    if not isinstance(method, str) or canonical(method) not in METHODS:
        raise ValidationError(
            field,
            "is not a steering method",
            f"use one of {list(METHODS)} (auto picks the first that steers every objective)",
            method,
        )


def _check_known(name: Any, field: str) -> None:
    from personalign.steering.objectives import OBJECTIVES

    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValidationError(
            field,
            "is not a known objective",
            f"use a known objective, one of {sorted(OBJECTIVES)} ({_steerable_text()})",
            name,
        )


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_numbers(numbers: Mapping[Any, Any], naming: Naming, bound: float | None) -> dict[str, float]:
    """Known objective names with finite numbers (within ``[-bound, bound]`` when given), as floats."""
    clean: dict[str, float] = {}
    for name, value in numbers.items():
        _check_known(name, naming(str(name)))
        if not _is_real(value) or not math.isfinite(value):
            raise ValidationError(
                naming(name), "must be a finite number", "pass a weight such as -0.5 or 1.0", value
            )
        if bound is not None and abs(value) > bound:
            raise ValidationError(
                naming(name), f"must be within [-{bound}, {bound}]", "use a smaller weight", value
            )
        clean[name] = float(value)
    return clean


def _steerable_text() -> str:
    table = steerable_by_method()
    return "steerable by method: " + "; ".join(
        f"{m}: {', '.join(names) if names else 'none installed'}" for m, names in table.items()
    )


def _check_steerable(weights: Mapping[str, float], method: str, naming: Naming, group: str) -> None:
    """Refuse nonzero objectives that ``method`` (or, for ``auto``, any one method) cannot steer.

    ``naming`` gives one objective's field, ``group`` the field of the whole set.
    """
    nonzero = [name for name, w in weights.items() if w != 0.0]
    if not nonzero or resolve_method(method, nonzero) is not None:
        return
    table = steerable_by_method()
    fix = f"choose objectives and a method that go together ({_steerable_text()})"
    if method != "auto":
        name = next(n for n in nonzero if n not in table[method])
        raise ValidationError(naming(name), f"cannot be steered by method {method!r}", fix, name)
    alone = next((n for n in nonzero if not any(n in names for names in table.values())), None)
    if alone is not None:
        raise ValidationError(naming(alone), "is measured but has no decode-time steering method", fix, alone)
    # Each objective has some method, but no single one steers them all together.
    raise ValidationError(group, f"no single method steers {sorted(nonzero)} together", fix, sorted(nonzero))
