"""Images and datasets: decoding, transforms, datasets, samplers, the bundled digits."""
