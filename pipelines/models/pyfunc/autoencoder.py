"""pyfunc flavour of the Stage A autoencoder: images (N, 3, H, W) in [-1, 1] -> scaled latents (mode).

Logged as code by `pipelines.models.registry.publish_autoencoder`; `mlflow.pyfunc.load_model(uri).predict(x)`
gives `scale_factor * mode(q(z | x))`, the latents Stage B trains on.
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from ldm_core.autoencoder import AutoencoderKL


class AutoencoderPyfunc(PythonModel):
    def load_context(self, context):
        self.model = AutoencoderKL.from_pretrained(context.artifacts["autoencoder"]).eval()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            z = self.model.encode(x).mode() * self.model.scale_factor
        return z.numpy()


mlflow.models.set_model(AutoencoderPyfunc())
