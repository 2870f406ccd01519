"""pyfunc flavour of the Stage B U-Net: prompts -> scaled latents (N, C, h, w), by DDIM with classifier-free guidance.

Logged as code by `pipelines.models.registry.publish_unet`. Input: a list of prompts, or a DataFrame with a `prompt`
column. Params (all optional, defaults in `pipelines.models.registry.UNET_PYFUNC_PARAMS`): `steps`, `guidance_scale`,
`guidance_rescale`, `eta`, `seed`, `use_ema`.
Decode the result with the bundle's autoencoder: `autoencoder.decode_scaled(latents)`.
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from ldm_core.sampling import Condition, ddim_sample, sampling_plan
from pipelines.models.interop import import_unet
from pipelines.models.registry import UNET_PYFUNC_PARAMS, read_unet_bundle
from pipelines.data.text_encoders import load_text_encoder


class UNetPyfunc(PythonModel):
    def load_context(self, context):
        self.folder = context.artifacts["unet"]
        self.bundles = {}
        self.text_encoder = None

    def _bundle(self, use_ema: bool):
        if use_ema not in self.bundles:
            self.bundles[use_ema] = read_unet_bundle(self.folder, use_ema=use_ema, load_base=import_unet)
        return self.bundles[use_ema]

    def predict(self, context, model_input, params=None):
        p = {**UNET_PYFUNC_PARAMS, **(params or {})}
        if hasattr(model_input, "columns"):  # a DataFrame: the `prompt` column, else the only column
            model_input = model_input["prompt"] if "prompt" in model_input.columns else model_input.iloc[:, 0]
        prompts = [str(x) for x in model_input]
        bundle = self._bundle(bool(p["use_ema"]))
        if self.text_encoder is None:
            self.text_encoder = load_text_encoder(bundle.text_encoder)
        hidden, mask = self.text_encoder.encode(prompts)
        generator = torch.Generator().manual_seed(int(p["seed"]))
        x_T = torch.randn((len(prompts), *bundle.latent_shape), generator=generator)  # then any eta noise, same generator
        plan = sampling_plan(bundle.schedule, int(p["steps"]), eta=float(p["eta"]))
        condition = Condition(hidden, mask, bundle.null_context, bundle.null_mask, float(p["guidance_scale"]),
                              float(p["guidance_rescale"]))
        z = ddim_sample(bundle.unet, x_T, plan, condition, generator=generator)
        return np.asarray(z.numpy(), dtype=np.float32)


mlflow.models.set_model(UNetPyfunc())
