"""The wrapper of one enabled generation's sampling.

`install` wraps THIS generation's `p.sample` / `p.sample_hr_pass` (instance attributes of `p`, gone
with it): stage 1 runs inside the host's own sampling, switched per step by `stage1`; stage 2 runs on
its latents before the hires pass (`stage2`), so its errors reach the API as HTTP errors instead of
being swallowed by the WebUI's hook runner. Whatever happens, nothing stays switched.
"""

from __future__ import annotations

from layout_retouch_webui import api, stage1, stage2
from layout_retouch_webui.run import RUN_ATTR, Run
from lib_layout_retouch.errors import LayoutRetouchError


def install(p, run: Run) -> None:
    """Wrap this generation's sampling (instance attributes on p only)."""
    original_sample = p.sample
    original_hr = getattr(p, "sample_hr_pass", None)

    def sample(*args, **kwargs):
        run.retouched = False
        try:
            if run.stage1_skipped:
                # img2img, layout source 'input': no sampling at all; the input's latents (one row per
                # image of the batch) are the layout. The noise the host's sample() would draw is drawn
                # and dropped: the WebUI encodes the next img2img input with the global torch RNG
                # (the VAE posterior's sample), which that draw leaves seeded — skipping it would
                # change the next plain img2img.
                rng = getattr(p, "rng", None)
                if rng is not None:
                    rng.next()
                samples = p.init_latent
            else:
                try:
                    stage1.begin(p, run)
                    samples = original_sample(*args, **kwargs)
                finally:
                    stage1.end(p, run)  # nothing stays switched, whatever happened
            if not run.retouched:
                samples = stage2.retouch_samples(p, run, samples)
        except LayoutRetouchError as e:
            raise api.request_error(p, e) from None
        p.extra_generation_params.update(run.job.infotext())
        return samples

    def sample_hr_pass(samples, decoded_samples, *args, **kwargs):
        stage1.end(p, run)
        retouched = stage2.retouch_samples(
            p, run, samples
        )  # its errors pass through sample() above
        if decoded_samples is not None and retouched is not samples:
            decoded_samples = run.host.decode_for_hires(p, retouched)
        return original_hr(retouched, decoded_samples, *args, **kwargs)

    p.sample = sample
    if original_hr is not None:
        p.sample_hr_pass = sample_hr_pass
    setattr(p, RUN_ATTR, run)
