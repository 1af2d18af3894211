"""Triton device code (@triton.jit only): DESIGN.md has the design, floors and estimates; NOTES.md the dated log."""
