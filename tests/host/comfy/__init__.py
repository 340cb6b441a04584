"""tests.host.comfy"""
