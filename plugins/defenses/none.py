"""`none`: no defense; the row that shows the attacked model as it is."""

from __future__ import annotations

import bench


class NoDefense(bench.Defense):
    name = "none"
    description = "No defense: evaluates the attacked model as it is"
    defender_data = bench.DefenderData.NONE
    returns_model_unchanged = True

    def apply(self, model, bonafide, ctx):
        return model


@bench.hookimpl
def register_defenses(register):
    register(NoDefense)
