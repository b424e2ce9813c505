"""What a prediction becomes: coloured masks and overlays, videos, ONNX files; the one argmax."""
