"""Layout-and-Retouch (Kim et al., arXiv 2407.09779): the algorithm, host-agnostic.

One module per concept; nothing here imports a WebUI (`modules`, `backend`) or gradio:

The paper
  prompts        y_p, y_p⁻, y_r and the subject's token rows
  schedule       which model, prompt and phase at step s (λ1, λ2, mask start; the paper's values)
  stage1         step-blended layout generation (vanilla → personalized), with the library's DDIM
  pipeline       the retouch (Algorithm 1) end to end, the reference caches
  attention      the retouch editor: one processor per attention layer, a state per model call,
                 installed by a patch that always restores
  masks          the adaptive mask M (cross-attention + SAM, distance transform)
  segmentation   the Segment-Anything mask M^SAM
The models
  family         what a model family supplies to the retouch loop (sampler, layers, editor, patch)
  ddim           DDIM sampling and inversion over a model's ᾱ (the ε-UNet family's sampler)
  layers         which attention layers do what (SD1 / SDXL tables; the rule for other UNets)
  model          the model interface over ldm/sgm (A1111) and k-diffusion denoisers
  forge_model    the same interface over Forge's engines
  conditioning   text conditionings for SD1 (tensor) and SDXL (dict)
  text_encoders  stage 1's vanilla text encoder (DreamBooth)
The extension
  params         the one validated parameter table and object (UI, API, infotext)
  images         the reference photos: decoding, preparation, fingerprints
  job            one enabled generation, as the WebUI glue drives it
  progress, ui_text, axes, logs, errors   what the user sees: progress bar, messages, X/Y/Z axes
  evaluation     the paper's metrics and protocol runner
"""

__version__ = "0.1.0"

# The extension's one name: the WebUI script's title (what API clients key `alwayson_scripts` by),
# the accordion's label, the prefix of every refusal.
NAME = "Layout-and-Retouch"
