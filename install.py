"""Run by the WebUI at start-up (not with --skip-prepare-environment): installs what the extension
needs into the WebUI's venv, and nothing else. No model is downloaded: put SAM checkpoints
(sam_vit_b_01ec64.pth, …) into models/sam yourself if you want the SAM mask."""

import launch

NEEDS = {
    # import name: pip requirement
    "scipy": "scipy>=1.10",
    "segment_anything": "segment-anything==1.0",
}

for module, requirement in NEEDS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for Layout-and-Retouch")
