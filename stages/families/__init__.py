"""Model families: adapters over diffusers and transformers classes."""
