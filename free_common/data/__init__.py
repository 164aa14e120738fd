"""Data: the glyph benchmark, Fashion-MNIST, standard few-shot folders, episodes."""
