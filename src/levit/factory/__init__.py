"""Model and backbone factories: they build a network and load weights into it."""
