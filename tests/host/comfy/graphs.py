"""API-format graphs for the ComfyUI tier (and the example workflows/…_api.json): node ids are
strings, a link is [node id, output index]."""

from __future__ import annotations

import copy

PERSONAL = "comfy-personal.safetensors"
VANILLA = "comfy-vanilla.safetensors"
LORA = "comfy-lora.safetensors"
PROMPT = "a photo of sks dog on a beach"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 4


def base(ckpt: str = PERSONAL, batch: int = 1, size: int = SIZE) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "empty": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": size, "height": size, "batch_size": batch},
        },
    }


def plain(seed: int = 7, steps: int = STEPS, prompt: str = PROMPT, prefix: str = "plain") -> dict:
    """KSampler on the personalized model → SaveLatent 'out'."""
    g = base()
    g.update(
        {
            "pos": {
                "class_type": "CLIPTextEncode",
                "inputs": {"text": prompt, "clip": ["ckpt", 1]},
            },
            "neg": {
                "class_type": "CLIPTextEncode",
                "inputs": {"text": NEGATIVE, "clip": ["ckpt", 1]},
            },
            "ks": {
                "class_type": "KSampler",
                "inputs": {
                    "seed": seed,
                    "steps": steps,
                    "cfg": 7.5,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                    "model": ["ckpt", 0],
                    "positive": ["pos", 0],
                    "negative": ["neg", 0],
                    "latent_image": ["empty", 0],
                },
            },
            "out": {
                "class_type": "SaveLatent",
                "inputs": {"samples": ["ks", 0], "filename_prefix": prefix},
            },
        }
    )
    return g


def retouch(
    reference: str | list[str] | None,
    *,
    seed: int = 7,
    steps: int = STEPS,
    prompt: str = PROMPT,
    vanilla: str | None = VANILLA,
    batch: int = 1,
    prefix: str = "lr",
    **inputs,
) -> dict:
    """Layout-and-Retouch Sampler (DreamBooth: the vanilla checkpoint as vanilla_model) → SaveLatent
    'out' (retouched), 'layout', SaveImage 'mask_img' and 'map_img'."""
    g = base(batch=batch)
    refs = [reference] if isinstance(reference, str) else list(reference or [])
    node_inputs = {
        "model": ["ckpt", 0],
        "clip": ["ckpt", 1],
        "vae": ["ckpt", 2],
        "prompt": prompt,
        "negative_prompt": NEGATIVE,
        "concept_token": "sks",
        "class_phrase": "dog",
        "seed": seed,
        "steps": steps,
        "cfg": 7.5,
        "sampler_name": "euler",
        "scheduler": "normal",
        "lambda1": 1,
        "lambda2": 1,
        "mask_start": 3,
        "scale_with_steps": False,
        "width": SIZE,
        "height": SIZE,
        "batch_size": batch,
    }
    for i, name in enumerate(refs):
        g[f"ref{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    if refs:
        link = ["ref0", 0]
        for i in range(1, len(refs)):
            g[f"batch{i}"] = {
                "class_type": "ImageBatch",
                "inputs": {"image1": link, "image2": [f"ref{i}", 0]},
            }
            link = [f"batch{i}", 0]
        node_inputs["reference"] = link
    if vanilla:
        g["vckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": vanilla}}
        node_inputs["vanilla_model"] = ["vckpt", 0]
        node_inputs["vanilla_clip"] = ["vckpt", 1]
    node_inputs.update(inputs)
    g["lr"] = {"class_type": "LayoutRetouchSampler", "inputs": node_inputs}
    g["out"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["lr", 0], "filename_prefix": prefix},
    }
    g["layout"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["lr", 1], "filename_prefix": prefix + "-layout"},
    }
    g["mask_img"] = {"class_type": "MaskToImage", "inputs": {"mask": ["lr", 2]}}
    g["mask_save"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["mask_img", 0], "filename_prefix": prefix + "-mask"},
    }
    g["map_save"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["lr", 3], "filename_prefix": prefix + "-map"},
    }
    return g


def with_lora(g: dict) -> dict:
    """LoRA as two MODELs: the personalized model is the checkpoint + LoRA, the vanilla one the
    checkpoint before the LoRA loader."""
    g = copy.deepcopy(g)
    g.pop("vckpt", None)
    g["lora"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["ckpt", 0],
            "clip": ["ckpt", 1],
            "lora_name": LORA,
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    lr = g["lr"]["inputs"]
    lr.update(
        model=["lora", 0], clip=["lora", 1], vanilla_model=["ckpt", 0], vanilla_clip=["ckpt", 1]
    )
    return g


def inpaint(g: dict, image: str) -> dict:
    """img2img/inpaint: the latent of `image` (VAEEncode) and its alpha as MASK (LoadImage: 1 − α)."""
    g = copy.deepcopy(g)
    g["src"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["src", 0], "vae": ["ckpt", 2]}}
    g["src_latent"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["enc", 0], "filename_prefix": "src"},
    }
    g["lr"]["inputs"].update(latent=["enc", 0], mask=["src", 1], denoise=1.0)
    return g


TWO_PROMPT = "a photo of sks dog and zwx cat on a beach"
TWO_WORDS = (("sks", "dog"), ("zwx", "cat"))


def subjects(
    references: list[str],
    *,
    loras: tuple = (LORA, None),
    prompt: str = TWO_PROMPT,
    prefix: str = "two",
    **inputs,
) -> dict:
    """Layout-and-Retouch Subject nodes (one per photo, chained in order; subject k's LoRA file
    `loras[k]`, None: photo only, named by its class phrase) into the Sampler's 'subjects', its own
    'reference' empty (the chain is every subject); the base checkpoint is the MODEL. Saves as
    `retouch`, and SaveImage 'regions_save' of the regions output."""
    g = retouch(None, prompt=prompt, vanilla=None, prefix=prefix, **inputs)
    link = None
    for k, (name, lora, (token, phrase)) in enumerate(zip(references, loras, TWO_WORDS)):
        g[f"photo{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        subject = {
            "reference": [f"photo{k}", 0],
            "personalization": "lora" if lora else "photo",
            "concept_token": token if lora else "",
            "class_phrase": phrase,
            "lora_name": lora or "None",
            "lora_strength": 1.0,
        }
        if link is not None:
            subject["subjects"] = link
        g[f"subject{k}"] = {"class_type": "LayoutRetouchSubject", "inputs": subject}
        link = [f"subject{k}", 0]
    g["lr"]["inputs"]["subjects"] = link
    g["regions_save"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["lr", 5], "filename_prefix": prefix + "-regions"},
    }
    return g
