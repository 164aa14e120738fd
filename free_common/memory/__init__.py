"""Memory: the bank of recovered images per pseudo-class and task sampling from it."""
