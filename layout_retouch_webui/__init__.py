"""WebUI glue for Layout-and-Retouch: everything that imports the host (`modules.*`, `backend.*`).

`scripts/layout_retouch.py` is only the `Script` class and the callback registrations; each concern
lives in one module here:

- `hosts/`    one adapter per host (AUTOMATIC1111, Forge): the UNet, ε, text encoding, VAE, LoRA,
              checkpoints — what differs between the WebUIs, answered for one generation;
- `settings`  the WebUI settings section and the lists the UI offers (SAM files, checkpoints);
- `ui`        the accordion, its controls and hints, infotext paste;
- `api`       script args → validated parameters, the generation's own infotext, how errors reach
              the API (HTTP 422) and the UI (a message under the gallery);
- `checks`    what is refused (or noted) before any compute;
- `vanilla`   DreamBooth's vanilla UNet and text encoder, loaded once and cached;
- `stage1`    the per-step switch of prompt / UNet / LoRA from the CFG-denoiser callback;
- `run`       one enabled generation's state, kept on `p`;
- `sampling`  the wrapper of this generation's `p.sample` (stage 1 inside it, then stage 2);
- `stage2`    the retouch of the stage-1 latents;
- `xyz`       the X/Y/Z plot axes.

The algorithm itself is `lib_layout_retouch`, which imports nothing from any WebUI.
"""
