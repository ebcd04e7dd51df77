"""`qstore console`: the web console (an aiohttp app and its hand-written static pages)."""

from client.console.app import ConsoleConfig, create_app

__all__ = ["ConsoleConfig", "create_app"]
