"""tests.host.forge.attn_replace_extension.scripts"""
