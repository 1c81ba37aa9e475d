"""What every plugin class has in common: a unique name, a one-line description and typed
options. The five kinds subclass `Plugin`: `Dataset`, `Model`, `Attack`, `Defense`, `Analysis`."""

from __future__ import annotations

from typing import Any, ClassVar

from bench.options import NoOptions


class Plugin:
    """Base of all plugin kinds. Subclasses set `name`, `description` and, if they take any,
    an `Options` frozen dataclass built with `bench.option`."""

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    paper: ClassVar[str] = ""  # a link to the method's paper, shown by `bench plugins` and the report
    code: ClassVar[str] = ""  # a link to its reference code

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} {self.options}>"
