"""MLflow "models from code" definitions: the pyfunc flavour of each published model.

They are logged by file path (no pickling); the weights travel as artifacts in the model's own
safetensors + config.json format, so `pipelines.models` can also load them straight into PyTorch.
"""
