"""tests.host"""
