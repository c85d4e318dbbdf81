"""Weight files: the levit format, the key maps of the official, timm and Hugging Face files, the hub."""
