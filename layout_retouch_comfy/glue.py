"""The ComfyUI calls the nodes make (the only module here that imports ComfyUI)."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch


class ComfyCalls:
    samplers = comfy.samplers.KSampler.SAMPLERS
    schedulers = comfy.samplers.KSampler.SCHEDULERS

    @staticmethod
    def load(patcher) -> None:
        mm.load_models_gpu([patcher])

    @staticmethod
    def interrupted() -> bool:
        return mm.processing_interrupted()

    @staticmethod
    def interrupt_exception() -> Exception:
        return mm.InterruptProcessingException()

    @staticmethod
    def encode(clip, text: str):
        """A CONDITIONING, as CLIPTextEncode makes it."""
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    @staticmethod
    def fix_empty_latent_channels(model, samples):
        return comfy.sample.fix_empty_latent_channels(model, samples)

    @staticmethod
    def prepare_noise(samples, seed, batch_index=None):
        return comfy.sample.prepare_noise(samples, seed, batch_index)

    @staticmethod
    def sigmas(model, steps, sampler_name, scheduler, denoise) -> torch.Tensor:
        return comfy.samplers.KSampler(
            model,
            steps=steps,
            device=model.load_device,
            sampler=sampler_name,
            scheduler=scheduler,
            denoise=denoise,
            model_options=model.model_options,
        ).sigmas

    @staticmethod
    def sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        **kwargs,
    ):
        return comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent_image,
            disable_pbar=True,
            **kwargs,
        )

    @staticmethod
    def progress_bar(total: int):
        return comfy.utils.ProgressBar(total)

    @staticmethod
    def previewer(model):
        return latent_preview.get_previewer(model.load_device, model.model.latent_format)
