"""Storage node service and MPC runtime (aiohttp shells around the sans-IO core in qstore/)."""
