"""Attention backends behind one function (skeleton; filled in below)."""
BACKENDS = ("auto", "dense", "chunked", "cudnn", "splash")
