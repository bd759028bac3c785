"""Models and tokenizers: build tiny ones locally, load any Hugging Face checkpoint, plan which parameters train."""
