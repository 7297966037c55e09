"""PyTorch side: data, models, training, evaluation."""
