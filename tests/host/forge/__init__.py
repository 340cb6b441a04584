"""tests.host.forge"""
