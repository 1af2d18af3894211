"""Triton device code (@triton.jit only): see NOTES.md for floors and estimates."""
