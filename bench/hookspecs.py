"""The hook specifications: what a plugin package may implement.

Every hook is called once per plugin, at start-up, with a keyword argument `register`: a
callable that takes a plugin class (a subclass of `bench.Attack`, `bench.Defense`,
`bench.Dataset`, `bench.Model` or `bench.Analysis` with a unique `name`) and returns it, so it can double as a
decorator. A hook returns nothing. Implement only the hooks you need; an implementation may
take fewer arguments than the spec (pluggy), and a spec only ever gains arguments.
"""

from __future__ import annotations

import pluggy

PROJECT = "robustness_bench"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def register_datasets(register):
    """Called once at start-up. `register(cls)` adds a `bench.Dataset` subclass."""


@hookspec
def register_models(register):
    """Called once at start-up. `register(cls)` adds a `bench.Model` subclass."""


@hookspec
def register_attacks(register):
    """Called once at start-up. `register(cls)` adds a `bench.Attack` subclass (any stage)."""


@hookspec
def register_defenses(register):
    """Called once at start-up. `register(cls)` adds a `bench.Defense` subclass."""


@hookspec
def register_analyses(register):
    """Called once at start-up. `register(cls)` adds a `bench.Analysis` subclass."""
