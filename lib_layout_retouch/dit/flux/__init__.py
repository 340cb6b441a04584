"""lib_layout_retouch.dit.flux"""
