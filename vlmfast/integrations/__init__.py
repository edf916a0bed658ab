"""Using vlmfast from other libraries: `transformers` (a one-line patch of a loaded model's loss)."""
