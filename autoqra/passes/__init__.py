"""Compiler passes over a `Program`."""

from autoqra.passes.base import PassBase, PassManager, PassResult
from autoqra.passes.build_graph import BuildLayerGraphPass
from autoqra.passes.cost import AnnotateCostPass
from autoqra.passes.groups import AssignGroupsPass

__all__ = ["PassBase", "PassManager", "PassResult", "BuildLayerGraphPass", "AssignGroupsPass", "AnnotateCostPass"]
