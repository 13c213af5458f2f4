"""Console entry points: ``nydusd`` and ``nydus-image`` (argv, logging, asyncio.run live only here)."""
