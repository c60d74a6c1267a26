from onegpu.cli import entrypoint

entrypoint()
