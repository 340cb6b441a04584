"""lib_layout_retouch.dit"""
