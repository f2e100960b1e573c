"""cxr-node: training package."""
