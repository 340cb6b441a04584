"""tests.host.probe.scripts"""
