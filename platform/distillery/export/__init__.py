"""Ship a trained model: merge, quantise, export."""
