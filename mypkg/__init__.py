"""A small demo package for the README: layer types PEFT does not know (a convolution, a lookup table, an int8 linear)."""

from mypkg.layers import Int8WeightOnlyLinear, MyConv, TokenEmbedding


__all__ = ["Int8WeightOnlyLinear", "MyConv", "TokenEmbedding"]
