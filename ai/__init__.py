"""cxr-node: ai package."""
