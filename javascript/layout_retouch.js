// Hover hints for the Layout-and-Retouch controls, through the WebUI's `titles` (hints.js).
// Generated from lib_layout_retouch/params.py by tools/gen_hints.py: do not edit by hand.
(function () {
    const layoutRetouchHints = {
        "Enable Layout-and-Retouch": "Let the vanilla model draw the layout, then retouch the subject's identity from the reference photo.",
        "Reference photo of the subject": "One photo of your subject (I_r), or up to 4: the subject's identity is taken from all of them together. Each is centre-cropped to the image's aspect ratio; the infotext records their fingerprints.",
        "Personalized model type": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "Vanilla checkpoint": "The original checkpoint your DreamBooth model was fine-tuned from; it draws the layout. Not needed for Textual Inversion or LoRA.",
        "Concept token": "The word in your prompt that stands for the subject, e.g. sks or <my-vase>.",
        "Class phrase": "What a normal model calls the subject, e.g. dog or red vase. Replaces the concept token in the vanilla model's prompt and finds the subject for the mask.",
        "Reference prompt (optional)": "Neutral prompt for the reference and target paths; empty means 'a photo of <concept token> <class phrase>'.",
        "λ1: vanilla layout steps": "How many first steps the vanilla model draws (paper: 5; 3 for hard prompts). Larger follows the prompt better but weakens the identity.",
        "λ2: layout-copy steps": "How many first retouch steps copy the layout's attention (paper: 10).",
        "Mask blending from step": "First retouch step that blends the subject mask (paper: 31 of 50); 51 turns blending off.",
        "Scale λ1, λ2 and mask start with the step count": "On: the three values are for 50 steps and are scaled to your step count. Off: they are used as they are.",
        "Segment-Anything model": "SAM checkpoint that sharpens the subject mask; 'none' uses the cross-attention mask only.",
        "Cross-attention mask threshold": "Threshold on the min-max normalised cross-attention map of the subject tokens (MasaCtrl 0.1, DreamMatcher 0.05); must be between 0 and 1.",
        "Show layout, mask and attention map": "Add each image's stage-1 layout, its blend mask and its subject cross-attention map to the gallery after the results (a viewing option: not written to the infotext).",
        "Layout path latents": "Where the layout path's latents come from: DDIM inversion of the layout image (paper), or the latents stage 1 passed through (no inversion cost; needs the DDIM sampler, else the layout is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: the input is inverted and retouched, putting your subject into that picture).",
        "Reset the reference path every step": "Set the reference path back to its stored inversion latent at every step, so it reconstructs the photo exactly (as MasaCtrl and DreamMatcher do).",
        "Attention layer preset": "Which decoder self-attention layers take the reference's identity (and blend the mask): standard = the paper's (SD1: decoder blocks 10–15 of 16; SDXL: output_blocks.1–5, 26 of 70 layers); light = only the finer of those levels (SD1: output_blocks.9–11; SDXL: output_blocks.3–5), for when the reference's pose or background bleeds in.",
        "Stage-1 text encoder (DreamBooth)": "Which text encoder reads the vanilla steps' prompt y_p⁻ in DreamBooth mode: the vanilla checkpoint's own (what the vanilla UNet understands; DreamBooth often fine-tunes the text encoder too), or the loaded personalized model's.",
        "More subjects": "Subjects 2 to 3 in the same image, each from its own photos: each is retouched only in its own region of the layout, from its own reference photos (and its own LoRA).",
        "DreamBooth checkpoint": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "Textual Inversion embedding": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "LoRA": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "Photos only (no trained model)": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "DDIM inversion of the layout (paper)": "Where the layout path's latents come from: DDIM inversion of the layout image (paper), or the latents stage 1 passed through (no inversion cost; needs the DDIM sampler, else the layout is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: the input is inverted and retouched, putting your subject into that picture).",
        "Stage-1 latents (faster)": "Where the layout path's latents come from: DDIM inversion of the layout image (paper), or the latents stage 1 passed through (no inversion cost; needs the DDIM sampler, else the layout is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: the input is inverted and retouched, putting your subject into that picture).",
        "The input image itself (img2img)": "Where the layout path's latents come from: DDIM inversion of the layout image (paper), or the latents stage 1 passed through (no inversion cost; needs the DDIM sampler, else the layout is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: the input is inverted and retouched, putting your subject into that picture).",
        "Standard (paper)": "Which decoder self-attention layers take the reference's identity (and blend the mask): standard = the paper's (SD1: decoder blocks 10–15 of 16; SDXL: output_blocks.1–5, 26 of 70 layers); light = only the finer of those levels (SD1: output_blocks.9–11; SDXL: output_blocks.3–5), for when the reference's pose or background bleeds in.",
        "Light": "Which decoder self-attention layers take the reference's identity (and blend the mask): standard = the paper's (SD1: decoder blocks 10–15 of 16; SDXL: output_blocks.1–5, 26 of 70 layers); light = only the finer of those levels (SD1: output_blocks.9–11; SDXL: output_blocks.3–5), for when the reference's pose or background bleeds in.",
        "Vanilla checkpoint's": "Which text encoder reads the vanilla steps' prompt y_p⁻ in DreamBooth mode: the vanilla checkpoint's own (what the vanilla UNet understands; DreamBooth often fine-tunes the text encoder too), or the loaded personalized model's.",
        "Loaded model's": "Which text encoder reads the vanilla steps' prompt y_p⁻ in DreamBooth mode: the vanilla checkpoint's own (what the vanilla UNet understands; DreamBooth often fine-tunes the text encoder too), or the loaded personalized model's.",
        "More photos of the subject (optional, up to 3)": "Other photos of the same subject (other angles, other light): the retouch attends to all of them together. Each is inverted once and cached. The API sends them in reference_image as a list.",
        "Guess": "Fill Concept token and Class phrase from the prompt: a Textual-Inversion embedding name, a rare identifier such as sks / ohwx followed by its class word, or a LoRA tag. It says what it could not find.",
        "Advanced": "The reference prompt, Segment-Anything mask, mask threshold, where the layout path comes from, the reference path reset, the attention layer preset and DreamBooth's stage-1 text encoder: the paper's defaults work for most subjects.",
        "[L&R] Lambda1": "λ1: vanilla layout steps: the values are steps at this generation's step count, used as given (not scaled with steps): at 10 steps the panel's paper values 5 / 10 / 31 (for 50 steps) are 1 / 2 / 7.",
        "[L&R] Lambda2": "λ2: layout-copy steps: the values are steps at this generation's step count, used as given (not scaled with steps): at 10 steps the panel's paper values 5 / 10 / 31 (for 50 steps) are 1 / 2 / 7.",
        "[L&R] Mask start": "Mask blending from step: the values are steps at this generation's step count, used as given (not scaled with steps): at 10 steps the panel's paper values 5 / 10 / 31 (for 50 steps) are 1 / 2 / 7.",
        "Layout-and-Retouch": "Let the vanilla model draw the layout, then retouch the subject's identity from the reference photo."
    };
    function addHints() {
        if (typeof titles === 'object') Object.assign(titles, layoutRetouchHints);
    }
    // The WebUI's hints.js looks at span/button/p only: block labels (the photo's) and the
    // accordion headers get their title here.
    function labelTitles() {
        const root = (typeof gradioApp === 'function') ? gradioApp() : document;
        const sel = ['label', '[data-testid="block-label"]', '.label-wrap', '.label-wrap span', 'button'];
        const tabs = ['#tab_txt2img', '#tab_img2img'];
        root.querySelectorAll(tabs.map(function (t) { return sel.map(function (s) { return t + ' ' + s; }).join(', '); }).join(', ')).forEach(function (el) {
            if (el.title) return;
            const hint = layoutRetouchHints[(el.textContent || '').trim()];
            if (!hint) return;
            el.title = hint;
            // an image's label floats over its drop zone: the whole block gets the hint
            if (el.dataset.testid === 'block-label' && el.parentElement && !el.parentElement.title) el.parentElement.title = hint;
        });
    }
    // texts of javascript/layout_retouch_ui.js (refusals, the upload guard)
    window.layoutRetouchTexts = {"refusalMark": "⚠ Layout-and-Retouch:", "moreUploading": "“More photos of the subject (optional, up to 3)” is still uploading — wait until the file sizes show, then Generate again", "intermediateKey": "Layout-and-Retouch intermediate"};
    addHints();
    if (typeof onUiLoaded === 'function') onUiLoaded(function () { addHints(); labelTitles(); });
    if (typeof onUiUpdate === 'function') {
        let pending = null;
        onUiUpdate(function () {
            if (pending) return;
            pending = setTimeout(function () { pending = null; labelTitles(); }, 500);
        });
    }
})();
