"""devicetree."""
