"""cxr-node: node package."""
