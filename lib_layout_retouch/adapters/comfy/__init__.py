"""lib_layout_retouch.adapters.comfy"""
