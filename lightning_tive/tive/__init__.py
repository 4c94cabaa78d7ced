"""Pure tensor-level TIVE method: projections, per-example gradients, values, budget, sampling."""
