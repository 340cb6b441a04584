"""lib_layout_retouch.retouch"""
