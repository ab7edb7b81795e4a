"""Patch mode: edits to a peft source checkout, made with libcst (source text in, source text out)."""
