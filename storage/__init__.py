"""cxr-node: storage package."""
