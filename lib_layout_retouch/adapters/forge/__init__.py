"""lib_layout_retouch.adapters.forge"""
