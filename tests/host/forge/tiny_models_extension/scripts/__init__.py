"""tests.host.forge.tiny_models_extension.scripts"""
