"""Models as the pipeline publishes and uses them: the MLflow registry (`registry.py`, pyfunc models in `pyfunc/`),
safetensors checkpoints, Stable Diffusion / diffusers interop, LoRA adapters made with peft (`lora.py`), rendering images from a published U-Net
(`inference.py`) and the MNIST digit judge that scores prompt accuracy (`judge.py`)."""
