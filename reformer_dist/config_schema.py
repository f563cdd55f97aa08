"""How every config section declares and checks its fields: the model's, the data's, the trainer's, ...

A section is a dataclass deriving from `Section` whose fields are made with `opt(default, check, doc)`.
Building one runs, in order, every field's check (`Check`: value -> problem or None) and the section's
own rules between its fields (`rules`), and raises `FieldError` naming the first bad field:
``ReformerConfig.d_model: must equal n_heads * d_head = 4 * 64 = 256 (got 100)``.

Each section lives next to the code that reads it (lingua style) and the run config
(training/config.py) composes them; `build_section` makes one from its TOML table, refusing unknown
keys, and names errors by the run config's key (``model.d_model: ...``): a FieldError carries the field
and the problem, so the run config states them under its own section name instead of editing a message.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key it is about."""


class FieldError(ConfigError):
    """One field of one section is invalid: ``<owner>.<field>: <problem>``."""

    def __init__(self, owner: str, field: str, problem: str):
        super().__init__(f"{owner}.{field}: {problem}")
        self.owner, self.field, self.problem = owner, field, problem

    def within(self, section: str) -> FieldError:
        """The same problem, named by the run config's key (`section.field`)."""
        return FieldError(section, self.field, self.problem)


# A check takes a value and returns a description of what was expected, or None when the value is fine.
Check = Callable[[Any], "str | None"]


def opt(default: Any, check: Check, doc: str = "") -> Any:
    """A config field: default, check, and a one-line doc (shown by `reformer-train --help-config`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: json.loads(json.dumps(default)), metadata={"check": check, "doc": doc}
        )
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


class Section:
    """Base of every config section: checked when built (and again by `validate`)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise FieldError for the first field whose check fails, then for the first broken rule."""
        self.check_fields()
        self.rules()

    def check_fields(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            problem = f.metadata["check"](value)
            if problem:
                raise FieldError(type(self).__name__, f.name, f"{problem} (got {value!r})")

    def rules(self) -> None:
        """Rules between this section's fields (override; call `self.fail` for a broken one)."""

    def fail(self, field: str, problem: str) -> None:
        raise FieldError(type(self).__name__, field, problem)


def build_section(cls: type, name: str, body: dict[str, Any]) -> Any:
    """Section `cls` from the TOML table `[name]`: unknown keys and bad values raise ConfigError naming
    `name.key`."""
    known = [f.name for f in dataclasses.fields(cls)]
    for k in body:
        if k not in known:
            raise ConfigError(f"{name}.{k}: unknown key (known: {', '.join(known)})")
    try:
        return cls(**body)
    except FieldError as e:
        raise e.within(name) from None


# ---------------------------------------------------------------------------------------------- checks
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_min(lo: int) -> Check:
    return lambda v: (
        None
        if is_int(v) and v >= lo
        else ("expected a positive integer" if lo == 1 else f"expected an integer >= {lo}")
    )


def positive_number(v: Any) -> str | None:
    return None if is_number(v) and math.isfinite(v) and v > 0 else "expected a positive number"


def nonneg_number(v: Any) -> str | None:
    return None if is_number(v) and math.isfinite(v) and v >= 0 else "expected a number >= 0"


def fraction(v: Any) -> str | None:
    return None if is_number(v) and 0 <= v <= 1 else "expected a number in [0, 1]"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "expected a non-empty string"


def any_string(v: Any) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def choice(*options: str) -> Check:
    return lambda v: None if v in options else f"expected one of {list(options)}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def all_of(*checks: Check) -> Check:
    """The first problem any of `checks` finds."""

    def check(v: Any) -> str | None:
        for c in checks:
            problem = c(v)
            if problem:
                return problem
        return None

    return check


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A list (or tuple) whose items are all of `item` (for `of_type`)."""

    item: type


_TYPE_TESTS: dict[Any, Callable[[Any], bool]] = {
    int: is_int,
    float: is_number,
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    None: lambda v: v is None,
}


def of_type(*kinds: type | ListOf | None) -> Check:
    """Values of one of `kinds` (int, float, bool, str, None, ListOf(int), ...): "expected int | none"."""

    def accepts(kind: type | ListOf | None, v: Any) -> bool:
        if isinstance(kind, ListOf):
            return isinstance(v, (list, tuple)) and all(_TYPE_TESTS[kind.item](x) for x in v)
        return _TYPE_TESTS[kind](v)

    names = " | ".join(
        "none" if k is None else f"list[{k.item.__name__}]" if isinstance(k, ListOf) else k.__name__ for k in kinds
    )
    return lambda v: None if any(accepts(k, v) for k in kinds) else f"expected {names}"


def at_least(lo: int) -> Check:
    """For a value already known to be an integer (after `of_type(int)`)."""
    return lambda v: None if v is None or v >= lo else f"expected an integer >= {lo}"


def describe(cls: type) -> list[str]:
    """`key = default  # doc` lines of a section (for `reformer-train --help-config`)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        doc = f.metadata.get("doc", "")
        out.append(f"  {f.name} = {default!r}" + (f"  # {doc}" if doc else ""))
    return out
