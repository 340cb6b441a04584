"""The ComfyUI calls the nodes make (the only module here that imports ComfyUI)."""

from __future__ import annotations

import os

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
import torch

from lib_layout_retouch.segmentation import SAM_EXTENSIONS

# Where SAM checkpoints are: `models/sams/`, the folder ComfyUI's segment-anything node packs
# (Impact Pack, comfyui_segment_anything) use, so their files are listed here too;
# extra_model_paths.yaml may add folders under `sams:` (ComfyUI reads it before custom nodes).
SAM_FOLDER = "sams"
folder_paths.add_model_folder_path(SAM_FOLDER, os.path.join(folder_paths.models_dir, SAM_FOLDER))
_paths, _extensions = folder_paths.folder_names_and_paths[SAM_FOLDER]
if not _extensions:  # registered without a filter (no extensions = every file)
    folder_paths.folder_names_and_paths[SAM_FOLDER] = (_paths, set(SAM_EXTENSIONS))


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

    @staticmethod
    def show_text(node_id, text: str) -> None:
        """`text` on the node in the page (ComfyUI's progress text, under the widgets); a no-op
        outside a server (the node called directly) or without the node's id."""
        if node_id is None:
            return
        try:
            from server import PromptServer
        except ImportError:
            return
        server = getattr(PromptServer, "instance", None)
        if server is not None:
            server.send_progress_text(text, node_id)

    @staticmethod
    def sam_files() -> list[str]:
        return folder_paths.get_filename_list(SAM_FOLDER)

    @staticmethod
    def sam_path(name: str):
        """The file of a listed SAM checkpoint, or None (gone since the list was made)."""
        return folder_paths.get_full_path(SAM_FOLDER, name)

    @staticmethod
    def sam_device(choice: str) -> torch.device:
        """'auto': ComfyUI's device (the GPU unless --cpu); 'cpu': SAM stays off the GPU."""
        return torch.device("cpu") if choice == "cpu" else mm.get_torch_device()

    @staticmethod
    def lora_files() -> list[str]:
        return folder_paths.get_filename_list("loras")

    @staticmethod
    def load_lora(name: str):
        """A LoRA file of models/loras as a state dict (as the LoRA loader reads it), or None (the
        file is gone since the list was made)."""
        path = folder_paths.get_full_path("loras", name)
        return None if path is None else comfy.utils.load_torch_file(path, safe_load=True)

    @staticmethod
    def with_lora(model, lora: dict, strength: float):
        """A clone of `model` with the LoRA's weight patches (LoraLoaderModelOnly's)."""
        return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]
