"""User functions named by import path (`mypkg.prep:fn`), loaded where they run."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from workers.errors import SpecError

_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_function_target(value: str) -> bool:
    """True when `value` looks like `module.path:function`."""
    return bool(_TARGET.match(value))


def load_function(target: str, role: str) -> Callable[..., Any]:
    """Import `module:function` and return the callable; `role` names its use in error messages."""
    if not is_function_target(target):
        raise SpecError(f"{role} '{target}' is not an import path; write it as "
                        "module.path:function, for example mypkg.prep:tokenize")
    module_name, _, attr_path = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is reported the same way
        raise SpecError(f"{role} '{target}': cannot import module '{module_name}' "
                        f"({exc.__class__.__name__}: {exc}); make it importable here: run from "
                        "the directory that holds it, ship it with `ray job submit --working-dir "
                        ".`, or pip install it") from exc
    value: Any = module
    for name in attr_path.split("."):
        try:
            value = getattr(value, name)
        except AttributeError as exc:
            raise SpecError(f"{role} '{target}': module '{module_name}' has no attribute "
                            f"'{attr_path}'; check the name after the ':'") from exc
    if not callable(value):
        raise SpecError(f"{role} '{target}' is a {type(value).__name__}, not a function; "
                        "name a function or other callable")
    return value
