// Layout-and-Retouch on the page: refusals shown where the eye is, and Generate held back while
// "More photos" still uploads. Texts come from lib_layout_retouch/ui_text.py through the generated
// javascript/layout_retouch.js (window.layoutRetouchTexts).
(function () {
    const TABS = ['txt2img', 'img2img'];

    function texts() {
        return window.layoutRetouchTexts || {refusalMark: '⚠ Layout-and-Retouch:', refusalItem: '•', moreUploading: 'More photos are still uploading', intermediateKey: 'Layout-and-Retouch intermediate', intermediateShort: {}};
    }

    function app() {
        return (typeof gradioApp === 'function') ? gradioApp() : document;
    }

    function byId(id) {
        return app().querySelector('#' + id);
    }

    function prefix(tab) {
        return tab === 'img2img' ? 'script_img2img_layoutandretouch_' : 'script_layoutandretouch_';
    }

    // ---- a banner at the top of the results column (above the gallery) -------------------------
    function banner(tab, text) {
        const id = 'layout_retouch_message_' + tab;
        let el = byId(id);
        if (!text) {
            if (el) el.remove();
            return null;
        }
        const results = byId(tab + '_results') || byId(tab + '_gallery_container');
        if (!results) return null;
        if (!el) {
            el = document.createElement('div');
            el.id = id;
            el.className = 'layout-retouch-error';
            el.setAttribute('role', 'alert');
            results.insertBefore(el, results.firstChild);
        }
        if (el.textContent !== text) {
            el.textContent = text;
            el.scrollIntoView({block: 'nearest'});
        }
        return el;
    }

    // ---- refusals: styled, above the gallery, without the infotext of an image never made ------
    function refusalIn(tab) {
        // the WebUI writes the comments as one <p class="comments"> with <br> between lines
        const log = byId('html_log_' + tab);
        if (!log) return null;
        const mark = texts().refusalMark;
        const nodes = [...log.querySelectorAll('p')].filter(function (n) {
            return (n.textContent || '').includes(mark);
        });
        if (!nodes.length) return null;
        // a refusal with several problems: the marked line, then one "•" line each
        const item = texts().refusalItem || '•';
        const lines = [];
        nodes.forEach(function (n) {
            let inRefusal = false;
            (n.innerText || n.textContent || '').split('\n').forEach(function (l) {
                const t = l.trim();
                if (t.startsWith(mark)) {
                    lines.push(t);
                    inRefusal = true;
                } else if (inRefusal && t.startsWith(item)) {
                    lines.push(t);
                } else {
                    inRefusal = false;
                }
            });
        });
        return {nodes: nodes, text: lines.join('\n')};
    }

    function showRefusals() {
        TABS.forEach(function (tab) {
            const found = refusalIn(tab);
            const info = byId('html_info_' + tab);
            if (found) {
                found.nodes.forEach(function (n) { n.classList.add('layout-retouch-error-text'); });
                const el = banner(tab, found.text);
                if (el) el.dataset.kind = 'refusal';
                if (info) info.classList.add('layout-retouch-hidden');
            } else {
                const el = byId('layout_retouch_message_' + tab);
                if (el && el.dataset.kind !== 'upload') banner(tab, null);
                if (info) info.classList.remove('layout-retouch-hidden');
            }
        });
    }

    // ---- Generate while "More photos" still uploads -----------------------------------------
    function enabled(tab) {
        const cb = byId(prefix(tab) + 'enabled-checkbox');
        const input = cb ? cb.querySelector('input') : null;
        return !!(input && input.checked);
    }

    function stillUploading(tab) {
        // subject 1's "More photos" and those of the subjects after it (subject2_more_photos …)
        const boxes = [byId(prefix(tab) + 'more_photos')].concat(
            [...app().querySelectorAll('[id^="' + prefix(tab) + 'subject"][id$="_more_photos"]')]);
        return boxes.some(function (more) {
            if (!more) return false;
            // gradio shows "Uploading..." instead of a file's size (a download link) until it has arrived
            const rows = [...more.querySelectorAll('tbody tr')];
            return rows.some(function (r) { return !r.querySelector('a'); }) || /Uploading/.test(more.innerText || '');
        });
    }

    function guardGenerate(event) {
        const button = event.target && event.target.closest ? event.target.closest('button') : null;
        if (!button) return;
        const tab = TABS.find(function (t) { return button.id === t + '_generate'; });
        if (!tab || !enabled(tab)) return;
        if (stillUploading(tab)) {
            event.preventDefault();
            event.stopImmediatePropagation();
            const el = banner(tab, texts().refusalMark + ' ' + texts().moreUploading + '.');
            if (el) el.dataset.kind = 'upload';
        } else {
            const el = byId('layout_retouch_message_' + tab);
            if (el) banner(tab, null);
        }
    }

    // ---- the intermediates' thumbnails captioned with what they are --------------------------
    // Each image's infotext is in the hidden generation-info JSON (gallery order, grid included);
    // an intermediate's carries "<intermediateKey>: stage-1 layout of image 1" and the like.
    function intermediateLabels(tab) {
        const box = byId('generation_info_' + tab);
        const area = box ? box.querySelector('textarea') : null;
        if (!area || !area.value) return [];
        let info;
        try { info = JSON.parse(area.value); } catch (e) { return []; }
        const key = texts().intermediateKey || 'Layout-and-Retouch intermediate';
        return (info.infotexts || []).map(function (t) {
            const at = (t || '').indexOf(key + ': ');
            return at < 0 ? '' : t.slice(at + key.length + 2).split(/[,\n]/)[0].trim();
        });
    }

    // A caption that fits a thumbnail (≈ 40 px wide at 1280 px): "layout", "mask", "map" — with
    // the image's number when there are several — and the full label on hover.
    function shortCaption(label, numbered) {
        const short = texts().intermediateShort || {};
        const m = /^(.*) of image (\d+)$/.exec(label);
        if (!m) return label;
        const word = short[m[1]] || m[1];
        return numbered ? word + ' ' + m[2] : word;
    }

    function captionIntermediates() {
        TABS.forEach(function (tab) {
            const labels = intermediateLabels(tab);
            const numbered = labels.some(function (l) { return /of image [2-9]\d*$|of image 1\d+$/.test(l || ''); });
            const gallery = byId(tab + '_gallery');
            let selectedIsIntermediate = false;
            // the preview's row and the grid each list every image: index within each list
            const index = new Map();
            app().querySelectorAll('#' + tab + '_gallery .thumbnail-item').forEach(function (thumb) {
                const list = thumb.parentElement;
                const i = index.get(list) || 0;
                index.set(list, i + 1);
                const label = labels[i] || '';
                let cap = thumb.querySelector('.layout-retouch-caption');
                if (!label) {
                    if (cap) { cap.remove(); thumb.removeAttribute('title'); }
                    return;
                }
                if (thumb.classList.contains('selected')) selectedIsIntermediate = true;
                if (!cap) {
                    cap = document.createElement('span');
                    cap.className = 'layout-retouch-caption';
                    thumb.appendChild(cap);
                }
                const text = shortCaption(label, numbered);
                if (cap.textContent !== text) cap.textContent = text;
                if (thumb.title !== label) thumb.title = label;
            });
            // a mostly white blend mask on the white preview: framed on a grey matte
            if (gallery) gallery.classList.toggle('layout-retouch-intermediate-shown', selectedIsIntermediate);
        });
    }

    document.addEventListener('click', guardGenerate, true);
    if (typeof onUiUpdate === 'function') {
        let pending = null;
        onUiUpdate(function () {
            if (pending) return;
            pending = setTimeout(function () { pending = null; showRefusals(); captionIntermediates(); }, 200);
        });
    }
})();
