"""A test-only Forge extension (installed by tests/host/forge/conftest.py beside ours): when the prompt
contains `attnreplace`, it replaces one self-attention layer of the UNet through Forge's
`set_model_attn1_replace` — as IP-Adapter-style extensions do — with plain attention. The Forge tier
checks that Layout-and-Retouch then refuses, naming the conflict, instead of editing nothing."""

from modules import scripts

TRIGGER = "attnreplace"


class AttentionReplaceForTests(scripts.Script):
    def title(self):
        return "lr-test attention replace"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        if TRIGGER not in (p.prompt or ""):
            return
        from backend.attention import attention_function

        def plain_attention(q, k, v, extra_options):
            return attention_function(q, k, v, extra_options["n_heads"])

        unet = p.sd_model.forge_objects.unet.clone()
        unet.set_model_attn1_replace(plain_attention, "output", 5)
        p.sd_model.forge_objects.unet = unet
