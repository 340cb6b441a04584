// Hover hints for the Layout-and-Retouch controls, through the WebUI's `titles` (hints.js).
// Generated from lib_layout_retouch/params.py by tools/gen_hints.py: do not edit by hand.
(function () {
    const layoutRetouchHints = {
        "Enable Layout-and-Retouch": "Let the vanilla model draw the layout, then retouch the subject's identity from the reference photo.",
        "Reference photo of the subject": "One photo of your subject, or up to 4: the subject's identity is taken from all of them together. Each is centre-cropped to the image's aspect ratio; the infotext records their fingerprints.",
        "Personalized model type": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "Vanilla checkpoint": "The original checkpoint your DreamBooth model was fine-tuned from; it draws the layout. Not needed for Textual Inversion or LoRA.",
        "Concept token": "The word in your prompt that stands for the subject, e.g. sks or <my-vase>.",
        "Class phrase": "What a normal model calls the subject, e.g. dog or red vase. Replaces the concept token in the vanilla model's prompt and finds the subject for the mask.",
        "Reference prompt (optional)": "Neutral prompt for the reference and target paths; empty means 'a photo of <concept token> <class phrase>'.",
        "λ1: vanilla layout steps": "How many first steps the vanilla model draws (paper: 5; 3 for hard prompts). Larger follows the prompt better but weakens the identity.",
        "λ2: retouch steps that keep the layout": "How many first steps of the retouch keep the layout exactly before your subject's identity is painted in (paper: 10). Larger keeps more of the layout's shapes; smaller lets the photo change more.",
        "Mask blending from step": "From this step of the retouch on, everything outside the subject mask is kept from the layout (paper: 31 of 50); 51 turns this blending off.",
        "Scale λ1, λ2 and mask start with the step count": "On: the three values are for 50 steps and are scaled to your step count. Off: they are used as they are; unticking puts in the values used at your step count.",
        "Segment-Anything model": "SAM checkpoint that sharpens the subject mask; 'none' uses the cross-attention mask only.",
        "Cross-attention mask threshold": "How strongly a place must attend to the subject's words to count as the subject in the mask, relative to the strongest place (MasaCtrl 0.1, DreamMatcher 0.05); lower gives a larger mask. Must be between 0 and 1.",
        "Show layout, mask and attention map": "Add each image's stage-1 layout, its blend mask and its subject cross-attention map to the gallery after the results (a viewing option: not written to the infotext).",
        "Layout source": "What the retouch keeps the layout from: the stage-1 image turned back into noise by DDIM inversion (paper), or the noisy images stage 1 passed through (faster: no inversion; needs the DDIM sampler, else the image is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: your subject is put into that picture).",
        "Read the reference photo exactly at every step": "The photo is turned into noise once and replayed beside your image, which takes the subject's identity from it at every step. On: each step restarts the replay from the photo's own stored noise, so it is read exactly (as MasaCtrl and DreamMatcher do). Off: the replay runs on by itself and may drift from the photo.",
        "Attention layer preset": "Which decoder self-attention layers take the reference's identity (and blend the mask): standard = the paper's (SD1: decoder blocks 10–15 of 16; SDXL: output_blocks.1–5, 26 of 70 layers); light = only the finer of those levels (SD1: output_blocks.9–11; SDXL: output_blocks.3–5), for when the reference's pose or background bleeds in.",
        "Stage-1 text encoder (DreamBooth)": "Which text encoder reads the prompt of the vanilla model's steps (yours with the class phrase in place of the concept token) in DreamBooth mode: the vanilla checkpoint's own (what the vanilla model understands; DreamBooth often fine-tunes the text encoder too), or the loaded personalized model's.",
        "More subjects": "Subjects 2 to 3 in the same image, each from its own photos: each is retouched only in its own region of the layout, from its own reference photos (and its own LoRA).",
        "DreamBooth checkpoint": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "Textual Inversion embedding": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "LoRA": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "Photos only (no trained model)": "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the loaded (vanilla) model.",
        "DDIM inversion of the layout (paper)": "What the retouch keeps the layout from: the stage-1 image turned back into noise by DDIM inversion (paper), or the noisy images stage 1 passed through (faster: no inversion; needs the DDIM sampler, else the image is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: your subject is put into that picture).",
        "Stage-1 latents (faster)": "What the retouch keeps the layout from: the stage-1 image turned back into noise by DDIM inversion (paper), or the noisy images stage 1 passed through (faster: no inversion; needs the DDIM sampler, else the image is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: your subject is put into that picture).",
        "The input image itself (img2img)": "What the retouch keeps the layout from: the stage-1 image turned back into noise by DDIM inversion (paper), or the noisy images stage 1 passed through (faster: no inversion; needs the DDIM sampler, else the image is inverted and the infotext says so), or — img2img only — the input image itself (no stage 1: your subject is put into that picture).",
        "Standard (paper)": "Which decoder self-attention layers take the reference's identity (and blend the mask): standard = the paper's (SD1: decoder blocks 10–15 of 16; SDXL: output_blocks.1–5, 26 of 70 layers); light = only the finer of those levels (SD1: output_blocks.9–11; SDXL: output_blocks.3–5), for when the reference's pose or background bleeds in.",
        "Light": "Which decoder self-attention layers take the reference's identity (and blend the mask): standard = the paper's (SD1: decoder blocks 10–15 of 16; SDXL: output_blocks.1–5, 26 of 70 layers); light = only the finer of those levels (SD1: output_blocks.9–11; SDXL: output_blocks.3–5), for when the reference's pose or background bleeds in.",
        "Vanilla checkpoint's": "Which text encoder reads the prompt of the vanilla model's steps (yours with the class phrase in place of the concept token) in DreamBooth mode: the vanilla checkpoint's own (what the vanilla model understands; DreamBooth often fine-tunes the text encoder too), or the loaded personalized model's.",
        "Loaded model's": "Which text encoder reads the prompt of the vanilla model's steps (yours with the class phrase in place of the concept token) in DreamBooth mode: the vanilla checkpoint's own (what the vanilla model understands; DreamBooth often fine-tunes the text encoder too), or the loaded personalized model's.",
        "More photos of the subject (optional, up to 3)": "Other photos of the same subject (other angles, other light): the retouch attends to all of them together. Each is inverted once and cached. The API sends them in reference_image as a list.",
        "Guess": "Fill Concept token and Class phrase from the prompt: a Textual-Inversion embedding name, a rare identifier such as sks / ohwx followed by its class word, or a LoRA tag. Several in the prompt fill subject 2 and 3 too (their panels open). It says what it could not find.",
        "➕ Add subject": "Subjects 2 to 3 in the same image, each from its own photos: each is retouched only in its own region of the layout, from its own reference photos (and its own LoRA). Shows the next subject's panel (up to 3): name each in the prompt with its own concept token and class phrase, e.g. 'a photo of sks dog and zwx cat on a sofa'.",
        "✖ Remove subject": "Remove this subject from the image; the subjects after it move up.",
        "LoRA name (optional)": "For a LoRA subject: the name of its tag in the prompt (my_dog for <lora:my_dog:1>), so its LoRA acts only in its own region. Empty: the prompt's LoRA tags are the LoRA subjects' in order.",
        "Advanced": "The reference prompt, the Segment-Anything mask and its threshold, the layout source, how exactly the photo is read, the attention layers and DreamBooth's stage-1 text encoder: the paper's defaults work for most subjects.",
        "[L&R] Lambda1": "λ1: vanilla layout steps: the values are steps at this generation's step count, used as given (not scaled with steps): at 10 steps the panel's paper values 5 / 10 / 31 (for 50 steps) are 1 / 2 / 7.",
        "[L&R] Lambda2": "λ2: retouch steps that keep the layout: the values are steps at this generation's step count, used as given (not scaled with steps): at 10 steps the panel's paper values 5 / 10 / 31 (for 50 steps) are 1 / 2 / 7.",
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
    window.layoutRetouchTexts = {"refusalMark": "⚠ Layout-and-Retouch:", "refusalItem": "•", "moreUploading": "“More photos of the subject (optional, up to 3)” is still uploading — wait until the file sizes show, then Generate again", "intermediateKey": "Layout-and-Retouch intermediate", "intermediateShort": {"stage-1 layout": "layout", "blend mask": "mask", "subject cross-attention map": "map", "subject regions": "regions"}};
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
