"""``nn.Module``s that autoqra swaps into models."""
