"""Model core: DiT-Mem memory encoder, memory injection into Wan, generation pipeline."""
