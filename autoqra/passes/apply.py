"""ApplyPlanPass: a saved `Plan`'s (bits, rank) written onto the layer graph, checked layer by layer.

The search's place in the pipeline when the decision was made earlier (``autoqra compile
--plan-only`` writes ``plan.json``; `autoqra.apply_plan` / ``autoqra apply`` materialize it).
The plan must name exactly the graph's layers — a plan made for another model, or under other
``include`` / ``exclude`` settings, is refused with every difference listed — and each choice
must be in the layer's cost table (same bits / ranks menu and group size) and the same within each
fusion group (layers that share an input share a choice).
"""

from __future__ import annotations

from autoqra.errors import ConfigError
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult
from autoqra.plan import Plan

__all__ = ["ApplyPlanPass", "PlanMismatchError"]


class PlanMismatchError(ConfigError):
    """The plan does not fit this model's layer graph; the message lists every difference."""


class ApplyPlanPass(PassBase):
    reads = ("graph", "groups", "cost")
    writes = ("bits", "rank")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        names = set(graph.order())
        planned = set(self.plan.layers)
        problems: list[str] = []
        missing, extra = sorted(names - planned), sorted(planned - names)
        if missing:
            problems.append(f"{len(missing)} layer(s) of the model are not in the plan: {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))
        if extra:
            problems.append(f"{len(extra)} layer(s) of the plan are not in the model: {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))
        for name in sorted(names & planned):
            choice = self.plan.layers[name]
            table = graph.annotation(name).cost
            if table and choice not in table:
                problems.append(f"{name}: {choice} is not in its menu {sorted(table)}")
        for group, members in graph.groups().items():
            choices = {self.plan.layers[m] for m in members if m in self.plan.layers}
            if len(choices) > 1:
                problems.append(f"fusion group {group} ({', '.join(members)}) has different choices {sorted(choices)}")
        if problems:
            raise PlanMismatchError(
                f"the plan does not fit this model ({len(problems)} problem(s)); nothing was changed:\n  "
                + "\n  ".join(problems)
                + "\nFix: apply it to the model it was made for, with the include/exclude, bits, ranks and group "
                "size it was made with (they are in the plan's settings), or compile again."
            )
        for name in graph.order():
            graph.set_choice(name, *self.plan.layers[name])
        return PassResult(info={"layers": len(names)})
