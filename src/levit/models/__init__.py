"""The network: configs (with the name -> config lookup), layers, the LeViT skeleton, fusion, FLOPs."""
