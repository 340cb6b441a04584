"""The networks behind the paper's metrics: loaded from a local folder or the libraries' own caches.

- DINO ViT-S/16 (`facebook/dino-vits16`, a transformers `ViTModel`) for I_DINO,
- CLIP ViT-B/32 (`openai/clip-vit-base-patch32`, transformers `CLIPModel`) for I_CLIP and T_CLIP,
- Inception-v3 (torchvision, ImageNet weights) for the Inception Score,
- ImageReward (optional `image-reward` package) for the appendix's prompt-fidelity score.

Nothing is downloaded on purpose: a name resolves through the Hugging Face / torch hub caches (set
HF_HUB_OFFLINE=1 to be sure), a path loads that folder or file. The `build_random_*` functions make
the same architectures, tiny and with random weights, so tests can check the arithmetic offline.

Image preprocessing follows DreamMatcher's released evaluation code (cvlab-kaist/DreamMatcher,
`evaluate.py`, `evaluation/{personalized,clip_eval,dino_eval}.py`), which the paper's protocol
follows: every image (reference or generated) is squashed to 256x256 with bicubic resampling and
scaled to [-1, 1]; CLIP then un-normalises to [0, 1], resizes to its input size (224) and applies
CLIP's mean/std. That resize is torchvision's `Resize` applied to a *tensor*; DreamMatcher pins
torchvision 0.14.1, whose tensor resize does not antialias (plain bicubic interpolation, a = -0.75,
align_corners=False, no clamping of float values). `ClipEmbedder(resize="dreammatcher")` (the
default) does the same arithmetic; `resize="antialias"` is the antialiased bicubic resize of newer
torchvision/PIL, which moves I_CLIP/T_CLIP by ~1e-2 per prompt on real images; DINO receives the
[-1, 1] 256x256 tensor *as is* (torch.hub DINO, no ImageNet normalisation, position embeddings
interpolated to 16x16 patches). That last point is unusual, so
`DinoEmbedder(preprocess="imagenet")` offers the textbook DINO input as well (224 centre crop,
ImageNet mean/std).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import LayoutRetouchError
from ..images import IMAGE_EXTENSIONS

EVAL_SIZE = 256  # DreamMatcher: PersonalizedBase(size=256)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The CLIP input resize: "dreammatcher" = torchvision 0.14's tensor Resize (no antialiasing, what the
# published numbers were made with), "antialias" = antialiased bicubic (newer torchvision, PIL).
CLIP_RESIZES = ("dreammatcher", "antialias")
DEFAULT_CLIP_RESIZE = "dreammatcher"
CLIP_RESIZE_DESCRIPTIONS = {
    "dreammatcher": "bicubic without antialiasing (DreamMatcher's evaluation: torchvision 0.14 tensor Resize)",
    "antialias": "antialiased bicubic (newer torchvision / PIL; not the published protocol)",
}

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_INCEPTION = "torchvision"  # torchvision's IMAGENET1K_V1 weights from the torch hub cache
DEFAULT_IMAGE_REWARD = "ImageReward-v1.0"


# ----------------------------------------------------------------------------------------- images
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. 16-bit and float greyscale are rescaled rather than clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    # RGBA/LA/P/CMYK/L/1: DreamMatcher's plain convert("RGB") (alpha is dropped, not composited).
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (file closed afterwards) as RGB, or raise a message naming the file."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            img = to_rgb(im)
            img.load()
    except FileNotFoundError:
        raise LayoutRetouchError(f"Image not found: {path}.", parameter="image") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise LayoutRetouchError(
            f"Cannot read image {path} ({e}). Replace or delete the file and run again.",
            parameter="image",
        ) from None
    if img.width < 1 or img.height < 1:
        raise LayoutRetouchError(
            f"Image {path} is empty ({img.width}x{img.height}).", parameter="image"
        )
    return img


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files directly in `folder`, sorted by name (hidden files and sidecars skipped)."""
    folder = os.fspath(folder)
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if not f.startswith(".")
        and f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, f))
    )


def to_eval_tensor(
    images: Sequence[Image.Image], size: int = EVAL_SIZE, resample: int = Image.BICUBIC
) -> torch.Tensor:
    """(N, 3, size, size) float tensor in [-1, 1]: images squashed to a square, as DreamMatcher does."""
    arrs = [
        np.asarray(to_rgb(im).resize((size, size), resample=resample), dtype=np.float32)
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., top : top + size, left : left + size]


def _batches(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_choice(value: str, allowed: Sequence[str], what: str, parameter: str) -> None:
    if value not in allowed:
        raise LayoutRetouchError(
            f"Unknown {what} '{value}'; use one of {tuple(allowed)}.", parameter=parameter
        )


def _place(model, device) -> tuple[torch.device, object]:
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    return device, model.eval().to(device)


# -------------------------------------------------------------------------------------- embedders
class ClipEmbedder:
    """CLIP image and text embeddings, L2-normalised (DreamMatcher's CLIPEvaluator arithmetic)."""

    def __init__(
        self,
        model,
        tokenizer,
        device: str | torch.device | None = "cpu",
        batch_size: int = 16,
        resize: str = DEFAULT_CLIP_RESIZE,
    ):
        _check_choice(resize, CLIP_RESIZES, "CLIP resize", "clip_resize")
        self.device, self.model = _place(model, device)
        self.tokenizer = tokenizer
        self.resize = resize
        self.batch_size = batch_size
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = (to_eval_tensor(images) + 1.0) / 2.0  # DreamMatcher: Normalize(mean=-1, std=2)
        # clip_preprocess.transforms[:2] = Resize(224, bicubic) + CenterCrop(224), then [4:] = Normalize
        x = F.interpolate(
            x,
            size=(self.image_size, self.image_size),
            mode="bicubic",
            align_corners=False,
            antialias=self.resize == "antialias",
        )
        return _normalize(_centre_crop(x, self.image_size), CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for chunk in _batches(list(images), self.batch_size):
            feats = self.model.get_image_features(
                pixel_values=self.preprocess(chunk).to(self.device)
            )
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for chunk in _batches(list(texts), self.batch_size):
            tok = self.tokenizer(
                list(chunk),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)


class DinoEmbedder:
    """DINO [CLS] embeddings (after the final LayerNorm), L2-normalised.

    preprocess="dreammatcher" (default): the [-1, 1] 256x256 tensor straight into the ViT, exactly
    what DreamMatcher's DINOEvaluator feeds torch.hub's dino_vits16. preprocess="imagenet": [0, 1],
    centre crop to the model's 224, ImageNet mean/std (the DINO/DreamBooth textbook input).
    """

    PREPROCESS = ("dreammatcher", "imagenet")

    def __init__(
        self,
        model,
        device: str | torch.device | None = "cpu",
        preprocess: str = "dreammatcher",
        batch_size: int = 16,
    ):
        _check_choice(preprocess, self.PREPROCESS, "DINO preprocessing", "dino_preprocess")
        self.device, self.model = _place(model, device)
        self.preprocess_mode = preprocess
        self.batch_size = batch_size
        self.image_size = int(model.config.image_size)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = to_eval_tensor(images)
        if self.preprocess_mode == "imagenet":
            x = _centre_crop((x + 1.0) / 2.0, min(self.image_size, EVAL_SIZE))
            x = _normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return x

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for chunk in _batches(list(images), self.batch_size):
            x = self.preprocess(chunk).to(self.device)
            hidden = self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            out.append(F.normalize(hidden[:, 0].float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class InceptionClassifier:
    """p(y|x) from torchvision's Inception-v3 (softmax over its 1000 ImageNet classes)."""

    def __init__(
        self,
        model,
        device: str | torch.device | None = "cpu",
        input_size: int = 299,
        batch_size: int = 16,
    ):
        if input_size < 75:
            raise LayoutRetouchError(
                "Inception-v3 needs inputs of at least 75x75 pixels.", parameter="input_size"
            )
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.model = model.eval().to(self.device)
        self.input_size = input_size
        self.batch_size = batch_size

    @torch.no_grad()
    def probs(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for chunk in _batches(list(images), self.batch_size):
            x = (to_eval_tensor(chunk, size=self.input_size, resample=Image.BILINEAR) + 1.0) / 2.0
            # With pretrained weights torchvision sets transform_input=True, which expects this input.
            logits = self.model(_normalize(x, IMAGENET_MEAN, IMAGENET_STD).to(self.device))
            if isinstance(
                logits, tuple
            ):  # aux_logits in train mode; eval never returns it, be safe
                logits = logits[0]
            out.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1000))


# ---------------------------------------------------------------------------------------- loaders
def _load_failure(
    what: str, source: str, err: Exception, parameter: str, how: str
) -> LayoutRetouchError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LayoutRetouchError(
        f"Could not load {what} from '{source}' ({first[:300]}). {how}", parameter=parameter
    )


def _looks_like_path(source: str) -> bool:
    """A local path rather than a hub id like 'openai/clip-vit-base-patch32'."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or os.path.exists(source)
    )


def load_clip(
    source: str = DEFAULT_CLIP, device: str | None = None, resize: str = DEFAULT_CLIP_RESIZE
) -> ClipEmbedder:
    """CLIP ViT-B/32 from a saved folder (`save_pretrained` of openai/clip-vit-base-patch32) or the HF cache."""
    source = os.path.expanduser(source)
    from transformers import CLIPModel, CLIPTokenizer

    if _looks_like_path(source) and not os.path.isdir(source):
        raise LayoutRetouchError(
            f"CLIP folder '{source}' (--clip) does not exist.", parameter="clip"
        )
    try:
        model = CLIPModel.from_pretrained(source)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_failure(
            "CLIP ViT-B/32",
            source,
            e,
            "clip",
            "Pass --clip with a local folder holding openai/clip-vit-base-patch32 (config.json, weights, "
            "vocab.json, merges.txt), or fetch it once into the Hugging Face cache on a machine with internet.",
        ) from None
    return ClipEmbedder(model, tokenizer, device=device, resize=resize)


def load_dino(
    source: str = DEFAULT_DINO, device: str | None = None, preprocess: str = "dreammatcher"
) -> DinoEmbedder:
    """DINO ViT-S/16 from a saved folder (facebook/dino-vits16) or the HF cache."""
    source = os.path.expanduser(source)
    from transformers import ViTModel

    if _looks_like_path(source) and not os.path.isdir(source):
        raise LayoutRetouchError(
            f"DINO folder '{source}' (--dino) does not exist.", parameter="dino"
        )
    try:
        model = ViTModel.from_pretrained(source, add_pooling_layer=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_failure(
            "DINO ViT-S/16",
            source,
            e,
            "dino",
            "Pass --dino with a local folder holding facebook/dino-vits16 (config.json + weights), or fetch it "
            "once into the Hugging Face cache on a machine with internet.",
        ) from None
    return DinoEmbedder(model, device=device, preprocess=preprocess)


def load_inception(
    source: str = DEFAULT_INCEPTION, device: str | None = None
) -> InceptionClassifier:
    """torchvision Inception-v3: "torchvision" = IMAGENET1K_V1 from the torch hub cache, or a .pth state dict."""
    import torchvision
    from torchvision.models import Inception_V3_Weights

    weights = Inception_V3_Weights.IMAGENET1K_V1
    cache_file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        if source == DEFAULT_INCEPTION:
            if not os.path.isfile(cache_file):
                raise FileNotFoundError(f"{cache_file} is not in the torch hub cache")
            model = torchvision.models.inception_v3(weights=weights)
        else:
            if not os.path.isfile(source):
                raise FileNotFoundError(f"no such file: {source}")
            model = torchvision.models.inception_v3(
                weights=None, aux_logits=True, transform_input=True, init_weights=False
            )
            state = torch.load(source, map_location="cpu", weights_only=True)
            model.load_state_dict(
                state.get("state_dict", state) if isinstance(state, dict) else state
            )
    except (OSError, RuntimeError, ValueError) as e:
        raise _load_failure(
            "Inception-v3",
            source,
            e,
            "inception",
            f"Pass --inception with torchvision's inception_v3 state dict ({os.path.basename(weights.url)}), put that "
            f"file at {cache_file}, or pass --inception none to skip the Inception Score.",
        ) from None
    return InceptionClassifier(model, device=device)


class ImageRewardScorer:
    """Wraps `ImageReward.load(...)`: `scorer(prompt, images) -> list[float]`."""

    def __init__(self, model):
        self.model = model

    def __call__(self, prompt: str, images: Sequence[Image.Image]) -> list[float]:
        with torch.no_grad():
            scores = self.model.score(prompt, list(images))
        return [float(s) for s in (scores if isinstance(scores, (list, tuple)) else [scores])]


IMAGE_REWARD_INSTALL = (
    "pip install image-reward  "
    "(then pass --imagereward ImageReward-v1.0 or a path to ImageReward.pt)"
)


def load_image_reward(
    source: str = DEFAULT_IMAGE_REWARD, device: str | None = None, required: bool = False
) -> tuple[Callable | None, str]:
    """(scorer, "") or (None, reason). ImageReward is optional: imported lazily, never required by tests.

    `required=True` (the user named a model explicitly) turns a failure into a LayoutRetouchError.
    """
    try:
        import ImageReward as RM  # noqa: N813 - the package's own name
    except Exception as e:  # ImportError, or its own dependencies failing to import
        reason = f"ImageReward is not installed ({type(e).__name__}: {e}). Install it with: {IMAGE_REWARD_INSTALL}"
        if required:
            raise LayoutRetouchError(reason, parameter="imagereward") from None
        return None, reason
    dev = str(resolve_device(device))
    try:
        kwargs = {"device": dev}
        if os.path.isfile(source):
            # A local ImageReward.pt: ImageReward looks for med_config.json in download_root, so point it beside.
            kwargs["download_root"] = os.path.dirname(os.path.abspath(source))
        model = RM.load(source, **kwargs)
    except Exception as e:
        reason = (
            f"ImageReward model '{source}' could not be loaded ({type(e).__name__}: {str(e)[:300]}). Pass "
            f"--imagereward with a local ImageReward.pt (med_config.json beside it) or run once with internet."
        )
        if required:
            raise LayoutRetouchError(reason, parameter="imagereward") from None
        return None, reason
    return ImageRewardScorer(model), ""


# ------------------------------------------------------------------- tiny random builders (tests)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable unicode map (the base alphabet of CLIP's BPE vocabulary)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip_tokenizer(folder: str | os.PathLike):
    """A character-level CLIP BPE vocabulary (256 bytes, their '</w>' forms, start/end tokens), no merges.

    Same format as openai/clip's vocab.json/merges.txt, so `CLIPTokenizer.from_pretrained(folder)` reads
    it. <|endoftext|> has the largest id, as in CLIP: the text model pools at argmax(input_ids).
    """
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        pad_token="<|endoftext|>",
    )


def build_random_clip(
    tokenizer_folder: str | os.PathLike,
    seed: int = 0,
    image_size: int = 32,
    device: str = "cpu",
    resize: str = DEFAULT_CLIP_RESIZE,
) -> ClipEmbedder:
    """CLIP with the real architecture, tiny and random (hidden 32, 2 layers, patch 8)."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = write_tiny_clip_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return ClipEmbedder(CLIPModel(config), tokenizer, device=device, resize=resize)


def build_random_dino(
    seed: int = 0, preprocess: str = "dreammatcher", device: str = "cpu"
) -> DinoEmbedder:
    """A ViT-S/16-shaped `ViTModel` (patch 16), tiny and random (hidden 32, 2 layers, 32x32 positions)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return DinoEmbedder(
        ViTModel(config, add_pooling_layer=False), device=device, preprocess=preprocess
    )


def build_random_inception(
    seed: int = 0, input_size: int = 75, device: str = "cpu"
) -> InceptionClassifier:
    """torchvision's Inception-v3 with random weights (the IS arithmetic needs only its softmax)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    return InceptionClassifier(model, device=device, input_size=input_size)
