"""MLflow "models from code": the pyfunc wrappers logged with the autoencoder and the U-Net bundle."""
