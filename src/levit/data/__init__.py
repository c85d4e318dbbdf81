"""Images and datasets: decoding, transforms, datasets, samplers, the bundled digits."""

# how an image becomes the model's input (levit.data.preprocess.Preprocess): ``pil``, Pillow and
# torchvision's PIL transforms, the authors' evaluation bit for bit (the default); ``tensor``, decoded
# into a uint8 tensor and resized there (levit.data.decoders), equal but for 8-bit rounding; ``cuda``,
# a prediction job's batches of JPEGs decoded in one call on the model's device and resized there (one
# image at a time it is ``tensor``); ``auto``, ``cuda`` on a CUDA device and ``pil`` elsewhere. Here,
# where the command line reads it without importing torch.
DECODERS = ("pil", "tensor", "cuda", "auto")
