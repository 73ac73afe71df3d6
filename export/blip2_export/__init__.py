"""blip2_export: Hugging Face BLIP-2 checkpoint -> blip2-node model folder (see export/README.md)."""

__version__ = "0.1.0"
