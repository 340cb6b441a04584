"""Layout-and-Retouch (Kim et al., arXiv 2407.09779) for ldm/A1111 Stable Diffusion models.

One module per concept of the paper:
  prompts       y_p, y_p⁻, y_r and the subject's token rows
  schedule      which model/prompt/phase at step s (λ1, λ2, mask start; scaled with T)
  ddim          DDIM sampling and inversion over a model's ᾱ
  stage1        step-blended layout generation (vanilla → personalized)
  layers        which attention layers do what (SD1 table; inferred rule)
  attention     per-instance attention wrappers and the retouch editor
  masks         the adaptive mask M (cross-attention + SAM, distance transform)
  segmentation  Segment-Anything wrapper
  pipeline      Algorithm 1 end to end, caches
  params        the one validated parameter object (UI, API, infotext)
  images        reference image decoding and preparation
  evaluation    the paper's metrics and protocol runner
Nothing here imports the WebUI (`modules.*`).
"""

__version__ = "0.1.0"
