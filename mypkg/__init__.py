"""A small demo package for the README: a layer type PEFT does not know."""

from mypkg.layers import MyConv


__all__ = ["MyConv"]
