"""Deprecated alias of :mod:`personalign.preference` (and, for ``fspo``, ``pplug`` and
``pplug_train``, of :mod:`personalign.conditioning`): the package was split by what each part does
(who the user is, from comparisons; what goes into the prompt or the input). Old imports such as
``from personalign.persona.pal import PAL`` keep working; new code imports the new paths."""

from __future__ import annotations

import sys
from importlib import import_module

from personalign.preference import *  # noqa: F403
from personalign.preference import __all__  # noqa: F401

_MOVED = {
    **{
        name: f"personalign.preference.{name}"
        for name in ("base", "bt", "drift", "items", "meandiff", "pal", "questions", "style", "vpl")
    },
    **{name: f"personalign.conditioning.{name}" for name in ("fspo", "pplug", "pplug_train")},
}
for _name, _target in _MOVED.items():
    sys.modules[f"{__name__}.{_name}"] = import_module(_target)
