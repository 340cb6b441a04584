"""lib_layout_retouch.unet"""
