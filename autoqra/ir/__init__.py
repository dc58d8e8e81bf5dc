"""Intermediate representation: layers, the layer graph, the captured program, the cost model."""
