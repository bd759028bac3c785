"""Ray Data: read, validate, clean, dedupe, augment, mix, split and tokenize corpora."""
