"""The S3-compatible gateway (ARCHITECTURE.md §7): SigV4, S3's XML, users, and the aiohttp app."""
