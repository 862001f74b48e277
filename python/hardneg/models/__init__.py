"""Models: the LLaVA-OneVision Embedder and the tiny random factory for tests and CPU demos."""

from hardneg.models.embedder import Embedder, EmbedderConfig, last_token_pool, load_embedder

__all__ = ["Embedder", "EmbedderConfig", "last_token_pool", "load_embedder"]
