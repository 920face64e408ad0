"""psfw: an asyncio parameter-server microframework for data-parallel JAX training."""
