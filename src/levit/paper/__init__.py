"""The paper's tables and figures, measured on this machine, and the timing they share.

- :mod:`levit.paper.speed`: Table 3's speed comparison (LeViT against EfficientNet, DeiT and timm's
  LeViT, CPU and GPU) and Figure 1's speed/accuracy plot (``levit bench``);
- :mod:`levit.paper.ablations`: Table 5's ablations of LeViT-128S, trained and timed (``levit ablate``);
- :mod:`levit.paper.attention_biases`: the learned attention biases as arrays and as a picture
  (``levit biases``);
- :mod:`levit.paper.timing`: timed windows and interleaved rounds, the one way this project times
  anything (also used by the scripts under ``benchmarks/``).
"""
